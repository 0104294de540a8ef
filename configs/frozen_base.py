# Paper experiment 1, the large model: ELECTRA-Base + ViT-Base towers, both frozen, 10 cross-modal layers.
# Over 210M parameters in all, under 27M trainable (LXMERT cross-modal layers + heads: 26.9M, as the paper says);
# the paper reports it fits the memory of the small unfrozen baseline and was best on 2 of its 3 downstream tasks.
# Tower and learning rate are the original's (its vitbase_fr_electrabase_fr config), and so is its ImageNet
# normalisation, although this ViT was trained on [-1, 1] inputs.
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/frozen_base.py --data_root=/path/to/data
include("freeze_none.py")
out_dir = "out/frozen_base"
text_tower = "google/electra-base-discriminator"
vision_tower = "google/vit-base-patch16-224"
cross_layers = 10
lr = 7.5e-5
freeze_text = True
freeze_vision = True
