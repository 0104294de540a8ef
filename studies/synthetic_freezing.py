# Study 1, synthetic (the paper's experiment 1): freezing the towers of the two-tower model during MLM + ITM
# pretraining, starting from the synthetic pretrained towers: nothing frozen, text frozen, vision frozen, both frozen;
# then every model fine-tuned (nothing frozen) on the four synthetic tasks. 3 seeds.
#   python study.py studies/synthetic_freezing.py
include("synthetic_common.py")
_two_tower = ("../configs/quickstart.py", {**_pretrain, **_pretrained_text, **_pretrained_vision})
variants = {
    "none": _two_tower,
    "text": (_two_tower[0], {**_two_tower[1], "freeze_text": True}),
    "vision": (_two_tower[0], {**_two_tower[1], "freeze_vision": True}),
    "both": (_two_tower[0], {**_two_tower[1], "freeze_text": True, "freeze_vision": True}),
}
compare = [("text", "none"), ("vision", "none"), ("both", "none")]
