# RefCOCO (unc split): score every annotated object of the image against the expression, pick one. The original's
# recipe (10 epochs of the 120k training sentences at batch 60, lr 7.5e-4, 5% warmup, 40 tokens), although its
# model scored padded crops instead; evaluate.py reports val, testA and testB separately. RefCOCO+ and RefCOCOg
# are the same with --task=refcoco_plus / --task=refcocog (umd split: val and test) and their own out_dir.
#   torchrun --standalone --nproc_per_node=2 finetune.py configs/refcoco.py --init_from=out/freeze_vision --data_root=/data
#   torchrun --standalone --nproc_per_node=2 finetune.py configs/refcoco.py --task=refcocog --out_dir=out/refcocog --init_from=...
#   python evaluate.py out/refcoco
include("finetune_base.py")
task = "refcoco"
out_dir = "out/refcoco"
augment = False  # a random crop would move the boxes
image_resize = "squash"  # so would a centre crop: the whole picture, squashed to the square
max_text_len = 40
batch_size = 60
micro_batch_size = 30
max_steps = 20100  # 10 epochs x 120,624 / 60
warmup_steps = 1005
lr = 7.5e-4
eval_interval = 2000
eval_batches = 181  # 181 x 30 x 2 processes: all of val (10,834 sentences)
