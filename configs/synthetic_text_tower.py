# Text tower for the synthetic studies: text-only MLM on the synthetic world's text corpus (generated on first use),
# the quickstart's text tower (same sizes, so the study configs load it) and nothing else trained. Export it with
# `python export.py out/synthetic_text_tower --out DIR`: DIR/text_tower is then a config's text_tower, with
# text_pretrained=True and tokenizer="synthetic" (or DIR/tokenizer). Offline, a few minutes on a 2-core CPU.
#   python pretrain.py configs/synthetic_text_tower.py
include("quickstart.py")
out_dir = "out/synthetic_text_tower"
text_corpora = ["synthetic"]
text_only_fraction = 1.0
max_text_len = 40  # a line of the text corpus is a few clauses long
batch_size = 32
max_steps = 200
warmup_steps = 20
eval_interval = 100
ckpt_interval = 100
