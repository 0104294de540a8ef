# Synthetic MLM + ITM + ITC: the quickstart's two-tower model with ITC on the towers' outputs before fusion, as in
# twotower_itc.py. ITM negatives are drawn uniformly here: a synthetic caption names only part of its picture
# ("a red circle"), so the pictures ITC finds most similar can make it true, and hard "negatives" then teach ITM
# wrong labels (with them, ITM accuracy was 0.47 held out at step 200 and 0.50 in training at step 320, both
# on hard negatives). Offline, about 15 minutes on a shared 2-core CPU. Then zero-shot
# retrieval, full cross-encoder ranking against two-stage (ITC ranks, ITM re-scores the top 8):
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/synthetic_twotower_itc.py
#   python evaluate.py out/synthetic_twotower_itc --zero_shot=true --task=coco_retrieval --synthetic_task=true
#   python evaluate.py out/synthetic_twotower_itc --zero_shot=true --task=coco_retrieval --synthetic_task=true --retrieval_rerank_k=8
include("quickstart.py")
out_dir = "out/synthetic_twotower_itc"
itc_weight = 1.0
embed_dim = 128
itm_hard_negatives = False
