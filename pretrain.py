"""Pretrain a vision-language encoder with masked language modelling (MLM), image-text matching (ITM) and the
image-text contrastive loss (ITC; a dual encoder trains by ITC alone).

    python pretrain.py configs/quickstart.py [--key=value ...]
    torchrun --standalone --nproc_per_node=2 pretrain.py configs/freeze_vision.py

Start-up order: config -> processes -> tokenizer -> model -> freeze -> gradient checkpointing -> data (so
impossible settings fail before any data work), then engine.train does the DDP wrap, the optimizer over
trainable parameters, resume and the loop.
"""

import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as tdist

import batching
import data
import engine
from config import command_line_overrides, load_config, main_guard
from model import (PretrainModel, apply_freezing, build_pretrain_model, enable_gradient_checkpointing,
                   format_parameter_summary)


def make_prepare_batch(cfg, tokenizer_info, device):
    def prepare_batch(batch, *key):
        g = engine.batch_generator(cfg.seed, *key)
        mlm_input_ids, mlm_labels = batching.mask_tokens(batch["input_ids"], batch["special_tokens_mask"],
                                                     batch["word_ids"], tokenizer_info, cfg.mlm_prob,
                                                     cfg.whole_word_mask, g)
        batch = dict(batch, mlm_input_ids=mlm_input_ids, mlm_labels=mlm_labels)
        if "image_ids" in batch:  # a text-only batch (batching.TextCollator) has no pictures to pair
            batch["itm_image_index"], batch["itm_labels"] = batching.sample_itm_pairs(batch["image_ids"],
                                                                                  cfg.itm_neg_prob, g)
            if cfg.itm_hard_negatives:  # where contrastive.draw_hard_negatives falls in each caption's distribution
                batch["itm_negative_draw"] = torch.rand(len(batch["itm_labels"]), generator=g)
        # on the host, where the masks are drawn; a text-only batch reads every labelled position
        batch["mlm_positions"] = PretrainModel.mlm_positions(mlm_labels, batch.get("itm_labels"),
                                                             cfg.pretrain_pass if "image_ids" in batch else "separate")
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return prepare_batch


def make_evaluate(cfg, dist, val_loader, prepare_batch):
    """Held-out MLM, ITM and ITC accuracy over the same `eval_batches` batches (same masks) every time, summed
    over all processes before dividing (ITC: in-batch retrieval over each global micro-batch)."""

    def evaluate(model):  # engine.train calls it in eval mode, under no_grad and autocast
        val_loader.load_state_dict({"epoch": 0, "batches_done": 0})
        batches = iter(val_loader)
        totals = torch.zeros(9, dtype=torch.float64, device=dist.device)  # mlm correct, n, loss*n; itm ...; itc ...
        for i in range(min(cfg.eval_batches, val_loader.batches_per_epoch)):  # one pass at most
            batch = prepare_batch(next(batches), "eval", i * dist.world_size + dist.rank)
            out = model(batch)
            n_mlm = torch.tensor(len(batch["mlm_positions"]), device=dist.device)  # the targets mlm_acc is over
            n_itm = torch.tensor(len(batch["itm_labels"]), device=dist.device)
            if "mlm_acc" in out:
                totals[:3] += torch.stack([out["mlm_acc"] * n_mlm, n_mlm, out["mlm_loss"] * n_mlm]).double()
            if "itm_acc" in out:
                totals[3:6] += torch.stack([out["itm_acc"] * n_itm, n_itm, out["itm_loss"] * n_itm]).double()
            if "itc_acc" in out:
                totals[6:] += torch.stack([out["itc_acc"] * n_itm, n_itm, out["itc_loss"] * n_itm]).double()
        if dist.is_ddp:
            tdist.all_reduce(totals)
        metrics = {}
        for task, (correct, n, loss) in (("mlm", totals[:3]), ("itm", totals[3:6]), ("itc", totals[6:])):
            if n > 0:
                metrics[f"{task}_acc"] = (correct / n).item()
                metrics[f"{task}_loss"] = (loss / n).item()
        return metrics

    return evaluate


def build_data(cfg, dist, tokenizer, model):
    """(train set, held-out set or None, their loaders): what main trains on, and bench.py measures."""
    train_set, val_set = data.build_pretrain_datasets(cfg, data.build_transform(cfg, train=True),
                                                      data.build_transform(cfg, train=False))
    collate = batching.PretrainCollator(tokenizer, cfg.max_text_len, fixed_length=cfg.compile)
    if cfg.vision_feature_cache:  # the frozen tower's output instead of pictures (batching.py, section 4)
        autocast = engine.autocast_context(dist.device, cfg.dtype)
        train_set, val_set = (batching.with_cached_vision_features(dataset, cfg, model.encoder, dist.device, autocast,
                                                               dist.local_rank) if dataset else None
                              for dataset in (train_set, val_set))
        collate = batching.CachedFeatureCollator(tokenizer, cfg.max_text_len, fixed_length=cfg.compile)
    loader = batching.build_loader(train_set, cfg, dist.rank, dist.world_size, cfg.seed, collate)
    val_loader = batching.build_loader(val_set, cfg, dist.rank, dist.world_size, cfg.seed, collate) if val_set else None
    return train_set, val_set, loader, val_loader


