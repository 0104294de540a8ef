"""Contrastive image-text learning: the dual encoder (CLIP / LiT / LilT), the image-text contrastive loss (ITC)
with its cross-process feature gather, and ITC as an extra loss of the two-tower model (ALBEF).

  DualEncoder               text tower + vision tower, each pooled and projected into one space of embed_dim,
                            L2-normalised; no fusion layers. Joins encoders.py's EncoderOutput contract.
  ContrastiveLoss           symmetric InfoNCE with a learnable temperature (CLIP's initialisation and clamp),
                            each process scoring its rows against the features of the whole global batch
  DualEncoderPretrainModel  a dual encoder + ITC (pretrain.py with model_type="dual_encoder")
  ITCHead                   ITC on the two-tower model's projected tower outputs before fusion, and ITM
                            negatives drawn by ITC similarity over the global batch (itm_hard_negatives)

Import graph: this module builds on encoders.py (the output contract) and model.py (PretrainModel); those two
import it lazily, inside build_encoder and build_pretrain_model, so the graph stays one-way at import time.
"""

import math

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from encoders import Embedded, EncoderOutput, PixelNormalize, TwoTowerEncoder
from model import FreezableModel, PretrainModel
from towers import requires_grad

POOLINGS = ("cls", "mean")
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP: temperature 0.07 at the start
LOGIT_SCALE_MAX = 100.0  # CLIP: the scale is clamped at 100, so the temperature never falls below 0.01


# -----------------------------------------------------------------------------
# Features of the whole global batch, with gradients back to the process that computed them


def _world():
    return (tdist.get_world_size(), tdist.get_rank()) if tdist.is_available() and tdist.is_initialized() else (1, 0)


class _GatherRows(torch.autograd.Function):
    """all_gather of (n_r, ...) tensors along dim 0 (n_r may differ between processes: a batch that lost a
    bad image is shorter). Backward: every process's loss depends on every process's rows, so the gradient of
    a row is the sum over processes of the gradients they computed for it: all_reduce, then keep one's own."""

    @staticmethod
    def forward(ctx, x, sizes, rank):
        ctx.sizes, ctx.rank = sizes, rank
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[:len(x)] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        tdist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x):
    """(n_r, ...) on each process -> (sum n_r, ...) in rank order, differentiable; and this process's first row
    in it. Without a process group: x itself and 0."""
    world_size, rank = _world()
    if world_size == 1:
        return x, 0
    size = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    tdist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    return _GatherRows.apply(x, sizes, rank), sum(sizes[:rank])


# -----------------------------------------------------------------------------
# The loss


