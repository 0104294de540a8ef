# Image-text retrieval on COCO (Karpathy split): fine-tune on train + restval with a softmax ranking loss over each
# caption's picture and 15 other pictures of its micro-batch; evaluate.py ranks all 5k test images against all
# 25k captions with the cross-encoder (each image and caption encoded once, pairs fused in batches): TR/IR@1/5/10.
#   torchrun --standalone --nproc_per_node=2 finetune.py configs/coco_retrieval.py --init_from=out/freeze_vision --data_root=/data
#   torchrun --standalone --nproc_per_node=2 evaluate.py out/coco_retrieval --eval_pairs_batch=4096
include("finetune_base.py")
task = "coco_retrieval"
out_dir = "out/coco_retrieval"
batch_size = 256
micro_batch_size = 32  # 32 captions x 16 candidate pictures = 512 fused pairs per forward
retrieval_negatives = 15
lr_mult_cross = 5.0  # the original has no working retrieval recipe: this project's own
lr_mult_heads = 10.0
max_steps = 10000
warmup_steps = 1000
eval_interval = 2000
eval_batches = 8  # validation ranks the first 8 x 32 x 2 = 512 val images against their captions
