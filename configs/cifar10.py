# CIFAR-10, image only through the vision side of either model type: what vision-language pretraining leaves of
# the vision encoder. Pictures upsampled from 32 to the pretraining size; 5 epochs of the 50k training images.
#   torchrun --standalone --nproc_per_node=2 finetune.py configs/cifar10.py --init_from=out/freeze_vision --data_root=/data
#   python evaluate.py out/cifar10
include("finetune_base.py")
task = "cifar10"
out_dir = "out/cifar10"
augment = True  # a mild random resized crop, no flip
lr_mult_cross = 5.0  # the original has no working CIFAR-10 recipe: this project's own
lr_mult_heads = 10.0
batch_size = 128
micro_batch_size = 64
max_steps = 2000
warmup_steps = 200
eval_interval = 500
eval_batches = 80  # all of test (10k)