def pool(feats, mask, pooling):
    """(B, S, D) features and (B, S) mask -> (B, D): the first (CLS) row, or the mean over real positions."""
    if pooling == "cls":
        return feats[:, 0]
    weights = mask.to(feats.dtype).unsqueeze(-1)  # (B, S, 1)
    return (feats * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between L2-normalised image and text embeddings, temperature learnt as CLIP's logit
    scale. Each process scores its own rows against the whole global batch (gathered with gradients), so two
    processes with batch B compute the loss and gradients of one process with batch 2B. Rows showing the same
    picture (COCO's five captions) are all positives, with equal target weight; with distinct pictures this
    is CLIP's loss exactly."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def scale(self):
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    def forward(self, image_emb, text_emb, image_ids):
        """image_emb, text_emb (B, E) normalised, row i the picture and caption of pair i; image_ids (B,).
        Returns {"itc_loss", "itc_acc"} and the (B, N) text-to-image similarities of this process's captions
        to the global batch's pictures, with the global pictures' ids (N,) and this process's offset in them."""
        all_images, offset = gather_rows(image_emb)  # (N, E)
        all_texts, _ = gather_rows(text_emb)
        all_ids, _ = gather_rows(image_ids)
        scale = self.scale()
        logits_i2t = scale * image_emb.float() @ all_texts.float().T  # (B, N)
        logits_t2i = scale * text_emb.float() @ all_images.float().T  # (B, N)
        positives = (image_ids[:, None] == all_ids[None, :]).float()  # (B, N), own column included
        targets = positives / positives.sum(1, keepdim=True)
        loss_i2t = -(targets * logits_i2t.log_softmax(-1)).sum(-1).mean()
        loss_t2i = -(targets * logits_t2i.log_softmax(-1)).sum(-1).mean()
        hit = lambda logits: positives.gather(1, logits.argmax(-1, keepdim=True)).mean()
        out = {"itc_loss": (loss_i2t + loss_t2i) / 2, "itc_acc": (hit(logits_i2t) + hit(logits_t2i)) / 2}
        return out, logits_t2i.detach(), all_ids, offset


# -----------------------------------------------------------------------------
# Dual encoder


class DualEncoder(nn.Module):
    """Two towers, no fusion: each side's features projected to embed_dim (a linear map without bias, as
    CLIP's), pooled (CLS or masked mean) and L2-normalised. EncoderOutput: text_feats (B, T, E) and image_feats
    (B, P, E) are the projected features; pooled is text embedding || image embedding (B, 2E), or one
    embedding (B, E) for unimodal input."""

    def __init__(self, text_tower, vision_tower, embed_dim, pooling, image_mean, image_std):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"embed_pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
        self.text_tower, self.vision_tower = text_tower, vision_tower
        self.pixel_norm = PixelNormalize(image_mean, image_std)  # the loaders deliver uint8 pixels
        self.bert_init = False  # its projections, and heads built on it, keep PyTorch's initialisation
        self.text_proj = nn.Linear(text_tower.config.hidden_size, embed_dim, bias=False)
        self.image_proj = nn.Linear(vision_tower.config.hidden_size, embed_dim, bias=False)
        self.pooling = pooling
        self.dim = embed_dim
        self.pooled_dim = 2 * embed_dim
        self.gradient_checkpointing = False

    def module_groups(self):
        return {"text_tower": self.text_tower, "vision_tower": self.vision_tower,
                "projection": nn.ModuleList([self.text_proj, self.image_proj])}

    def encode_text(self, input_ids, attention_mask):  # (B, T) -> Embedded (B, T, E)
        with torch.set_grad_enabled(torch.is_grad_enabled() and requires_grad(self.text_tower)):
            h = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return Embedded(self.text_proj(h), attention_mask)

    # the vision tower runs as in the two-tower model (no graph when frozen, positions interpolated to the image)
    vision_features = TwoTowerEncoder.vision_features

    def project_image(self, features, image_type=1):  # (B, P, D_vision) -> Embedded (B, P, E)
        v = self.image_proj(features.to(self.image_proj.weight.dtype))
        return Embedded(v, torch.ones(v.shape[:2], dtype=torch.long, device=v.device), unpadded=True)

    def encode_image(self, pixel_values, image_type=1):  # (B, 3, H, W) -> Embedded (B, P, E)
        return self.project_image(self.vision_features(pixel_values))

    def embed(self, side):  # Embedded (B, S, E) -> (B, E) unit vectors
        return F.normalize(pool(side.feats, side.mask, self.pooling), dim=-1)

    def fuse(self, text, image, cls_only=()):
        """No fusion: each side's embedding; cls_only (TwoTowerEncoder's saving hint) changes nothing."""
        pooled = torch.cat([self.embed(side) for side in (text, image) if side is not None], dim=-1)
        return EncoderOutput(text.feats if text is not None else None, image.feats if image is not None else None,
                             pooled, text.mask if text is not None else None,
                             image.mask if image is not None else None)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_type=1):
        text = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        image = self.encode_image(pixel_values) if pixel_values is not None else None
        return self.fuse(text, image)


class DualEncoderPretrainModel(FreezableModel):
    """A dual encoder trained with ITC alone; the learnable temperature is its one head."""

    def __init__(self, encoder, itc_weight=1.0):
        super().__init__()
        if itc_weight <= 0:
            raise ValueError(f"model_type='dual_encoder' is trained by ITC alone: itc_weight={itc_weight} must be "
                             "positive")
        self.encoder = encoder
        self.itc_weight = itc_weight
        self.itc_head = ContrastiveLoss()

    def heads(self):
        return [self.itc_head]

    def embed_text(self, input_ids, attention_mask):  # (B, T) -> (B, E)
        return self.encoder.embed(self.encoder.encode_text(input_ids, attention_mask))

    def embed_image(self, pixel_values):  # (B, 3, H, W) -> (B, E)
        return self.encoder.embed(self.encoder.encode_image(pixel_values))

    def forward(self, batch):
        out, *_ = self.itc_head(self.embed_image(batch["pixel_values"]),
                                self.embed_text(batch["input_ids"], batch["attention_mask"]), batch["image_ids"])
        return {**out, "loss": self.itc_weight * out["itc_loss"]}


# -----------------------------------------------------------------------------
# ITC for the two-tower model, and ITM negatives drawn by it


def draw_hard_negatives(similarity, all_ids, image_ids, draws):
    """For each caption, a picture of the global batch drawn with probability softmax(similarity) among those
    showing another picture (ALBEF's hard negatives). similarity (B, N) caption-to-picture logits, all_ids (N,),
    image_ids (B,), draws (B,) uniform in [0, 1) (from the batch, so the draw is reproducible). Returns (B,)
    columns; a caption with no other picture in the global batch gets -1."""
    allowed = all_ids[None, :] != image_ids[:, None]  # (B, N)
    weights = similarity.float().masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # (B, N)
    cdf = weights.cumsum(-1)  # flat over disallowed columns
    # the first column whose cdf exceeds draw x total: the cdf rises there, so the column is allowed
    column = torch.searchsorted(cdf, (draws.to(cdf.dtype) * cdf[:, -1])[:, None], right=True).squeeze(1)
    return torch.where(allowed.any(-1), column, torch.full_like(column, -1))


class ITCHead(nn.Module):
    """ITC on the two-tower model's tower outputs after their projection to the cross-modal width, before
    fusion (ALBEF): each side's pooled feature projected to embed_dim and normalised. With hard_negatives, the
    ITM negatives become pictures of the global batch drawn by ITC similarity instead of uniformly."""

    def __init__(self, dim, embed_dim, pooling, hard_negatives=False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"embed_pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
        self.text_proj, self.image_proj = nn.Linear(dim, embed_dim), nn.Linear(dim, embed_dim)
        self.loss = ContrastiveLoss()
        self.pooling, self.hard_negatives = pooling, hard_negatives

    def embed_text(self, text):  # Embedded (B, T, D) -> (B, E) unit vectors
        return F.normalize(self.text_proj(pool(text.feats, text.mask, self.pooling)), dim=-1)

    def embed_image(self, image):  # Embedded (B, P, D) -> (B, E) unit vectors
        return F.normalize(self.image_proj(pool(image.feats, image.mask, self.pooling)), dim=-1)

    def forward(self, text, image, batch):
        """text, image: Embedded of the clean captions and their pictures. Returns ({"itc_loss", "itc_acc"}, the
        Embedded pictures ITM pairs with the captions: batch["itm_image_index"] of this process's pictures, or with
        hard_negatives each negative caption's drawn picture of the global batch (gathered with gradients))."""
        out, similarity, all_ids, offset = self.loss(self.embed_image(image), self.embed_text(text),
                                                     batch["image_ids"])
        if not self.hard_negatives:
            return out, image.select(batch["itm_image_index"])
        with torch.no_grad():
            drawn = draw_hard_negatives(similarity, all_ids, batch["image_ids"], batch["itm_negative_draw"])
        own = torch.arange(len(drawn), device=drawn.device) + offset
        # sample_itm_pairs made a caption negative only when another picture exists, so drawn >= 0 there
        index = torch.where(batch["itm_labels"] == 0, drawn, own)  # (B,) rows of the global batch
        feats, _ = gather_rows(image.feats)
        masks, _ = gather_rows(image.mask)
        return out, Embedded(feats, masks, image.unpadded).select(index)


def build_contrastive_pretrain_model(cfg, encoder, vocab_size):
    """model.build_pretrain_model for a dual encoder, or for a two-tower model with itc_weight > 0."""
    if cfg.model_type == "dual_encoder":
        if cfg.mlm_weight > 0 or cfg.itm_weight > 0:
            raise ValueError("model_type='dual_encoder' has no fusion layers for MLM or ITM: set mlm_weight=0 and "
                             "itm_weight=0 (it trains by itc_weight)")
        return DualEncoderPretrainModel(encoder, cfg.itc_weight)
    if cfg.model_type != "two_tower":
        raise ValueError(f"itc_weight > 0 needs model_type='two_tower' or 'dual_encoder', not {cfg.model_type!r}: "
                         "ITC compares the two towers' outputs before fusion")
    itc_head = ITCHead(encoder.dim, cfg.embed_dim, cfg.embed_pooling, cfg.itm_hard_negatives)
    return PretrainModel(encoder, vocab_size, cfg.mlm_weight, cfg.itm_weight, cfg.pretrain_pass, itc_head,
                         cfg.itc_weight)
