"""Fine-tune a vision-language encoder on one downstream task, from a pretraining checkpoint or from scratch.

    python finetune.py configs/nlvr2.py --init_from=out/freeze_vision --data_root=/data
    torchrun --standalone --nproc_per_node=2 finetune.py configs/vqa.py --init_from=out/freeze_vision/ckpt_100000.pt
    python finetune.py configs/synthetic_nlvr2.py          (offline: the task's synthetic version)

The config system and the training loop are pretraining's (engine.py). With init_from, the architecture keys
(ARCHITECTURE_KEYS) come from the checkpoint's saved config, so one task config fine-tunes any pretrained
model, and its weights load with a check that exactly the new head was missing and only the pretraining heads
went unused; the image size may differ from pretraining (position embeddings are interpolated). Nothing is
frozen unless the config says so (freeze_text, freeze_vision, freeze_cross, freeze_modules, *_trainable_top);
encoder parts that a text-only or image-only task never runs take no part. Validation during training scores
at most eval_batches micro-batches per process of val_split; evaluate.py scores whole splits. The run
directory also gets labels.json (what the head's outputs mean), which evaluate.py reads back.

Start-up order, as in pretraining: config -> processes -> data and tokenizer -> model -> weights -> freeze ->
gradient checkpointing; engine.train does the DDP wrap, the optimizer over trainable parameters, resume, the loop.
"""

import dataclasses
import json
import os
import sys

import torch

import data
import engine
import tasks
from alignment import adapter_changes, new_adapter_keys
from model import (apply_freezing, build_encoder, enable_gradient_checkpointing, format_parameter_summary,
                   load_checked, resize_position_embeddings)
from pretrain import batch_generator

# The keys that decide the encoder's parameters and what its inputs mean: a fine-tuned model must have them as
# the pretrained one did. image_size is not among them (position embeddings are interpolated), nor is dropout.
ARCHITECTURE_KEYS = (
    "model_type", "text_tower", "text_pretrained", "vision_tower", "vision_pretrained", "tokenizer",
    "text_hidden_size", "text_layers", "text_heads", "text_mlp_ratio", "text_embedding_size",
    "vision_hidden_size", "vision_layers", "vision_heads", "vision_mlp_ratio", "patch_size",
    "cross_layers", "cross_hidden", "cross_heads", "cross_mlp_ratio", "onetower_stack", "pooling",
    "embed_dim", "embed_pooling", "image_mean", "image_std")
PRETRAINING_HEADS = ("mlm_head.", "itm_head.", "itc_head.")  # in a pretraining checkpoint, unused by downstream models
NEW_HEAD = "head."  # every downstream model's head (tasks.py)


def pretraining_checkpoint(init_from):
    """The checkpoint file init_from names: the file itself, or the newest ckpt_<step>.pt of a run directory."""
    if os.path.isdir(init_from):
        path = engine.latest_checkpoint(init_from)
        if path is None:
            raise FileNotFoundError(f"init_from={init_from!r}: no ckpt_<step>.pt in that directory")
        return path
    if not os.path.isfile(init_from):
        raise FileNotFoundError(f"init_from={init_from!r}: no such checkpoint file or run directory")
    return init_from


def adopt_architecture(cfg, saved, source, verbose=True):
    """cfg with the architecture keys of a pretraining run's saved config (printing those that change)."""
    missing = [key for key in ARCHITECTURE_KEYS if key not in saved]
    if missing:
        raise ValueError(f"{source}: its saved config lacks architecture keys {missing}")
    changes = {key: saved[key] for key in ARCHITECTURE_KEYS if saved[key] != getattr(cfg, key)}
    changes.update(adapter_changes(cfg, saved))
    if changes and verbose:
        print(f"architecture from {source}: " + ", ".join(f"{k}={v!r}" for k, v in changes.items()))
    return dataclasses.replace(cfg, **changes)


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
    cfg = engine.load_config(argv)
    task = tasks.get_task(cfg.task)
    pretrained, source = None, None
    if cfg.init_from:
        source = pretraining_checkpoint(cfg.init_from)
        pretrained = torch.load(source, map_location="cpu", weights_only=True, mmap=True)  # mmap: read what is used
        cfg = adopt_architecture(cfg, pretrained["config"], source, verbose=int(os.environ.get("RANK", "0")) == 0)
    dist = engine.setup_distributed(cfg)
    engine.autocast_context(dist.device, cfg.dtype)  # refuses float16 on CPU before any work
    tokenizer = data.build_tokenizer(cfg)
    label_names = task.label_names(cfg)
    train_set = task.train_dataset(cfg, data.build_transform(cfg, train=True), label_names)
    val_split = task.validation_split(cfg)
    val_set = task.eval_dataset(cfg, val_split, data.build_transform(cfg, train=False), label_names)

    model = task.build_model(build_encoder(cfg, len(tokenizer)), label_names)
    resuming = cfg.resume and engine.latest_checkpoint(cfg.out_dir) is not None  # engine.train restores it
    loaded = load_pretrained(model, task, pretrained["model"], source) if pretrained and not resuming else None
    del pretrained
    apply_freezing(model, cfg)  # freeze, then checkpointing, then (in engine.train) DDP and the optimizer
    unused = tasks.unused_modules(model, task.inputs)
    for name in unused:
        model.get_submodule(name).requires_grad_(False)
    model.frozen_modules += unused
    engine.require_trainable(model)
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

    loader = data.build_loader(train_set, cfg, dist.rank, dist.world_size, cfg.seed, task.train_collate(tokenizer, cfg))

    def prepare_batch(batch, *key):  # per-step draws (retrieval negatives) seeded by the batch's place in the run
        return tasks.to_device(task.prepare(batch, batch_generator(cfg.seed, *key), cfg), dist.device)

    def evaluate(model):  # engine.train calls it on every process in eval mode, under no_grad and autocast
        max_items = cfg.eval_batches * cfg.micro_batch_size * dist.world_size
        return task.evaluate(model, val_set, val_split, tokenizer, cfg, dist, max_items=max_items)[0]

    if dist.master:  # only once data and model are known good: bad input leaves nothing behind
        os.makedirs(cfg.out_dir, exist_ok=True)
        path = os.path.join(cfg.out_dir, "labels.json")
        with open(path + ".tmp", "w") as f:
            json.dump(label_names, f)
        os.replace(path + ".tmp", path)
    lr_scales = {"cross_modal": cfg.lr_mult_cross, "heads": cfg.lr_mult_heads}
    engine.train(cfg, dist, model, loader, prepare_batch, evaluate,
                 lr_scales={k: v for k, v in lr_scales.items() if k in model.module_groups()})
    engine.cleanup_distributed()


if __name__ == "__main__":
    engine.main_guard(lambda: main(sys.argv[1:]))
