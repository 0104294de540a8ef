# Study 1 on real data (the paper's experiment 1): the two-tower model (ELECTRA-Small + DeiT-Tiny, 6 cross-modal
# layers) pretrained with MLM + ITM on COCO + Visual Genome with nothing, the text tower, the vision tower or both
# frozen (configs/freeze_*.py), each fine-tuned (nothing frozen) on NLVR2, SNLI-VE and RefCOCO; 3 seeds. Weeks of GPU
# time: the synthetic version (synthetic_freezing.py) is the one run here.
#   torchrun --standalone --nproc_per_node=2 study.py studies/freezing.py --data_root=/data
variants = {
    "none": ("../configs/freeze_none.py", {}),
    "text": ("../configs/freeze_text.py", {}),
    "vision": ("../configs/freeze_vision.py", {}),
    "both": ("../configs/freeze_both.py", {}),
}
seeds = [0, 1, 2]
tasks = {
    "nlvr2": ("../configs/nlvr2.py", {}),
    "snli_ve": ("../configs/snli_ve.py", {}),
    "refcoco": ("../configs/refcoco.py", {}),
}
headline = {"nlvr2": ["nlvr2_acc (dev)"], "snli_ve": ["snli_ve_acc (dev)"], "refcoco": ["refcoco_acc (val)"]}
compare = [("text", "none"), ("vision", "none"), ("both", "none")]
