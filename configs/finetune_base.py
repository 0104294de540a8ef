# Shared settings of the fine-tuning configs for real data (included by nlvr2.py, snli_ve.py, ...): nothing frozen,
# the towers at lr, the cross-modal layers 15x and the new head 5x faster, with the original's optimizer and image
# transform (each task config sets the rest of the original's recipe for that task). The architecture comes from
# init_from, the pretraining checkpoint or run directory, so each task config fine-tunes any of the pretrained models.
init_from = ""  # set on the command line: --init_from=out/freeze_vision
image_size = 224
image_resize = "crop"
max_text_len = 50
augment = False
dtype = "bfloat16"
num_workers = 8
lr = 1e-4
lr_decay = "linear"
weight_decay = 0.01
eps = 1e-8
grad_clip = 0.0
init_new_modules = "bert"  # new task heads start as the original's do
lr_mult_cross = 15.0
lr_mult_heads = 5.0
log_interval = 20
ckpt_interval = 1000
keep_checkpoints = 1
