# When to introduce images, synthetic version, arm 3 of 3, second run: the remaining 20% of the steps, image-text and
# text steps half and half, starting from the text tower that synthetic_schedule_text_only.py saved (the vision
# tower, cross-modal layers and heads start afresh, as when images are added after text-only pretraining).
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/synthetic_schedule_text_only.py
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/synthetic_schedule_text_then_images.py
include("synthetic_schedule_images_from_start.py")
out_dir = "out/synthetic_schedule_text_then_images"
text_tower = "out/synthetic_schedule_text_only/text_tower"
text_pretrained = True
tokenizer = ""  # the tokenizer saved beside the text tower
text_hidden_size = -1  # the sizes come from the saved tower
text_layers = -1
text_heads = -1
text_mlp_ratio = -1.0
max_steps = 120  # 20% of the other arms' 600
warmup_steps = 10
