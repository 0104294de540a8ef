# Dual encoder, both towers trained (CLIP-style): BERT-base text tower + ViT-B/16 vision tower (LilT's towers),
# each pooled at its CLS, projected to 512 and L2-normalised; image-text contrastive loss (ITC) alone, with a
# learnable temperature, every rank scoring its rows against the whole global micro-batch (2 x 128 here; the
# negatives are those of one micro-batch, so raise micro_batch_size before accumulation). COCO + Visual Genome.
# dual_lit.py and dual_lilt.py include this one and change what trains.
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/dual_full.py --data_root=/path/to/data
#   python evaluate.py out/dual_full --zero_shot=true --task=coco_retrieval    (zero-shot: also cifar10)
out_dir = "out/dual_full"
model_type = "dual_encoder"
text_tower = "bert-base-uncased"
vision_tower = "google/vit-base-patch16-224"
image_size = 224
image_mean = (0.5, 0.5, 0.5)  # this ViT was trained on [-1, 1] inputs
image_std = (0.5, 0.5, 0.5)
max_text_len = 40
embed_dim = 512
embed_pooling = "cls"
corpora = ["coco", "vg"]
mlm_weight = 0.0
itm_weight = 0.0
itc_weight = 1.0
batch_size = 512
micro_batch_size = 128  # 512 = 2 GPUs x 128 x 2 accumulation steps
max_steps = 20000
warmup_steps = 1000
lr = 1e-4
lr_decay = "cosine"
weight_decay = 0.1
lr_mult_heads = 1.0  # the temperature
dtype = "bfloat16"
num_workers = 8
eval_interval = 2000
ckpt_interval = 2000
