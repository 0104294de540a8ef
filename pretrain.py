"""Pretrain a vision-language encoder with masked language modelling (MLM), image-text matching (ITM) and the
image-text contrastive loss (ITC; a dual encoder trains by ITC alone).

    python pretrain.py configs/quickstart.py [--key=value ...]
    torchrun --standalone --nproc_per_node=2 pretrain.py configs/freeze_vision.py

Start-up order: config -> processes -> tokenizer -> model -> freeze -> gradient checkpointing -> data (so
impossible settings fail before any data work), then engine.train does the DDP wrap, the optimizer over
trainable parameters, resume and the loop.
"""

import hashlib
import sys

import torch
import torch.distributed as tdist

import data
import engine
from model import apply_freezing, build_pretrain_model, enable_gradient_checkpointing, format_parameter_summary


def batch_generator(seed, *key):
    """A generator seeded by (seed, *key): masking depends only on where a batch sits in the run, so a resumed
    run masks exactly as an uninterrupted one, and one process or two mask the same global micro-batch alike.
    blake2b, not hash(): Python salts the hash of a string ("eval") differently in every process."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % (2 ** 63))


def make_prepare_batch(cfg, tokenizer_info, device):
    def prepare_batch(batch, *key):
        g = batch_generator(cfg.seed, *key)
        mlm_input_ids, mlm_labels = data.mask_tokens(batch["input_ids"], batch["special_tokens_mask"],
                                                     batch["word_ids"], tokenizer_info, cfg.mlm_prob,
                                                     cfg.whole_word_mask, g)
        itm_image_index, itm_labels = data.sample_itm_pairs(batch["image_ids"], cfg.itm_neg_prob, g)
        batch = dict(batch, mlm_input_ids=mlm_input_ids, mlm_labels=mlm_labels,
                     itm_image_index=itm_image_index, itm_labels=itm_labels)
        if cfg.itm_hard_negatives:  # where contrastive.draw_hard_negatives falls in each caption's distribution
            batch["itm_negative_draw"] = torch.rand(len(itm_labels), generator=g)
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
            n_mlm = (batch["mlm_labels"] != -100).sum()
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
    collate = data.PretrainCollator(tokenizer, cfg.max_text_len)
    if cfg.vision_feature_cache:  # the frozen tower's output instead of pictures (data.py, section 12)
        autocast = engine.autocast_context(dist.device, cfg.dtype)
        train_set, val_set = (data.with_cached_vision_features(dataset, cfg, model.encoder, dist.device, autocast,
                                                               dist.local_rank) if dataset else None
                              for dataset in (train_set, val_set))
        collate = data.CachedFeatureCollator(tokenizer, cfg.max_text_len)
    loader = data.build_loader(train_set, cfg, dist.rank, dist.world_size, cfg.seed, collate)
    val_loader = data.build_loader(val_set, cfg, dist.rank, dist.world_size, cfg.seed, collate) if val_set else None
    return train_set, val_set, loader, val_loader


def main(argv):
    cfg = engine.load_config(argv)
    dist = engine.setup_distributed(cfg)
    engine.autocast_context(dist.device, cfg.dtype)  # refuses float16 on CPU before any work
    tokenizer = data.build_tokenizer(cfg)
    model = build_pretrain_model(cfg, len(tokenizer))
    apply_freezing(model, cfg)  # freeze, then checkpointing, then (in engine.train) DDP and the optimizer
    engine.require_trainable(model)  # an all-frozen model is refused before any data is read or generated
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(dist.device)

    train_set, val_set, loader, val_loader = build_data(cfg, dist, tokenizer, model)
    if dist.master:
        print(format_parameter_summary(model))
        print(f"train samples: {len(train_set)}, held-out samples: {len(val_set) if val_set else 0}")

    prepare_batch = make_prepare_batch(cfg, data.TokenizerInfo.from_tokenizer(tokenizer), dist.device)
    evaluate = make_evaluate(cfg, dist, val_loader, prepare_batch) if val_loader else None
    lr_scales = {"cross_modal": cfg.lr_mult_cross, "heads": cfg.lr_mult_heads}  # a dual encoder has no cross_modal
    engine.train(cfg, dist, model, loader, prepare_batch, evaluate,
                 lr_scales={k: v for k, v in lr_scales.items() if k in model.module_groups()})
    engine.cleanup_distributed()


if __name__ == "__main__":
    engine.main_guard(lambda: main(sys.argv[1:]))
