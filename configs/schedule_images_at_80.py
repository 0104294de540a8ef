# When to introduce images, arm 2 of 3: text-only for the first 80% of the steps (WikiText-103), then image-text
# (COCO + VG) and text steps half and half; the study's best schedule (otherwise schedule_images_from_start.py).
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/schedule_images_at_80.py --data_root=/data
include("schedule_images_from_start.py")
out_dir = "out/schedule_images_at_80"
text_only_fraction = 0.8
