# Synthetic LiT: synthetic_dual_full.py with the vision tower locked. Its towers are random (no download), so
# this checks the recipe end to end rather than LiT's gains, which need a pretrained vision tower.
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/synthetic_dual_lit.py
include("synthetic_dual_full.py")
out_dir = "out/synthetic_dual_lit"
freeze_vision = True
