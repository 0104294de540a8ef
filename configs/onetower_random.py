# Paper experiment 2: a BERT-base-sized one-tower model (110M) initialised at random, pretrained with
# MLM + ITM on COCO + Visual Genome at global batch 512. Random init was the best of the three in the paper.
# Word pieces come from BERT's tokenizer; every weight starts from scratch.
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/onetower_random.py --data_root=/path/to/data
include("freeze_none.py")
out_dir = "out/onetower_random"
model_type = "one_tower"
onetower_stack = "text"
text_tower = "bert"  # the family: random init at the sizes below, no download
tokenizer = "bert-base-uncased"
text_hidden_size = 768
text_layers = 12
text_heads = 12
text_mlp_ratio = 4.0
text_dropout = 0.1
patch_size = 16
pooling = "double"
image_mean = (0.5, 0.5, 0.5)
image_std = (0.5, 0.5, 0.5)
batch_size = 512
micro_batch_size = 64  # 512 = 2 GPUs x 64 x 4 accumulation steps
