# GLUE MRPC (F1 and accuracy), 3 epochs of its 3,668 training examples.
#   python finetune.py configs/glue_mrpc.py --init_from=out/freeze_vision --data_root=/data
#   python evaluate.py out/glue_mrpc
include("glue.py")
task = "mrpc"
out_dir = "out/glue_mrpc"
max_steps = 340
warmup_steps = 0  # the original's MRPC recipe: no warmup
eval_interval = 68
