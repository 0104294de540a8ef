# Paper experiment 2: the BERT-base-sized one-tower model with its layer stack initialised from pretrained
# ViT-Base (the original's google/vit-base-patch16-224); word-piece and patch embeddings start at random (fresh).
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/onetower_vit.py --data_root=/path/to/data
include("onetower_random.py")
out_dir = "out/onetower_vit"
onetower_stack = "vision"
vision_tower = "google/vit-base-patch16-224"
vision_pretrained = True
tokenizer = "bert-base-uncased"
patch_size = -1  # the ViT's own
