# When to introduce images, arm 3 of 3, second run: the remaining 20% of the steps, image-text (COCO + VG) and text
# steps half and half, from the text tower schedule_text_only.py saved (the vision tower is DeiT-Tiny as in the
# other arms; the cross-modal layers and heads start afresh).
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/schedule_text_only.py --data_root=/data
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/schedule_text_then_images.py --data_root=/data
include("schedule_images_from_start.py")
out_dir = "out/schedule_text_then_images"
text_tower = "out/schedule_text_only/text_tower"
text_pretrained = True
max_steps = 20000  # 20% of the other arms' 100k
warmup_steps = 2000
