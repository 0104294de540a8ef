# The paper's two-tower model (freeze_none.py: ELECTRA-Small + DeiT-Tiny, 6 cross-modal layers) pretrained with
# MLM + ITM + ITC: ITC on the towers' projected outputs before fusion (ALBEF), 256-wide embeddings, and ITM
# negatives drawn by ITC similarity over the global batch instead of uniformly (harder negatives).
# Retrieval can then rank by ITC and re-score only the top k with ITM (--retrieval_rerank_k=16).
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/twotower_itc.py --data_root=/path/to/data
#   python evaluate.py out/twotower_itc --zero_shot=true --task=coco_retrieval --retrieval_rerank_k=16
include("freeze_none.py")
out_dir = "out/twotower_itc"
itc_weight = 1.0
embed_dim = 256
itm_hard_negatives = True
