# Synthetic GLUE: all nine tasks in their TSV layouts, sentences about scenes of the synthetic world (see
# tasks.glue.generate_synthetic_glue); text only. Pick the task on the command line:
#   python finetune.py configs/synthetic_glue.py --task=stsb --out_dir=out/synthetic_glue_stsb
include("synthetic_finetune.py")
task = "mnli"
out_dir = "out/synthetic_glue_mnli"
max_steps = 500
