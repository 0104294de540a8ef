# Vision tower for the synthetic studies: image-only training of the quickstart's vision tower (same sizes, so the
# study configs load it) on the synthetic world's pictures, naming every colour, shape and kind of object present and
# the number of objects (task "scenes", multi-label). Export it with
# `python export.py out/synthetic_vision_tower --out DIR`: DIR/vision_tower is then a config's vision_tower, with
# vision_pretrained=True and the vision_* sizes at -1 (the tower's own). Offline, a few minutes on a 2-core CPU.
#   python finetune.py configs/synthetic_vision_tower.py
include("synthetic_finetune.py")
task = "scenes"
out_dir = "out/synthetic_vision_tower"
batch_size = 32
max_steps = 200
warmup_steps = 20
lr = 1e-3
eval_interval = 100
ckpt_interval = 100
