# Shared settings of the GLUE configs (glue_<task>.py), text only through the text side of either model type:
# the original's MRPC recipe (batch 32, lr 1e-5, heads 10x, 3 epochs, 128 tokens) for every task, no cross-modal
# layers involved. The original's other GLUE tasks crash, so MRPC's recipe stands in for them.
include("finetune_base.py")
batch_size = 32
micro_batch_size = 32
max_text_len = 128
lr = 1e-5
lr_mult_heads = 10.0
eval_batches = 400  # every dev example of every task but QQP / MNLI (12.8k of their 40k / 9.8k)