def build_scheduled_data(cfg, dist, tokenizer, model):
    """(training loader, held-out loader or None, a line saying what is trained on) under the image-introduction
    schedule (batching.ImageTextSchedule): the image-text loader of build_data when some step uses it, the text loader
    over text_corpora when some step uses that, and a batching.ScheduledLoader choosing between them step by step.
    Without text-only steps this is build_data's loader, as before the schedule existed."""
    schedule = batching.ImageTextSchedule.from_config(cfg)
    loaders, val_loader, described = {}, None, []
    if schedule.uses_images:
        train_set, val_set, loaders["image_text"], val_loader = build_data(cfg, dist, tokenizer, model)
        described.append(f"image-text samples: {len(train_set)}, held-out samples: {len(val_set) if val_set else 0}")
    if not schedule.uses_text:
        return loaders["image_text"], val_loader, described[0]
    text_set = data.build_text_corpora(cfg)
    loaders["text"] = batching.build_loader(text_set, cfg, dist.rank, dist.world_size, cfg.seed,
                                        batching.TextCollator(tokenizer, cfg.max_text_len))
    described.append(f"text lines: {len(text_set)}; text-only until step {schedule.switch_step} of {cfg.max_steps}, "
                     f"then image-text for a share {cfg.image_text_share} of the steps")
    accum = cfg.batch_size // (cfg.micro_batch_size * dist.world_size)
    return batching.ScheduledLoader(loaders, schedule, accum), val_loader, "\n".join(described)


def save_text_tower(model, tokenizer, directory):
    """The two-tower model's text tower and the tokenizer as a Hugging Face directory (save_pretrained), which a
    later config can name as text_tower. Written beside `directory` and renamed onto it: never half-written."""
    directory = os.path.abspath(directory)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}-", dir=os.path.dirname(directory))
    try:
        model.encoder.text_tower.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if os.path.isdir(directory):  # the same run saving again (resumed after it finished)
            shutil.rmtree(directory)
        os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def main(argv):
    cfg = load_config(argv)
    dist = engine.setup_distributed(cfg)
    engine.autocast_context(dist.device, cfg.dtype)  # refuses float16 on CPU before any work
    tokenizer = data.build_tokenizer(cfg)
    resume_from = engine.latest_checkpoint(cfg.out_dir) if cfg.resume else None  # engine.train restores it
    # a resumed run builds its towers from the configs the checkpoint recorded: no hub or tower directory needed
    towers = engine.read_checkpoint(resume_from, mmap=True).get("tower_configs") if resume_from else None
    model = build_pretrain_model(cfg, len(tokenizer), towers)
    apply_freezing(model, cfg)  # freeze, then checkpointing, then (in engine.train) DDP and the optimizer
    engine.require_trainable(model)  # an all-frozen model is refused before any data is read or generated
    lr_scales = engine.lr_scales(cfg, model, command_line_overrides(argv))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(dist.device)

    loader, val_loader, described = build_scheduled_data(cfg, dist, tokenizer, model)
    if dist.master:
        print(format_parameter_summary(model))
        print(described)

    prepare_batch = make_prepare_batch(cfg, data.TokenizerInfo.from_tokenizer(tokenizer), dist.device)
    evaluate = make_evaluate(cfg, dist, val_loader, prepare_batch) if val_loader else None
    # A text-only step leaves the vision tower, the cross-modal layers and the ITM head without gradients, and DDP
    # then needs find_unused_parameters=True: it finds the parameters a step did not use, and every rank leaves their
    # .grad None (all ranks draw the same kind of step), so AdamW skips them exactly as in a single process.
    # static_graph=True would assume every step uses the same parameters, which is untrue here; touching the unused
    # ones with a zero-weighted term would give them zero gradients instead, which AdamW does not skip: its
    # decoupled weight decay would shrink the vision tower through the text-only phase, and momentum would keep
    # moving it on text-only steps after the switch.
    mixed = isinstance(loader, batching.ScheduledLoader)
    engine.train(cfg, dist, model, loader, prepare_batch, evaluate, extra_log=loader.pop_mix if mixed else None,
                 lr_scales=lr_scales, find_unused_parameters=mixed)
    if cfg.save_text_tower and dist.master:
        print(f"text tower saved to {save_text_tower(model, tokenizer, cfg.save_text_tower)}")
    engine.cleanup_distributed()


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
