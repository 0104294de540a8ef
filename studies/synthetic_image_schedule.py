# Study 4, synthetic (Keh et al. 2025): when images enter pretraining. The two-tower model from scratch on the synthetic
# captions and text corpus, half the steps image-text, half text-only: from the start (0%), from 80% of the steps, or
# after a text-only run (80% of the steps) whose text tower a second run (the last 20%) starts from, with the
# vision tower, cross-modal layers and heads afresh. Then the four synthetic tasks. 3 seeds.
#   python study.py studies/synthetic_image_schedule.py
include("synthetic_common.py")
towers = {}  # every arm trains its towers from scratch
# more steps than the studies that start from towers: 1,000, half of them text-only (cheap), 32,000 samples in all
_steps = 1000
_scratch = dict(_pretrain, **_towers_size, max_steps=_steps, warmup_steps=_steps // 10, log_interval=50,
                eval_interval=_steps, ckpt_interval=_steps // 2)
variants = {
    "from_start": ("../configs/synthetic_schedule_images_from_start.py", _scratch),
    "at_80": ("../configs/synthetic_schedule_images_at_80.py", _scratch),
    "text_then_images": [
        ("../configs/synthetic_schedule_text_only.py",
         dict(_scratch, max_steps=_steps * 4 // 5, save_text_tower="{run}/text_tower")),
        ("../configs/synthetic_schedule_text_then_images.py",
         dict(_scratch, max_steps=_steps // 5, warmup_steps=_steps // 50, eval_interval=_steps // 5,
              text_tower="{previous}/text_tower", text_hidden_size=-1, text_layers=-1, text_heads=-1,
              text_mlp_ratio=-1.0)),
    ],
}
compare = [("at_80", "from_start"), ("text_then_images", "from_start"), ("at_80", "text_then_images")]
