# Paper experiment 2: a BERT-base-sized one-tower model (110M) initialised at random, pretrained with
# MLM (whole words) + ITM on COCO + Visual Genome at global batch 512. Random init was the best of the three in
# the paper. Word pieces come from BERT's tokenizer; every weight starts from scratch, and in all three models
# the word-piece and patch embeddings are fresh (onetower_embeddings = "fresh"), as in the original.
# Schedule: the paper's text says 50k steps, a table caption 100k; the original's one-tower configs run 50k
# steps (at batch 1024 for BERT, 176 for ViT, lr left at its 1e-5 default). This config takes the paper's
# batch 512 and its text's 50k steps, with lr 1e-4 and 10% warmup (README: "Differences from the original").
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
onetower_embeddings = "fresh"
max_text_len = 40  # the original's one-tower configs keep its default of 40
batch_size = 512
micro_batch_size = 64  # 512 = 2 GPUs x 64 x 4 accumulation steps
max_steps = 50000
warmup_steps = 5000
lr = 1e-4
