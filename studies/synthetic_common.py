# Shared part of the synthetic studies (each includes it; not a study by itself): a smaller model than the
# quickstart's, so that a study of 3 seeds, with 4 fine-tuning tasks per pretrained model, fits in under an hour of a
# 2-core CPU; the pretrained towers; the seeds; the downstream tasks. Sized so that the variant with nothing frozen
# clears chance on every task (measured on one seed before the studies ran: NLVR2 0.69, SNLI-VE 0.71, RefCOCO 0.56,
# retrieval IR@1 0.15 with chance 0.01).
# The world: 2,000 pictures (the tasks' synthetic versions are made from it; its test split, 100 pictures and 500
# captions, is what retrieval is scored on) in its own data_root.
_world = dict(data_root="data/synthetic_studies", synthetic_images=2000)
# The model: the quickstart's two-tower shape at width 64 (2 heads), 2 text, 2 vision and 2 cross-modal layers,
# 48-pixel pictures in 8-pixel patches.
_towers_size = dict(_world, text_hidden_size=64, text_heads=2, vision_hidden_size=64, vision_heads=2, vision_layers=2,
                    image_size=48)
_cross_size = dict(cross_hidden=64, cross_heads=2, image_size=48)
# The towers, made first and shared: a text tower by text-only MLM on the synthetic text corpus, a vision tower by
# image-only training on the synthetic pictures (naming the kinds of object present and counting them), each
# exported (export.py) to TOWERS/<name>/{text_tower,vision_tower,tokenizer}
# (text: 1,000 steps of 32 lines; vision: 2,000 steps of 32 pictures, 35 epochs of the world's training pictures)
towers = {
    "text": ("pretrain", "../configs/synthetic_text_tower.py",
             dict(_towers_size, max_steps=1000, warmup_steps=50, eval_interval=1000, ckpt_interval=1000)),
    "vision": ("finetune", "../configs/synthetic_vision_tower.py",
               dict(_towers_size, max_steps=2000, warmup_steps=100, log_interval=250, eval_interval=1000,
                    ckpt_interval=1000)),
}
seeds = [0, 1, 2]
# Pretraining of every variant: 600 steps of 32 image-text pairs (19,200 samples) at peak lr 1e-3, saved halfway and
# at the end
_pretrain = dict(_world, **_cross_size, batch_size=32, micro_batch_size=32, max_steps=600, warmup_steps=60, lr=1e-3,
                 log_interval=50, eval_interval=600, ckpt_interval=300)
# Fine-tuning every pretrained model on the synthetic NLVR2, SNLI-VE, RefCOCO and COCO retrieval, as in the paper's
# tables: 150 steps of 32 (4,800 items) at peak lr 5e-4 (1e-3 for retrieval, the rate its learning test uses), the new
# head at 10x, validated once at the end on two batches; evaluate.py then scores each task's first evaluation split in full
_finetune = dict(_world, image_size=48, batch_size=32, micro_batch_size=32, max_steps=150, warmup_steps=15, lr=5e-4,
                 lr_mult_heads=10.0, log_interval=25, eval_interval=150, eval_batches=2, ckpt_interval=150)
tasks = {
    "nlvr2": ("../configs/synthetic_nlvr2.py", dict(_finetune, eval_splits=["dev"])),
    "snli_ve": ("../configs/synthetic_snli_ve.py", dict(_finetune, eval_splits=["dev"])),
    "refcoco": ("../configs/synthetic_refcoco.py", dict(_finetune, eval_splits=["val"])),
    "retrieval": ("../configs/synthetic_coco_retrieval.py", dict(_finetune, lr=1e-3, eval_splits=["test"])),
}
headline = {"nlvr2": ["nlvr2_acc (dev)"], "snli_ve": ["snli_ve_acc (dev)"], "refcoco": ["refcoco_acc (val)"],
            "retrieval": ["coco_tr_r1 (test)", "coco_ir_r1 (test)"]}
# Starting from the towers: their weights and sizes (the synthetic tokenizer they were trained with)
_pretrained_text = dict(text_tower="{towers}/text/text_tower", text_pretrained=True, text_hidden_size=-1,
                        text_layers=-1, text_heads=-1, text_mlp_ratio=-1.0)
_pretrained_vision = dict(vision_tower="{towers}/vision/vision_tower", vision_pretrained=True, vision_hidden_size=-1,
                          vision_layers=-1, vision_heads=-1, vision_mlp_ratio=-1.0)
