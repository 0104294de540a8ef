# Synthetic dual encoder: dual_full.py's recipe (ITC alone, both towers trained) with the quickstart's small
# random towers on the synthetic world. Offline; a few minutes on a 2-core CPU. Then zero-shot retrieval and
# classification of the synthetic test splits, with no fine-tuning:
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/synthetic_dual_full.py
#   python evaluate.py out/synthetic_dual_full --zero_shot=true --task=coco_retrieval --synthetic_task=true
#   python evaluate.py out/synthetic_dual_full --zero_shot=true --task=cifar10 --synthetic_task=true
include("quickstart.py")
out_dir = "out/synthetic_dual_full"
model_type = "dual_encoder"
embed_dim = 128
mlm_weight = 0.0
itm_weight = 0.0
itc_weight = 1.0
