# SNLI-VE (Flickr30k image + hypothesis -> entailment / neutral / contradiction): the original's recipe, 10 epochs of
# the 530k training pairs at batch 64 and 384 px, lr 5e-5, 10% warmup; validate on dev; evaluate.py then scores dev
# and test.
#   torchrun --standalone --nproc_per_node=2 finetune.py configs/snli_ve.py --init_from=out/freeze_vision --data_root=/data
#   python evaluate.py out/snli_ve
include("finetune_base.py")
task = "snli_ve"
out_dir = "out/snli_ve"
image_size = 384
batch_size = 64
micro_batch_size = 32
max_steps = 82740  # 10 epochs x 529,527 / 64
warmup_steps = 8274
lr = 5e-5
eval_interval = 5000
eval_batches = 120  # 120 x 32 x 2 processes: about 43% of dev (17,858 pairs); evaluate.py scores all of it
