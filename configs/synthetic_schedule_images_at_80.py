# When to introduce images, synthetic version, arm 2 of 3: text-only for the first 80% of the steps, then image-text
# and text steps half and half (otherwise synthetic_schedule_images_from_start.py).
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/synthetic_schedule_images_at_80.py
include("synthetic_schedule_images_from_start.py")
out_dir = "out/synthetic_schedule_images_at_80"
text_only_fraction = 0.8
