# LilT (github codezakh/LilT): the dual encoder of dual_full.py with both pretrained towers frozen except their
# layer norms, their biases and bottleneck adapters (reduction 8) after the attention and MLP sublayers of every
# layer; the projections and the temperature train too: 4.0% of the 203M parameters (under LilT's 7%;
# tests/test_alignment.py counts it at these towers' exact sizes).
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/dual_lilt.py --data_root=/path/to/data
#   python evaluate.py out/dual_lilt --zero_shot=true --task=coco_retrieval
include("dual_full.py")
out_dir = "out/dual_lilt"
freeze_text = True
freeze_vision = True
text_align = ["layernorm", "bias", "adapter"]
vision_align = ["layernorm", "bias", "adapter"]
adapter_reduction = 8
lr = 5e-4  # few parameters, most of them new: a larger step than full training
