# Study 2 on real data (the paper's experiment 2): the BERT-base-sized one-tower model initialised at random, from BERT
# or from ViT (configs/onetower_*.py), pretrained with MLM + ITM on COCO + Visual Genome, then fine-tuned on NLVR2,
# SNLI-VE and RefCOCO; 3 seeds. The synthetic version (synthetic_onetower_init.py) is the one run here.
#   torchrun --standalone --nproc_per_node=2 study.py studies/onetower_init.py --data_root=/data
include("paper_tasks.py")
variants = {
    "random": ("../configs/onetower_random.py", {}),
    "bert": ("../configs/onetower_bert.py", {}),
    "vit": ("../configs/onetower_vit.py", {}),
}
compare = [("bert", "random"), ("vit", "random")]
