# VQAv2: 3,129-way answer classifier (normalised answers of at least 9 questions of train2014 + val2014, the
# original's vocabulary) trained with binary cross-entropy on soft scores, validated on val2014 with the official
# accuracy. The original's recipe: 10 epochs of train2014 at batch 512 and 576 px, lr 5e-6, 10% warmup, heads 50x
# and cross-modal layers 5x.
# For a test-dev submission, train on both and hold out 5% of the val2014 images for validation:
#   torchrun --standalone --nproc_per_node=2 finetune.py configs/vqa.py --init_from=out/freeze_vision --data_root=/data
#   ... --train_splits=train2014,val2014 --out_dir=out/vqa_trainval, then
#   python evaluate.py out/vqa_trainval --eval_splits=test-dev2015   (writes the server's results file)
include("finetune_base.py")
task = "vqa"
out_dir = "out/vqa"
vqa_min_answer_count = 9
vqa_answer_splits = ["train2014", "val2014"]  # the original's vocabulary: 3,129 answers
vqa_heldout_fraction = 0.05
image_size = 576
batch_size = 512
micro_batch_size = 64
max_steps = 8670  # 10 epochs x 443,757 / 512
warmup_steps = 867
lr = 5e-6
lr_mult_cross = 5.0
lr_mult_heads = 50.0
eval_interval = 2000
eval_batches = 40  # 40 x 64 x 2 processes = 5,120 val questions per validation; evaluate.py scores all 214k
