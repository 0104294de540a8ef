# Synthetic LilT: synthetic_dual_full.py with both (random) towers frozen except layer norms, biases and adapters.
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/synthetic_dual_lilt.py
include("synthetic_dual_full.py")
out_dir = "out/synthetic_dual_lilt"
freeze_text = True
freeze_vision = True
text_align = ["layernorm", "bias", "adapter"]
vision_align = ["layernorm", "bias", "adapter"]
adapter_reduction = 4
lr = 2e-3
