"""Fine-tune a vision-language encoder on one downstream task, from a pretraining checkpoint or from scratch.

    python finetune.py configs/nlvr2.py --init_from=out/freeze_vision --data_root=/data
    torchrun --standalone --nproc_per_node=2 finetune.py configs/vqa.py --init_from=out/freeze_vision/ckpt_100000.pt
    python finetune.py configs/synthetic_nlvr2.py          (offline: the task's synthetic version)

The config system and the training loop are pretraining's (config.py, engine.py). With init_from, the architecture keys
(engine.ARCHITECTURE_KEYS) come from the checkpoint's saved config, so one task config fine-tunes any pretrained
model, and its weights load with a check that exactly the new head was missing and only the pretraining heads
went unused; the image size may differ from pretraining (position embeddings are interpolated). Nothing is
frozen unless the config says so (freeze_text, freeze_vision, freeze_cross, freeze_modules, *_trainable_top);
encoder parts that a text-only or image-only task never runs take no part. Validation during training scores
at most eval_batches micro-batches per process of val_split; evaluate.py scores whole splits. The run
directory also gets labels.json (what the head's outputs mean), which evaluate.py reads back.

Start-up order, as in pretraining: config -> processes -> data and tokenizer -> model -> weights -> freeze ->
gradient checkpointing; engine.train does the DDP wrap, the optimizer over trainable parameters, resume, the loop.
"""

import json
import os
import sys

import torch

import batching
import data
import engine
import tasks
from alignment import new_adapter_keys
from config import command_line_overrides, load_config, main_guard
from encoders import build_encoder
from model import (apply_freezing, enable_gradient_checkpointing, format_parameter_summary, load_checked,
                   resize_position_embeddings)
from tasks.common import format_malformed_rows, malformed_rows, to_device, unused_modules

PRETRAINING_HEADS = ("mlm_head.", "itm_head.", "itc_head.")  # in a pretraining checkpoint, unused by downstream models
NEW_HEAD = "head."  # every downstream model's head (tasks/)


def load_pretrained(model, task, state, source):
    """Load a pretraining state dict: position tables resized to this image size, then checked loading
    (exactly the new head missing, and adapters this run adds to a model pretrained without them; nothing unused
    but the pretraining heads); returns a line saying so."""
    state = resize_position_embeddings(state, model)
    try:
        load_checked(model, state, expected_missing=(NEW_HEAD, *new_adapter_keys(model.state_dict(), state)),
                     allowed_unexpected=PRETRAINING_HEADS)
    except ValueError as e:
        raise ValueError(f"init_from {source}: {e}") from None
    head = task.init_head(model, state) or "new head initialised at random"
    return f"loaded {source}: encoder weights; {head}"


def main(argv):
    cfg = load_config(argv)
    task = tasks.get_task(cfg.task)
    pretrained, source = None, None
    if cfg.init_from:
        source = engine.resolve_checkpoint(cfg.init_from, "init_from")
        pretrained = engine.read_checkpoint(source, mmap=True)  # mmap: read what is used
        cfg = engine.adopt_architecture(cfg, pretrained["config"], source, verbose=int(os.environ.get("RANK", "0")) == 0)
    dist = engine.setup_distributed(cfg)
    engine.autocast_context(dist.device, cfg.dtype)  # refuses float16 on CPU before any work
    tokenizer = data.build_tokenizer(cfg)
    label_names = task.label_names(cfg)
    train_set = task.train_dataset(cfg, data.build_transform(cfg, train=True), label_names)
    val_split = task.validation_split(cfg)
    eval_transform = data.build_transform(cfg, train=False)
    val_set = task.eval_dataset(cfg, val_split, eval_transform, label_names)
    task.check_evaluation_images(cfg, val_split, val_set, eval_transform, label_names)

    malformed = malformed_rows(train_set, val_set)  # rows the readers skipped, reported at start and in the log
    towers = pretrained.get("tower_configs") if pretrained else None  # no need for the towers' source
    model = task.build_model(build_encoder(cfg, len(tokenizer), towers), label_names)
    resuming = cfg.resume and engine.latest_checkpoint(cfg.out_dir) is not None  # engine.train restores it
    loaded = load_pretrained(model, task, pretrained["model"], source) if pretrained and not resuming else None
    del pretrained
    apply_freezing(model, cfg)  # freeze, then checkpointing, then (in engine.train) DDP and the optimizer
    unused = unused_modules(model, task.inputs)
    for name in unused:
        model.get_submodule(name).requires_grad_(False)
    model.frozen_modules += unused
    engine.require_trainable(model)
    lr_scales = engine.lr_scales(cfg, model, command_line_overrides(argv))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(dist.device)
    if dist.master:
        print(loaded or ("resuming from " + cfg.out_dir if resuming else "from scratch: no init_from"))
        print(format_parameter_summary(model))
        if unused:
            print(f"not run by {task.name} ({task.inputs} only), so not trained: {', '.join(unused)}")
        print(f"task {task.name}: {len(train_set)} training items from {task.training_splits(cfg)}, "
              f"validation on {val_split} ({len(val_set)} items), {len(label_names)} labels")
        for line in format_malformed_rows(malformed):
            print(line)

    loader = batching.build_loader(train_set, cfg, dist.rank, dist.world_size, cfg.seed, task.train_collate(tokenizer, cfg))

    def prepare_batch(batch, *key):  # per-step draws (retrieval negatives) seeded by the batch's place in the run
        return to_device(task.prepare(batch, engine.batch_generator(cfg.seed, *key), cfg), dist.device)

    def evaluate(model):  # engine.train calls it on every process in eval mode, under no_grad and autocast
        max_items = cfg.eval_batches * cfg.micro_batch_size * dist.world_size
        return task.evaluate(model, val_set, val_split, tokenizer, cfg, dist, max_items=max_items)[0]

    if dist.master:  # only once data and model are known good: bad input leaves nothing behind
        os.makedirs(cfg.out_dir, exist_ok=True)
        path = os.path.join(cfg.out_dir, "labels.json")
        with open(path + ".tmp", "w") as f:
            json.dump(label_names, f)
        os.replace(path + ".tmp", path)

    def first_log_line_notes():  # the skipped rows go into the run's first training log line
        notes = {"malformed_rows": dict(malformed)} if malformed else {}
        malformed.clear()
        return notes

    engine.train(cfg, dist, model, loader, prepare_batch, evaluate, extra_log=first_log_line_notes,
                 lr_scales=lr_scales)
    engine.cleanup_distributed()


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
