# Paper experiment 1 (Renaissance, Fields & Kennington 2024), baseline: nothing frozen.
# Two-tower: ELECTRA-Small text tower + DeiT-Tiny vision tower, 6 LXMERT cross-modal layers of width 256
# with 4 heads, MLM (whole words) + ITM on COCO + Visual Genome, global batch 704, 100k steps (the paper used
# 2 x L40S). The recipe is the original code's (README: "Differences from the original"); its exp1 config has
# cross-modal width 292, the paper says 256, and this config follows the paper.
# The other freeze_*.py configs include this one and change one line.
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/freeze_none.py --data_root=/path/to/data
out_dir = "out/freeze_none"
model_type = "two_tower"
text_tower = "google/electra-small-discriminator"
vision_tower = "facebook/deit-tiny-patch16-224"
image_size = 224
image_resize = "crop"  # shorter side to 224 (bicubic), centre crop, ImageNet statistics: the original's transform
image_mean = (0.485, 0.456, 0.406)
image_std = (0.229, 0.224, 0.225)
max_text_len = 50
whole_word_mask = True
cross_layer_type = "lxmert"
init_new_modules = "bert"  # the original's N(0, 0.02) start for every module added to the towers
cross_layers = 6
cross_hidden = 256
cross_heads = 4
corpora = ["coco", "vg"]
mlm_weight = 1.0
itm_weight = 1.0
batch_size = 704
micro_batch_size = 88  # 704 = 2 GPUs x 88 x 4 accumulation steps; raise it if memory allows
max_steps = 100000
warmup_steps = 10000
lr = 1e-4
eps = 1e-8  # the original's AdamW epsilon, and no gradient clipping
grad_clip = 0.0
lr_mult_cross = 5.0
lr_mult_heads = 5.0
dtype = "bfloat16"
num_workers = 8
eval_interval = 2000
ckpt_interval = 2000
