# When to introduce images (Keh et al. 2025), synthetic version, arm 1 of 3: images from the start. The quickstart's
# small two-tower model from scratch on the synthetic world's captions and its text corpus (both generated on first
# use): from the first step, half the optimizer steps are image-text (MLM + ITM), half text-only (MLM on the text
# tower alone). Arm 2: synthetic_schedule_images_at_80.py. Arm 3: synthetic_schedule_text_only.py, then
# synthetic_schedule_text_then_images.py. Offline, CPU is enough.
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/synthetic_schedule_images_from_start.py
include("quickstart.py")
out_dir = "out/synthetic_schedule_images_from_start"
text_corpora = ["synthetic"]
text_only_fraction = 0.0
image_text_share = 0.5
max_text_len = 40  # a line of the text corpus is a few clauses long
