# When to introduce images, synthetic version, arm 3 of 3, first run: text-only pretraining for 80% of the other arms'
# steps, saving the text tower (with the tokenizer) as a Hugging Face directory that the second run,
# synthetic_schedule_text_then_images.py, names as its text_tower.
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/synthetic_schedule_text_only.py
include("synthetic_schedule_images_from_start.py")
out_dir = "out/synthetic_schedule_text_only"
text_only_fraction = 1.0
max_steps = 480  # 80% of the other arms' 600
save_text_tower = "out/synthetic_schedule_text_only/text_tower"
