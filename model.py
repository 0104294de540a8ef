"""The models that train: an encoder (encoders.py) with its heads. PretrainModel (MLM + ITM, and ITC through
contrastive.py), TaskModel (an encoder plus one downstream head), the heads themselves (MLM, ITM, classifier),
freezing and gradient checkpointing, checked weight loading, position embeddings resized for another image size,
and models loaded back from an export.py directory.
"""

import json
import math
import os
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model

from alignment import train_alignment_parameters
from encoders import TwoTowerEncoder, build_encoder, interpolate_positions
from towers import init_new, requires_grad, tower_parts

# -----------------------------------------------------------------------------
# Heads


class MLMHead(nn.Module):
    """Masked language modelling: transform, then vocabulary logits only at the given positions."""

    def __init__(self, dim, vocab_size, bert_init=False):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.decoder = nn.Linear(dim, vocab_size)
        init_new(self, bert_init)

    def forward(self, text_feats, positions):  # (B, T, D), (N,) indices into the B*T positions -> (N, V) float32
        # Gathering first avoids paying the vocabulary projection for ~85% of positions that carry no label.
        x = self.transform(text_feats.flatten(0, 1).index_select(0, positions))
        # The decoder stays in float32 under autocast. Its product has only the N labelled rows, while casting the
        # (V, D) weight to bfloat16 and its gradient back touches V x D elements twice a step: on the CPU the two
        # casts of the paper's 30522 x 256 weight took 61 ms a step, several times the product.
        with torch.autocast(x.device.type, enabled=False):
            return self.decoder(x.float())


