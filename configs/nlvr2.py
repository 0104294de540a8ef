# NLVR2 (two images + a statement -> true / false): the original's recipe, 40 epochs of the 86k training statements
# at batch 256 and 288 px, lr 7.5e-5, 5% warmup; validate on dev; evaluate.py then scores dev and test1 (accuracy
# and consistency).
#   torchrun --standalone --nproc_per_node=2 finetune.py configs/nlvr2.py --init_from=out/freeze_vision --data_root=/data
#   python evaluate.py out/nlvr2
include("finetune_base.py")
task = "nlvr2"
out_dir = "out/nlvr2"
image_size = 288
batch_size = 256
micro_batch_size = 32  # two forwards per statement
max_steps = 13500  # 40 epochs x 86,373 / 256
warmup_steps = 675
lr = 7.5e-5
eval_interval = 1000
eval_batches = 120  # 120 x 32 x 2 processes: the whole dev set (6,982 statements)
