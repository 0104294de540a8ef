# Shared part of the synthetic studies (each includes it): the pretrained towers they start from, the seeds and the
# downstream tasks, all on the synthetic world, offline. Not a study by itself.
# The towers: a text tower by text-only MLM on the synthetic text corpus and a vision tower by image-only training on
# the synthetic pictures, each exported (export.py) to OUT/towers/<name>/{text_tower,vision_tower,tokenizer}.
towers = {
    "text": ("pretrain", "../configs/synthetic_schedule_text_only.py", {"max_steps": 5, "save_text_tower": ""}),
    "vision": ("pretrain", "../configs/quickstart.py", {"max_steps": 5}),
}
seeds = [0, 1, 2]
# Fine-tuning every pretrained model on the synthetic NLVR2, SNLI-VE, RefCOCO and COCO retrieval, as in the paper's
# tables; each scored on its first evaluation split
_finetune = {"max_steps": 150, "warmup_steps": 15, "log_interval": 25, "eval_interval": 150, "ckpt_interval": 50}
tasks = {
    "nlvr2": ("../configs/synthetic_nlvr2.py", {**_finetune, "eval_splits": ["dev"]}),
    "snli_ve": ("../configs/synthetic_snli_ve.py", {**_finetune, "eval_splits": ["dev"]}),
    "refcoco": ("../configs/synthetic_refcoco.py", {**_finetune, "eval_splits": ["val"]}),
    "retrieval": ("../configs/synthetic_coco_retrieval.py", {**_finetune, "eval_splits": ["test"]}),
}
headline = {"nlvr2": ["nlvr2_acc (dev)"], "snli_ve": ["snli_ve_acc (dev)"], "refcoco": ["refcoco_acc (val)"],
            "retrieval": ["coco_tr_r1 (test)", "coco_ir_r1 (test)"]}
# A model starting from both towers: their weights and sizes, the synthetic tokenizer they were trained with
_pretrained_text = dict(text_tower="{towers}/text/text_tower", text_pretrained=True, text_hidden_size=-1,
                        text_layers=-1, text_heads=-1, text_mlp_ratio=-1.0)
_pretrained_vision = dict(vision_tower="{towers}/vision/vision_tower", vision_pretrained=True, vision_hidden_size=-1,
                          vision_layers=-1, vision_heads=-1, vision_mlp_ratio=-1.0)
# Pretraining of every variant
_pretrain = {"max_steps": 200, "warmup_steps": 20, "log_interval": 20, "eval_interval": 200, "ckpt_interval": 50}
