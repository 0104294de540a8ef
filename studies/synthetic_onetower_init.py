# Study 2, synthetic (the paper's experiment 2): how to initialise the one-tower model's layer stack: at random, from
# the synthetic text tower, or from the synthetic vision tower; word-piece and patch embeddings start afresh in all
# three (onetower_embeddings = "fresh", as in the paper). MLM + ITM pretraining, then the four synthetic tasks. 3 seeds.
#   python study.py studies/synthetic_onetower_init.py
include("synthetic_common.py")
_one_tower = dict(_pretrain, model_type="one_tower", onetower_embeddings="fresh", pooling="double")
_text_tower_size = {key: _towers_size[key] for key in ("text_hidden_size", "text_heads")}  # and 2 layers, as quickstart
variants = {
    # the text tower's architecture at random: the stack the "text" variant starts from, without its weights
    "random": ("../configs/quickstart.py", dict(_one_tower, onetower_stack="text", **_text_tower_size)),
    "text": ("../configs/quickstart.py", dict(_one_tower, onetower_stack="text", **_pretrained_text)),
    "vision": ("../configs/quickstart.py", dict(_one_tower, onetower_stack="vision", patch_size=-1,
                                                **_pretrained_vision)),
}
compare = [("text", "random"), ("vision", "random"), ("text", "vision")]