class ClassifierHead(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear, the usual VL downstream head."""

    def __init__(self, in_dim, num_classes, hidden_dim=None, bert_init=False):
        super().__init__()
        hidden_dim = hidden_dim or 2 * in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, num_classes))
        init_new(self, bert_init)

    def forward(self, x):  # (B, in_dim) -> (B, num_classes)
        return self.net(x)


# -----------------------------------------------------------------------------
# Freezing (explicit requires_grad, frozen parts kept in eval mode unless frozen_dropout) and checkpointing


class FreezableModel(nn.Module):
    """Base of the top-level models: named module groups, and frozen modules that stay in eval mode (with
    frozen_dropout they follow train/eval like the rest, so their dropout is on in training, as the original)."""

    def __init__(self):
        super().__init__()
        self.frozen_modules = []  # dotted names, set by apply_freezing
        self.frozen_dropout = False  # set by apply_freezing: True leaves frozen modules in the caller's mode

    def train(self, mode=True):
        super().train(mode)
        if not self.frozen_dropout:  # no dropout or batch statistics in a frozen module, whatever the caller asks
            for name in self.frozen_modules:
                self.get_submodule(name).eval()
        return self

    def tower_configs(self):
        """{modality: Hugging Face config dict} of the towers inside: what build_encoder needs to rebuild them
        without their source (checkpoints record it)."""
        encoder = self.encoder
        if hasattr(encoder, "text_tower"):  # two towers: two-tower or dual encoder
            return {"text": encoder.text_tower.config.to_dict(), "vision": encoder.vision_tower.config.to_dict()}
        return {encoder.stack_modality: encoder.stack_config.to_dict()}

    def module_groups(self):
        groups = dict(self.encoder.module_groups())
        groups["heads"] = nn.ModuleList(self.heads())  # a view for counting and optimizer groups, not registered
        return groups

    def heads(self):
        """The task heads on top of the encoder, in order (each subclass names its own)."""
        raise NotImplementedError

    def unused_modules(self):
        """Dotted names of modules no loss of this model reads, which apply_freezing freezes."""
        return []


def _below_top(embeddings, layers, k):
    """Names frozen when only the top k layers (and what sits above them) train; k < 0 freezes nothing."""
    return [] if k < 0 else embeddings + layers[:max(len(layers) - k, 0)]


def apply_freezing(model, cfg):
    """Set requires_grad on every parameter explicitly (so it is idempotent) and record the frozen modules.

    Keys: freeze_text, freeze_vision, freeze_cross (two-tower), text_trainable_top / vision_trainable_top
    (train only the top k layers of a tower, or of a one-tower stack), freeze_modules (any dotted names). The
    modules no loss reads (model.unused_modules()) are frozen whatever the keys say.
    """
    model.requires_grad_(True)
    enc = model.encoder
    frozen = model.unused_modules()
    if hasattr(enc, "text_tower"):  # two towers: two-tower or dual encoder
        for modality in ("text", "vision"):
            name = f"encoder.{modality}_tower"
            if getattr(cfg, f"freeze_{modality}"):
                frozen.append(name)
            else:
                embeddings, layers, _ = tower_parts(model.get_submodule(name))
                k = getattr(cfg, f"{modality}_trainable_top")
                frozen += [f"{name}.{n}" for n in _below_top(embeddings, layers, k)]
        if cfg.freeze_cross and not isinstance(enc, TwoTowerEncoder):
            raise ValueError("freeze_cross: a dual encoder has no cross-modal layers (freeze_modules freezes its "
                             "projections by name)")
        if cfg.freeze_cross:
            frozen += [f"encoder.{n}" for n in ("text_proj", "image_proj", "modality_type", "cross_layers",
                                                "text_norm", "image_norm", "text_pooler", "image_pooler")]
    else:
        if cfg.freeze_text or cfg.freeze_vision or cfg.freeze_cross:
            raise ValueError("freeze_text / freeze_vision / freeze_cross apply to two-tower models; for a one-tower "
                             "model use freeze_modules or text_trainable_top / vision_trainable_top")
        embeddings = [n for n in ("text_embeddings", "text_embeddings_project", "image_embeddings", "modality_type")
                      if getattr(enc, n) is not None]
        layers = [f"layers.{i}" for i in range(len(enc.layers))]
        k = getattr(cfg, f"{cfg.onetower_stack}_trainable_top")
        frozen += [f"encoder.{n}" for n in _below_top(embeddings, layers, k)]
    for name in cfg.freeze_modules:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"freeze_modules: no module named '{name}' in the model") from None
        frozen.append(name)
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    train_alignment_parameters(enc, cfg)  # LilT: layer norms, biases, adapters train even inside frozen parts
    # a module that still trains something runs in train mode
    model.frozen_modules = [n for n in dict.fromkeys(frozen) if not requires_grad(model.get_submodule(n))]
    model.frozen_dropout = cfg.frozen_dropout  # True: the original's behaviour, dropout on in frozen towers
    model.train(model.training)


def enable_gradient_checkpointing(model):
    """Non-reentrant checkpointing of every trainable stack (the reentrant kind yields no gradients when a
    block's inputs do not require grad, exactly the case above frozen embeddings). Call after freezing."""
    enc = model.encoder
    if hasattr(enc, "text_tower"):  # two-tower or dual encoder
        for tower in (enc.text_tower, enc.vision_tower):
            if requires_grad(tower):
                tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    enc.gradient_checkpointing = True


def parameter_summary(model):
    """Rows of (group, trainable, total) parameter counts per module group, plus a total row."""
    rows = []
    for name, module in model.module_groups().items():
        params = list(module.parameters())
        rows.append((name, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    return rows


def format_parameter_summary(model):
    lines = [f"{'module':<14} {'trainable':>13} {'total':>13} {'share':>8}"]
    lines += [f"{name:<14} {trainable:>13,} {total:>13,} {trainable / max(total, 1):>8.2%}"
              for name, trainable, total in parameter_summary(model)]
    if model.frozen_modules:
        lines.append("frozen: " + ", ".join(model.frozen_modules))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Top-level models


class PretrainModel(FreezableModel):
    """Encoder + MLM and ITM heads; the loss weights are applied here.

    The image side runs once per step for both tasks (ITM negatives borrow another row's image features).
    pretrain_pass says how the text side and the cross-modal layers serve the two tasks:
      "separate"  MLM on the masked caption with its own image, ITM on the clean caption with the paired
                  image: the text tower on both captions (one call on the two stacked, see encode_captions) and two
                  cross-modal passes (the ViLT / METER recipe).
      "shared"    one pass of the masked caption with the paired image serves both: ITM reads the pooled
                  output, MLM the text features of matched pairs only (a mismatched picture would teach the
                  MLM head to ignore the image). One text-tower and one cross-modal pass: over a third fewer
                  FLOPs per step for the paper's two-tower model, and half the MLM targets per batch.
    Text-only batches (no "pixel_values" and no "image_feats": a text corpus, see batching.ScheduledLoader) train MLM
    on the text path alone, through the same MLM head: one-tower, the joint stack over word pieces with no patches;
    two-tower, the text tower, then text_proj and text_norm straight to the head, bypassing the cross-modal layers
    (encoder.fuse's unimodal path). The cross-modal layers are not run with an empty image stream because they
    have never learnt to: what a text-only step teaches is the text tower (what a later run can take as its
    text_tower) and the head's vocabulary, which image-text steps then share. The vision tower, image_proj, the
    cross-modal layers, the poolers and the ITM head get no gradient in such a step.
    With an ITC head (contrastive.ITCHead, itc_weight > 0), ITC compares the clean caption and the picture before
    fusion; the separate ITM pass reuses that text-tower output, and the head picks ITM's pictures.
    """

    PASSES = ("separate", "shared")

    def __init__(self, encoder, vocab_size, mlm_weight=1.0, itm_weight=1.0, pretrain_pass="separate",
                 itc_head=None, itc_weight=0.0):
        super().__init__()
        assert mlm_weight > 0 or itm_weight > 0 or itc_weight > 0, "at least one loss weight must be positive"
        if pretrain_pass not in self.PASSES:
            raise ValueError(f"pretrain_pass={pretrain_pass!r} is not one of {', '.join(self.PASSES)}")
        if pretrain_pass == "shared" and not (mlm_weight > 0 and itm_weight > 0):
            raise ValueError("pretrain_pass='shared' shares one pass between MLM and ITM: it needs mlm_weight > 0 "
                             "and itm_weight > 0")
        self.encoder = encoder
        self.mlm_weight, self.itm_weight = mlm_weight, itm_weight
        self.pretrain_pass = pretrain_pass
        self.mlm_head = MLMHead(encoder.dim, vocab_size, encoder.bert_init) if mlm_weight > 0 else None
        self.itm_head = init_new(nn.Linear(encoder.pooled_dim, 2), encoder.bert_init) if itm_weight > 0 else None
        self.itc_head, self.itc_weight = itc_head, itc_weight  # contrastive.ITCHead, or None

    def heads(self):
        return [h for h in (self.mlm_head, self.itm_head, self.itc_head) if h is not None]

    def unused_modules(self):
        """With itm_weight=0 the MLM loss reads only the fused text features: the encoder's modules beyond them
        never get a gradient. (With mlm_weight=0 the MLM head is not built, and ITM reads every other part.)
        Frozen, they stay out of the optimizer and out of DDP's gradient reduction, which would otherwise wait for
        their gradients and fail at the second step; find_unused_parameters=True would instead search the graph
        on every step. Nothing changes for a single process, where they got no gradient either. They keep their
        initial weights and are saved as any others, so fine-tuning loads such a checkpoint as usual."""
        if self.itm_head is not None:
            return []
        return [f"encoder.{name}" for name in self.encoder.beyond_text_features()]

    def encode_image(self, batch):
        """The batch's images, from the vision tower's cached output when the batch carries it ("image_feats",
        see batching.with_cached_vision_features), else through the tower."""
        if "image_feats" in batch:
            return self.encoder.project_image(batch["image_feats"])
        return self.encoder.encode_image(batch["pixel_values"])

    @staticmethod
    def mlm_positions(mlm_labels, itm_labels, pretrain_pass):
        """(N,) indices into the flattened (B*T) captions of the positions the MLM loss reads: the labelled ones,
        of matched pairs only in the shared pass. The batch carries them as "mlm_positions", computed where the
        masks are drawn (pretrain.make_prepare_batch, on the host): the head then gathers with an index of known
        size, where a boolean index on the GPU would wait for the device on every micro-step to learn N, and
        torch.compile would break its graph there. The optimizer step's gradient-norm check stays the one sync."""
        read = mlm_labels != -100
        if pretrain_pass == "shared":
            read = read & (itm_labels[:, None] == 1)
        return read.flatten().nonzero().squeeze(1)

    def mlm_outputs(self, text_feats, mlm_labels, positions):
        """{"mlm_loss", "mlm_acc"} from text features (B, T, D), labels (B, T) (-100 where unlabelled) and the (N,)
        flattened positions the loss reads (mlm_positions)."""
        logits = self.mlm_head(text_feats, positions)  # (N, V)
        targets = mlm_labels.flatten().index_select(0, positions)  # (N,)
        # sums over N targets, not means: with N = 0 the loss is still a (zero) function of the head, so DDP's
        # gradient hooks fire for it as on every other step, and no branch depends on N
        n = max(positions.shape[0], 1)
        return {"mlm_loss": F.cross_entropy(logits.float(), targets, reduction="sum") / n,
                "mlm_acc": (logits.argmax(-1) == targets).float().sum() / n}

    def encode_captions(self, batch, masked, clean):
        """(masked, clean): the batch's masked captions ("mlm_input_ids") and clean ones ("input_ids") through the
        encoder's text side, as Embedded (B, T, D), each None where not asked for. Asked for both, the text side
        runs once on the two stacked (2B, T): each caption attends within itself only, so this is two calls' result
        (dropout draws its masks differently, as between any two calls), with products twice as tall and the
        per-layer Python paid once."""
        mask = batch["attention_mask"]
        if masked and clean:
            both = self.encoder.encode_text(torch.cat([batch["mlm_input_ids"], batch["input_ids"]]),
                                            torch.cat([mask, mask]))
            B = mask.shape[0]
            return both.select(slice(None, B)), both.select(slice(B, None))
        return (self.encoder.encode_text(batch["mlm_input_ids"], mask) if masked else None,
                self.encoder.encode_text(batch["input_ids"], mask) if clean else None)

    def forward_text(self, batch):
        """MLM on a text-only batch, through the text path alone (see the class docstring)."""
        enc = self.encoder
        fused = enc.fuse(enc.encode_text(batch["mlm_input_ids"], batch["attention_mask"]), None)  # text_feats (B, T, D)
        out = self.mlm_outputs(fused.text_feats, batch["mlm_labels"], batch["mlm_positions"])
        out["loss"] = self.mlm_weight * out["mlm_loss"]
        return out

    def forward(self, batch):
        if "pixel_values" not in batch and "image_feats" not in batch:
            return self.forward_text(batch)
        enc = self.encoder
        image = self.encode_image(batch)  # (B, P, D), once for every task
        out, loss = {}, torch.zeros((), device=image.feats.device)
        paired = None
        # the masked caption serves MLM (and ITM too in the shared pass); the clean one ITC and a separate ITM pass
        masked, clean = self.encode_captions(
            batch, masked=self.mlm_head is not None,
            clean=self.itc_head is not None or (self.pretrain_pass == "separate" and self.itm_head is not None))
        if self.itc_head is not None:  # ITC on the clean caption and its picture, before fusion (ALBEF)
            itc, paired = self.itc_head(clean, image, batch)  # paired: ITM's pictures (hard negatives if asked)
            out.update(itc)
            loss = loss + self.itc_weight * itc["itc_loss"]
        if paired is None and self.itm_head is not None:
            paired = image.select(batch["itm_image_index"])
        if self.pretrain_pass == "shared":
            mlm_fused = itm_fused = enc.fuse(masked, paired, cls_only=("image",))
        else:
            if self.mlm_head is not None:  # MLM reads text features: only the image stream may stop at its CLS
                mlm_fused = enc.fuse(masked, image, cls_only=("image",))
            if self.itm_head is not None:  # ITM reads the pooled CLS pair only
                itm_fused = enc.fuse(clean, paired, cls_only=("text", "image"))
        if self.mlm_head is not None:
            out.update(self.mlm_outputs(mlm_fused.text_feats, batch["mlm_labels"], batch["mlm_positions"]))
            loss = loss + self.mlm_weight * out["mlm_loss"]
        if self.itm_head is not None:
            logits = self.itm_head(itm_fused.pooled)  # (B, 2)
            out["itm_loss"] = F.cross_entropy(logits.float(), batch["itm_labels"])
            out["itm_acc"] = (logits.argmax(-1) == batch["itm_labels"]).float().mean()
            loss = loss + self.itm_weight * out["itm_loss"]
        out["loss"] = loss
        return out


def compile_model(model, scope="model", backend="inductor"):
    """torch.compile in place (the state dict keeps its keys). scope "model": the whole model's forward, one
    graph; "cross_modal": each two-tower cross-modal layer alone, where most of the elementwise, normalisation
    and dropout work outside the matmuls is (the towers, Hugging Face modules, stay eager). The layers share one
    forward, so its graphs are compiled once for all of them: one for the inner layers and one for each set of
    rows the last layer updates (see TwoTowerEncoder.fuse)."""
    if scope == "model":
        model.compile(backend=backend)
        return
    encoders = [m for m in model.modules() if isinstance(m, TwoTowerEncoder)]
    if scope != "cross_modal" or not encoders:
        raise ValueError(f"compile_scope={scope!r}: 'model', or 'cross_modal' for a model with cross-modal layers")
    for encoder in encoders:
        for layer in encoder.cross_layers:
            layer.compile(backend=backend)


def build_pretrain_model(cfg, vocab_size, tower_configs=None):
    encoder = build_encoder(cfg, vocab_size, tower_configs)
    if cfg.model_type == "dual_encoder" or cfg.itc_weight > 0:
        from contrastive import build_contrastive_pretrain_model  # builds on this module: imported here, not above
        return build_contrastive_pretrain_model(cfg, encoder, vocab_size)
    return PretrainModel(encoder, vocab_size, cfg.mlm_weight, cfg.itm_weight, cfg.pretrain_pass)


# -----------------------------------------------------------------------------
# Weights


def load_checked(model, state_dict, expected_missing=(), allowed_unexpected=()):
    """Load non-strictly, then require that exactly the expected keys were missing.

    `expected_missing` / `allowed_unexpected` are key prefixes: e.g. a fine-tuning model loads a pretraining
    checkpoint expecting its new head ("head.") to be missing and the pretraining heads ("mlm_head.",
    "itm_head.") to be unused. Anything else missing or unexpected, or a shape mismatch, raises with the keys.
    """
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError("checkpoint does not fit this architecture; shape mismatch in: " + ", ".join(mismatched[:10]))
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(tuple(expected_missing))]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(tuple(allowed_unexpected))]
    absent = [p for p in expected_missing if not any(k.startswith(p) for k in result.missing_keys)]
    if missing or unexpected or absent:
        raise ValueError(f"checkpoint does not fit this architecture: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}, expected-missing prefixes that were present {absent}")
    return result


class TaskModel(FreezableModel):
    """Encoder + one classification head over the pooled output, for downstream tasks.

    `num_labels` classes, cross-entropy on `labels`; unimodal batches (no pixel_values or no input_ids) pool
    one CLS of width `encoder.dim`, so the head is sized by the task's inputs.
    """

    def __init__(self, encoder, num_labels, unimodal=False):
        super().__init__()
        self.encoder = encoder
        self.head = ClassifierHead(encoder.dim if unimodal else encoder.pooled_dim, num_labels,
                                   bert_init=encoder.bert_init)

    def heads(self):
        return [self.head]

    def logits(self, batch):  # -> (B, num_labels)
        out = self.encoder(batch.get("input_ids"), batch.get("attention_mask"), batch.get("pixel_values"))
        return self.head(out.pooled)

    def forward(self, batch):
        logits = self.logits(batch)
        return {"loss": F.cross_entropy(logits.float(), batch["labels"]),
                "acc": (logits.argmax(-1) == batch["labels"]).float().mean()}


# -----------------------------------------------------------------------------
# Fine-tuning at another image size


def _grid_prefix(old_tokens, new_tokens):
    """Tokens before the patch grid (CLS; DeiT adds a distillation token) when both counts are that many plus
    a square; None if no such count exists."""
    for prefix in (1, 2):
        if all(n > prefix and math.isqrt(n - prefix) ** 2 == n - prefix for n in (old_tokens, new_tokens)):
            return prefix
    return None


def resize_position_embeddings(state_dict, model):
    """A checkpoint's state dict with its image-position tables resized (bicubic) to the patch grid of `model`,
    so an encoder pretrained at one image size loads into one built for another, as MAE and ViLT fine-tune:
    absolute tables (1, prefix + g*g, D) (Hugging Face `*.position_embeddings`, the one-tower
    `image_embeddings.position`) and BEiT's relative bias tables ((2g-1)^2 + 3, heads). Everything else is
    returned as it was, so load_checked still reports any other mismatch."""
    own = model.state_dict()
    resized = dict(state_dict)
    for key, value in state_dict.items():
        if key not in own or own[key].shape == value.shape:
            continue
        target = own[key].shape
        if key.endswith(("position_embeddings", "image_embeddings.position")) and value.dim() == 3:
            prefix = _grid_prefix(value.shape[1], target[1])
            if prefix is not None and value.shape[2] == target[2]:
                grid = math.isqrt(target[1] - prefix)
                # the last prefix token stands in as interpolate_positions' CLS; any before it are kept as they are
                grid_part = interpolate_positions(value[:, prefix - 1:].float(), grid).to(value.dtype)
                resized[key] = torch.cat([value[:, :prefix - 1], grid_part], dim=1)
        elif key.endswith("relative_position_bias_table") and value.dim() == 2 and value.shape[1] == target[1]:
            old_side, new_side = math.isqrt(value.shape[0] - 3), math.isqrt(target[0] - 3)  # 2g - 1 relative offsets
            if old_side ** 2 + 3 != value.shape[0] or new_side ** 2 + 3 != target[0]:
                continue
            table = value[:-3].float().T.reshape(1, -1, old_side, old_side)  # (1, heads, 2g-1, 2g-1)
            table = F.interpolate(table, size=(new_side, new_side), mode="bicubic", align_corners=False)
            resized[key] = torch.cat([table.reshape(-1, new_side * new_side).T.to(value.dtype), value[-3:]])
    return resized


# -----------------------------------------------------------------------------
# Exported models (export.py writes them): no tower source needed to load one

EXPORT_WEIGHTS = "model.safetensors"  # the whole model's state dict: towers, fusion layers, heads
EXPORT_CONFIG = "vlenc.json"  # {"config": the run's resolved config, "tower_configs", "vocab_size", "labels", ...}


def build_run_model(cfg, vocab_size, tower_configs=None, labels=None):
    """The model a run trains, untrained: its task's model (cfg.task, whose outputs mean `labels`) or, without a
    task, the pretraining model; towers from `tower_configs` when given (see build_encoder)."""
    if not cfg.task:
        return build_pretrain_model(cfg, vocab_size, tower_configs)
    import tasks  # tasks builds on this module: imported here, where a task's model is wanted
    return tasks.get_task(cfg.task).build_model(build_encoder(cfg, vocab_size, tower_configs), labels)


def load_exported(directory):
    """(model in eval mode, the run's resolved config as a dict) from an export.py directory, built from the
    towers' recorded Hugging Face configs alone (no hub, no tower directory) and loaded strictly from the
    safetensors file. A pretraining export gives a PretrainModel; a fine-tuning one its task's model."""
    with open(os.path.join(directory, EXPORT_CONFIG)) as f:
        saved = json.load(f)
    model = build_run_model(SimpleNamespace(**saved["config"]), saved["vocab_size"], saved["tower_configs"],
                            saved["labels"])
    load_model(model, os.path.join(directory, EXPORT_WEIGHTS), strict=True)
    return model.eval(), saved["config"]
