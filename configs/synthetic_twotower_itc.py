# Synthetic MLM + ITM + ITC: the quickstart's two-tower model with twotower_itc.py's losses (ITC before fusion, ITM
# negatives drawn by ITC similarity). Offline, a few minutes on a 2-core CPU. Then zero-shot retrieval, full
# cross-encoder ranking against two-stage (ITC ranks, ITM re-scores the top 8):
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/synthetic_twotower_itc.py
#   python evaluate.py out/synthetic_twotower_itc --zero_shot=true --task=coco_retrieval --synthetic_task=true
#   python evaluate.py out/synthetic_twotower_itc --zero_shot=true --task=coco_retrieval --synthetic_task=true --retrieval_rerank_k=8
include("quickstart.py")
out_dir = "out/synthetic_twotower_itc"
itc_weight = 1.0
embed_dim = 128
itm_hard_negatives = True
