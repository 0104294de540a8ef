# Study 1 on real data (the paper's experiment 1): the two-tower model (ELECTRA-Small + DeiT-Tiny, 6 cross-modal
# layers) pretrained with MLM + ITM on COCO + Visual Genome for 100k steps with nothing, the text tower, the vision
# tower or both frozen (configs/freeze_*.py), then fine-tuned (nothing frozen) on NLVR2, SNLI-VE and RefCOCO; 3 seeds.
# The synthetic version (synthetic_freezing.py) is the one run here.
#   torchrun --standalone --nproc_per_node=2 study.py studies/freezing.py --data_root=/data
include("paper_tasks.py")
variants = {
    "none": ("../configs/freeze_none.py", {}),
    "text": ("../configs/freeze_text.py", {}),
    "vision": ("../configs/freeze_vision.py", {}),
    "both": ("../configs/freeze_both.py", {}),
}
compare = [("text", "none"), ("vision", "none"), ("both", "none")]
