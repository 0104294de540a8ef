# Shared part of the synthetic studies (each includes it; not a study by itself): a smaller synthetic world and model
# than the quickstart's, so that a study of 3 seeds, with 4 fine-tuning tasks per pretrained model, fits in about a
# quarter of an hour of a shared 2-core CPU; the pretrained towers; the seeds; the downstream tasks.
# The world: 400 pictures (the tasks' synthetic versions are made from it) in its own data_root.
_world = dict(data_root="data/synthetic_studies", synthetic_images=400)
# The model: the quickstart's two-tower shape at width 64 (2 heads), 2 text, 2 vision and 2 cross-modal layers,
# 48-pixel pictures in 8-pixel patches.
_towers_size = dict(_world, text_hidden_size=64, text_heads=2, vision_hidden_size=64, vision_heads=2, vision_layers=2,
                    image_size=48)
_cross_size = dict(cross_hidden=64, cross_heads=2, image_size=48)
# The towers, made first and shared: a text tower by text-only MLM on the synthetic text corpus, a vision tower by
# image-only training on the synthetic pictures (naming the kinds of object present and counting them), each
# exported (export.py) to TOWERS/<name>/{text_tower,vision_tower,tokenizer}
towers = {
    "text": ("pretrain", "../configs/synthetic_text_tower.py", _towers_size),
    "vision": ("finetune", "../configs/synthetic_vision_tower.py", _towers_size),
}
seeds = [0, 1, 2]
# Pretraining of every variant: 50 steps of 32 image-text pairs (1,600 samples), saved at the end
_pretrain = dict(_world, **_cross_size, batch_size=32, micro_batch_size=32, max_steps=50, warmup_steps=5,
                 log_interval=5, eval_interval=50, ckpt_interval=25)
# Fine-tuning every pretrained model on the synthetic NLVR2, SNLI-VE, RefCOCO and COCO retrieval, as in the paper's
# tables: 25 steps of 32 (800 items), validated once at the end on two batches; evaluate.py then scores each task's
# first evaluation split in full
_finetune = dict(_world, image_size=48, batch_size=32, micro_batch_size=32, max_steps=25, warmup_steps=3,
                 log_interval=5, eval_interval=25, eval_batches=2, ckpt_interval=25)
tasks = {
    "nlvr2": ("../configs/synthetic_nlvr2.py", dict(_finetune, eval_splits=["dev"])),
    "snli_ve": ("../configs/synthetic_snli_ve.py", dict(_finetune, eval_splits=["dev"])),
    "refcoco": ("../configs/synthetic_refcoco.py", dict(_finetune, eval_splits=["val"])),
    "retrieval": ("../configs/synthetic_coco_retrieval.py", dict(_finetune, eval_splits=["test"])),
}
headline = {"nlvr2": ["nlvr2_acc (dev)"], "snli_ve": ["snli_ve_acc (dev)"], "refcoco": ["refcoco_acc (val)"],
            "retrieval": ["coco_tr_r1 (test)", "coco_ir_r1 (test)"]}
# Starting from the towers: their weights and sizes (the synthetic tokenizer they were trained with)
_pretrained_text = dict(text_tower="{towers}/text/text_tower", text_pretrained=True, text_hidden_size=-1,
                        text_layers=-1, text_heads=-1, text_mlp_ratio=-1.0)
_pretrained_vision = dict(vision_tower="{towers}/vision/vision_tower", vision_pretrained=True, vision_hidden_size=-1,
                          vision_layers=-1, vision_heads=-1, vision_mlp_ratio=-1.0)
