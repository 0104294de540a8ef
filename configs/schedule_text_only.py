# When to introduce images, arm 3 of 3, first run: text-only pretraining on WikiText-103 for 80% of the other arms'
# steps, saving the text tower (with the tokenizer) as a Hugging Face directory that the second run,
# schedule_text_then_images.py, names as its text_tower.
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/schedule_text_only.py --data_root=/data
include("schedule_images_from_start.py")
out_dir = "out/schedule_text_only"
text_only_fraction = 1.0
max_steps = 80000  # 80% of the other arms' 100k
save_text_tower = "out/schedule_text_only/text_tower"
