# Study 3, synthetic (LilT): aligning the synthetic pretrained towers as a dual encoder by the contrastive loss (ITC)
# alone, training everything against training only the towers' layer norms, only their biases, or only bottleneck
# adapters (the projections and the temperature train in every variant); scored by zero-shot retrieval on the
# synthetic COCO test split, since a dual encoder is not fine-tuned on retrieval. Results: trainable share against
# recall. 3 seeds.
#   python study.py studies/synthetic_lilt.py
include("synthetic_common.py")
tasks = {}
downstream = {"retrieval": ("coco_retrieval", {"synthetic_task": True, "eval_splits": ["test"]})}
headline = {"retrieval": ["coco_tr_r1 (test)", "coco_ir_r1 (test)", "coco_tr_r5 (test)", "coco_ir_r5 (test)"]}
# ITC alone is cheaper than MLM + ITM: 300 steps of 32, at the config's peak lr (5e-4) for full training
_dual = dict(_pretrain, **_pretrained_text, **_pretrained_vision, max_steps=300, warmup_steps=30, lr=5e-4,
             eval_interval=300, ckpt_interval=150)
_aligned = dict(_dual, freeze_text=True, freeze_vision=True, adapter_reduction=4, lr=2e-3)  # synthetic_dual_lilt.py's
variants = {
    "full": ("../configs/synthetic_dual_full.py", _dual),
    "layernorm": ("../configs/synthetic_dual_full.py", dict(_aligned, text_align=["layernorm"],
                                                            vision_align=["layernorm"])),
    "bias": ("../configs/synthetic_dual_full.py", dict(_aligned, text_align=["bias"], vision_align=["bias"])),
    "adapter": ("../configs/synthetic_dual_full.py", dict(_aligned, text_align=["adapter"], vision_align=["adapter"])),
}
compare = [("layernorm", "full"), ("bias", "full"), ("adapter", "full")]
