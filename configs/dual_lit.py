# LiT (Zhai et al. 2022): the dual encoder of dual_full.py with the pretrained vision tower locked (frozen, in eval
# mode, no autograd graph) and the text tower, both projections and the temperature trained.
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/dual_lit.py --data_root=/path/to/data
#   python evaluate.py out/dual_lit --zero_shot=true --task=cifar10
include("dual_full.py")
out_dir = "out/dual_lit"
freeze_vision = True
