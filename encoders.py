"""Vision-language encoders built from Hugging Face towers (towers.py).

Two model types, one output contract (`EncoderOutput`), so heads and losses never care which built it:

  OneTowerEncoder  word pieces + image patches -> one joint sequence -> one transformer stack
  TwoTowerEncoder  text tower + vision tower -> co-attention cross-modal layers (LXMERT's or METER's)

Both expose the same three steps: `encode_text`, `encode_image`, `fuse`. `forward` is the three in a row.
The dual encoder (no fusion) is in contrastive.py; the heads and the models that train are in model.py.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from alignment import add_configured_adapters
from attention import Dropout, attention_with_dropout, dropout
from towers import TowerLoadError, init_new, layers_path, load_tower, requires_grad, tower_class, tower_layers

# -----------------------------------------------------------------------------
# The output contract


@dataclass
class EncoderOutput:
    text_feats: Optional[torch.Tensor]   # (B, T, D) contextual text features, or None for image-only input
    image_feats: Optional[torch.Tensor]  # (B, P, D) contextual image features (CLS first), or None
    pooled: torch.Tensor                 # (B, pooled_dim) text CLS || image CLS ("double") or first CLS;
                                         # (B, dim) for text-only or image-only input
    text_mask: Optional[torch.Tensor]    # (B, T) 1 for real tokens
    image_mask: Optional[torch.Tensor]   # (B, P) 1 for real patches


@dataclass
class Embedded:
    """One modality after its encoder-side step, before fusion."""
    feats: torch.Tensor  # (B, S, D)
    mask: torch.Tensor   # (B, S) 1 for real positions
    unpadded: bool = False  # known without looking (image patches): every position is real, mask is all ones

    def select(self, index):
        return Embedded(self.feats[index], self.mask[index], self.unpadded)

    def key_mask(self):
        """The (B, S) mask attention over these positions needs: None where nothing is padded, so that
        scaled_dot_product_attention may take its fastest kernels (FlashAttention accepts no mask at all).
        Read from the flag, never from the values: checking the mask on the GPU would wait for the device."""
        return None if self.unpadded else self.mask


def additive_mask(mask, dtype):
    """(B, S) 1/0 -> (B, 1, 1, S) additive mask: 0 where attended, the dtype's minimum where padded."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class PixelNormalize(nn.Module):
    """uint8 pixels (B, 3, H, W), as the data loaders deliver them, -> float (x / 255 - mean) / std.

    The loader's workers stop at uint8 (a quarter of float32's bytes to pin and copy, and no float work on the
    CPU); the model normalises on its own device. Float pixels are taken as normalised already (random test
    inputs, bench.py's random batches). mean and std are buffers left out of the state dict: they are config
    (image_mean, image_std), and checkpoints keep their keys."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixel_values):  # (B, 3, H, W) uint8 or float -> (B, 3, H, W) float
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        return (pixel_values.float() / 255 - self.mean) / self.std


class Pooler(nn.Module):
    """CLS vector -> Linear -> tanh, as BERT's pooler."""

    def __init__(self, dim):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, cls):  # (B, D) -> (B, D)
        return torch.tanh(self.dense(cls))


# -----------------------------------------------------------------------------
# Two-tower: co-attention cross-modal layers


class Attention(nn.Module):
    """Multi-head attention of `x` over `context` (itself for self-attention) with scaled_dot_product_attention."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        assert dim % heads == 0, f"cross_hidden {dim} is not divisible by cross_heads {heads}"
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def qkv_weights(self):  # (3D, D) and (3D,): q's rows, then k's and v's, for one product giving all three
        return torch.cat([self.q.weight, self.kv.weight]), torch.cat([self.q.bias, self.kv.bias])

    def split_heads(self, x, parts):  # (B, N, parts * D) -> `parts` tensors (B, h, N, d)
        B, N, _ = x.shape
        return x.view(B, N, parts, self.heads, -1).permute(2, 0, 3, 1, 4)

    def forward(self, x, context, context_mask):
        B, T, D = x.shape
        if x is context:  # self-attention over every row: one product for q, k and v instead of two
            q, k, v = self.split_heads(F.linear(x, *self.qkv_weights()), 3)
        else:
            q, = self.split_heads(self.q(x), 1)
            k, v = self.split_heads(self.kv(context), 2)
        y = self.attend(q, k, v, context_mask)
        return self.out(y.transpose(1, 2).reshape(B, T, D))

    def co_attend(self, both, T, first_mask, second_mask):
        """Both directions of co-attention with these weights, on the two streams side by side: both (B, T+S, D)
        holds the first stream's T rows, then the second's S. Each stream's rows attend to the other's; the
        result is (B, T+S, D), as [self(first, second, second_mask), self(second, first, first_mask)] along the
        rows, with one product for every q, k and v and one output projection instead of six products."""
        B, N, D = both.shape
        qkv = F.linear(both, *self.qkv_weights())  # (B, T+S, 3D)
        first, second = qkv.split([T, N - T], 1)  # split, not slicing: its backward joins the two gradients
        q1, k1, v1 = self.split_heads(first, 3)   # in one copy, where each slice's would fill a zero tensor
        q2, k2, v2 = self.split_heads(second, 3)
        y = torch.cat([self.attend(q1, k2, v2, second_mask), self.attend(q2, k1, v1, first_mask)], 2)
        return self.out(y.transpose(1, 2).reshape(B, N, D))

    def attend(self, q, k, v, context_mask):  # q (B, h, T, d), k and v (B, h, S, d) -> (B, h, T, d)
        attn_mask = None if context_mask is None else context_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        dropout_p = self.dropout if self.training else 0.0
        if dropout_p > 0 and q.device.type == "cpu":  # no fused CPU kernel takes dropout
            return attention_with_dropout(q, k, v, attn_mask, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class CrossModalBlock(nn.Module):
    """One stream's half of a METER-style co-attention layer (cross_layer_type="meter").

    Ordering is METER's (self-attention, cross-attention, feed-forward), each stream with its own weights,
    written pre-LayerNorm because these layers usually start from random init and pre-LN trains stably there.
    """

    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.norm_self, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm_cross, self.cross_attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(mlp_ratio * dim)), nn.GELU(), nn.Linear(int(mlp_ratio * dim), dim))
        self.drop = Dropout(dropout)

    def forward(self, x, x_mask, other, other_mask, cls_only=False):
        # x (B, T, D) attends to itself and to other (B, S, D) -> (B, T, D), or (B, 1, D) with cls_only;
        # x_mask (B, T) and other_mask (B, S) are key-padding masks, None where nothing is padded
        h = self.norm_self(x)
        if cls_only:  # only the CLS row is read downstream: it still attends to every row, but only it is updated
            x, q = x[:, :1], h[:, :1]
        else:
            q = h
        x = x + self.drop(self.self_attn(q, h, x_mask))
        x = x + self.drop(self.cross_attn(self.norm_cross(x), other, other_mask))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class CrossModalLayer(nn.Module):
    """METER-style: both streams update at once, each attending to the other's input to this layer (co-attention)."""

    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.text = CrossModalBlock(dim, heads, mlp_ratio, dropout)
        self.image = CrossModalBlock(dim, heads, mlp_ratio, dropout)

    def forward(self, t, t_mask, v, v_mask, cls_only=()):
        return (self.text(t, t_mask, v, v_mask, cls_only="text" in cls_only),
                self.image(v, v_mask, t, t_mask, cls_only="image" in cls_only))


LXMERT_LN_EPS = 1e-12  # BERT's and LXMERT's LayerNorm epsilon


class LxmertStream(nn.Module):
    """One stream's own part of an LXMERT cross layer: self-attention, then feed-forward, each post-LayerNorm
    (sublayer, dropout, residual, then the norm), as BERT and LXMERT write them."""

    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.self_attn, self.norm_self = Attention(dim, heads, dropout), nn.LayerNorm(dim, eps=LXMERT_LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, int(mlp_ratio * dim)), nn.GELU(), nn.Linear(int(mlp_ratio * dim), dim))
        self.norm_mlp = nn.LayerNorm(dim, eps=LXMERT_LN_EPS)
        self.drop = Dropout(dropout)

    def forward(self, x, x_mask, cls_only=False):
        # x (B, T, D): the stream after cross-attention -> (B, T, D), or (B, 1, D) with cls_only
        q = x[:, :1] if cls_only else x  # the CLS row still attends to every row; only it is updated
        x = self.norm_self(q + self.drop(self.self_attn(q, x, x_mask)))
        return self.norm_mlp(x + self.drop(self.mlp(x)))


class LxmertCrossModalLayer(nn.Module):
    """LXMERT's cross layer (cross_layer_type="lxmert", the paper's): cross-attention, then self-attention,
    then feed-forward, per stream, post-LayerNorm. ONE cross-attention module (with its output norm) serves
    both directions: text attends to the image stream and the image to the text, both with the same weights,
    both reading this layer's inputs (co-attention). Self-attention and feed-forward are per stream."""

    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.cross_attn, self.norm_cross = Attention(dim, heads, dropout), nn.LayerNorm(dim, eps=LXMERT_LN_EPS)
        self.drop = Dropout(dropout)
        self.text = LxmertStream(dim, heads, mlp_ratio, dropout)
        self.image = LxmertStream(dim, heads, mlp_ratio, dropout)

    def forward(self, t, t_mask, v, v_mask, cls_only=()):
        # every row goes through cross-attention (self-attention reads them all); cls_only trims after it.
        # The two directions share every weight, so they run on both streams side by side (B, T+S, D): one
        # product for q, k and v, one output projection, one dropout, residual and norm, instead of two of each.
        T = t.shape[1]
        both = torch.cat([t, v], 1)
        crossed = self.norm_cross(both + self.drop(self.cross_attn.co_attend(both, T, t_mask, v_mask)))
        t_cross, v_cross = crossed.split([T, crossed.shape[1] - T], 1)
        return (self.text(t_cross, t_mask, cls_only="text" in cls_only),
                self.image(v_cross, v_mask, cls_only="image" in cls_only))


CROSS_LAYER_TYPES = {"lxmert": LxmertCrossModalLayer, "meter": CrossModalLayer}


class TwoTowerEncoder(nn.Module):
    """Text tower + vision tower, projected to the cross-modal width, joined by co-attention layers."""

    def __init__(self, text_tower, vision_tower, dim, layers, heads, mlp_ratio, dropout, image_mean, image_std,
                 layer_type="meter", bert_init=False):
        super().__init__()
        if layer_type not in CROSS_LAYER_TYPES:
            raise TowerLoadError(f"cross_layer_type must be one of {', '.join(CROSS_LAYER_TYPES)}, not '{layer_type}'")
        self.text_tower, self.vision_tower = text_tower, vision_tower
        self.pixel_norm = PixelNormalize(image_mean, image_std)
        self.text_proj = nn.Linear(text_tower.config.hidden_size, dim)
        self.image_proj = nn.Linear(vision_tower.config.hidden_size, dim)
        self.modality_type = nn.Embedding(3, dim)  # 0 text, 1 image, 2 second image (NLVR2)
        layer_class = CROSS_LAYER_TYPES[layer_type]
        self.cross_layers = nn.ModuleList([layer_class(dim, heads, mlp_ratio, dropout) for _ in range(layers)])
        # pre-LN layers need a final norm; post-LN ones (LXMERT) end normalised, and the original adds none
        final_norm = (lambda: nn.LayerNorm(dim)) if layer_type == "meter" else nn.Identity
        self.text_norm, self.image_norm = final_norm(), final_norm()
        self.text_pooler, self.image_pooler = Pooler(dim), Pooler(dim)
        self.bert_init = bert_init  # the heads built on this encoder start the same way
        for part in (self.text_proj, self.image_proj, self.modality_type, self.cross_layers, self.text_norm,
                     self.image_norm, self.text_pooler, self.image_pooler):
            init_new(part, bert_init)
        self.dim = dim
        self.pooled_dim = 2 * dim
        self.gradient_checkpointing = False

    def module_groups(self):
        cross = nn.ModuleList([self.text_proj, self.image_proj, self.modality_type, self.cross_layers,
                               self.text_norm, self.image_norm, self.text_pooler, self.image_pooler])
        return {"text_tower": self.text_tower, "vision_tower": self.vision_tower, "cross_modal": cross}

    def beyond_text_features(self):
        """Names of the modules the fused text features do not depend on (only the image features and the pooled
        output do): the last layer's image stream, the image norm, the poolers."""
        return [f"cross_layers.{len(self.cross_layers) - 1}.image", "image_norm", "text_pooler", "image_pooler"]

    def encode_text(self, input_ids, attention_mask):  # (B, T) -> Embedded (B, T, D)
        # The tower adds its own embeddings once and receives the padding mask.
        with torch.set_grad_enabled(torch.is_grad_enabled() and requires_grad(self.text_tower)):
            h = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        t = self.text_proj(h) + self.modality_type.weight[0]
        return Embedded(t, attention_mask)

    def vision_features(self, pixel_values):  # (B, 3, H, W) -> (B, P, D_vision), the vision tower's output
        tower = self.vision_tower
        size_differs = pixel_values.shape[-1] != tower.config.image_size
        with torch.set_grad_enabled(torch.is_grad_enabled() and requires_grad(tower)):
            kwargs = {"interpolate_pos_encoding": True} if size_differs else {}
            return tower(pixel_values=self.pixel_norm(pixel_values), **kwargs).last_hidden_state

    def project_image(self, features, image_type=1):  # (B, P, D_vision) -> Embedded (B, P, D)
        """The vision tower's output (computed now, or read from a feature cache) into the cross-modal width."""
        v = self.image_proj(features.to(self.image_proj.weight.dtype)) + self.modality_type.weight[image_type]
        return Embedded(v, torch.ones(v.shape[:2], dtype=torch.long, device=v.device), unpadded=True)

    def encode_image(self, pixel_values, image_type=1):  # (B, 3, H, W) -> Embedded (B, P, D)
        return self.project_image(self.vision_features(pixel_values), image_type)

    def fuse(self, text, image, cls_only=()):
        """Cross-modal layers over both streams (or the norm and pooler of one, for unimodal input).

        cls_only: the streams ("text", "image") of which the caller reads only the CLS feature (the pooled
        output). The last layer then updates just that row of them: exact, because nothing else reads the
        other rows, and it saves most of a layer (the image stream's 197+ rows dominate it). Such a stream's
        features come back as (B, 1, D) with its mask cut to match.
        """
        if text is None or image is None:  # unimodal input: the one tower's features, no cross-modal layers
            x, norm, pooler = (text, self.text_norm, self.text_pooler) if image is None else \
                (image, self.image_norm, self.image_pooler)
            feats = norm(x.feats)
            pooled = pooler(feats[:, 0])
            return EncoderOutput(feats if image is None else None, feats if text is None else None, pooled,
                                 text.mask if text is not None else None, image.mask if image is not None else None)
        t, v = text.feats, image.feats
        t_mask, v_mask = text.key_mask(), image.key_mask()  # the text's padding; images usually need none
        for i, layer in enumerate(self.cross_layers):
            last = cls_only if i == len(self.cross_layers) - 1 else ()
            if self.gradient_checkpointing and self.training and requires_grad(layer):
                t, v = checkpoint(layer, t, t_mask, v, v_mask, cls_only=last, use_reentrant=False)
            else:
                t, v = layer(t, t_mask, v, v_mask, cls_only=last)
        t, v = self.text_norm(t), self.image_norm(v)
        pooled = torch.cat([self.text_pooler(t[:, 0]), self.image_pooler(v[:, 0])], dim=-1)  # (B, 2D)
        return EncoderOutput(t, v, pooled, text.mask[:, :t.shape[1]], image.mask[:, :v.shape[1]])

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_type=1):
        text = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        image = self.encode_image(pixel_values, image_type) if pixel_values is not None else None
        return self.fuse(text, image)


# -----------------------------------------------------------------------------
# One-tower: joint embeddings into one transformer stack


class TextEmbeddings(nn.Module):
    """Word + position embeddings for a one-tower model whose stack is not a text model."""

    def __init__(self, vocab_size, dim, max_positions, dropout):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_positions, dim)
        self.norm, self.drop = nn.LayerNorm(dim), nn.Dropout(dropout)
        nn.init.normal_(self.word.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, input_ids):  # (B, T) -> (B, T, D)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.drop(self.norm(self.word(input_ids) + self.position(positions)))


class PatchEmbeddings(nn.Module):
    """ViT-style image embeddings for a one-tower model whose stack is not a vision model:
    square patches, flattened and projected (a strided convolution), a CLS token and learned positions."""

    def __init__(self, image_size, patch_size, dim, dropout):
        super().__init__()
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, 1 + self.grid ** 2, dim) * 0.02)
        self.drop = nn.Dropout(dropout)

    def forward(self, pixel_values):  # (B, 3, H, W) -> (B, 1 + P, D)
        x = self.proj(pixel_values).flatten(2).transpose(1, 2)  # (B, P, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        grid = pixel_values.shape[-1] // self.patch_size
        return self.drop(x + interpolate_positions(self.position, grid))


def interpolate_positions(position, grid):
    """(1, 1 + g*g, D) learned positions -> (1, 1 + grid*grid, D), bicubic over the patch grid."""
    old = int(math.sqrt(position.shape[1] - 1))
    if old == grid:
        return position
    cls, patches = position[:, :1], position[:, 1:]
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


class OneTowerEncoder(nn.Module):
    """Word pieces and image patches (each with positions and a modality-type embedding) concatenated into
    one sequence with a joint attention mask, through the transformer layers of a text or vision model.

    embeddings="tower": the stack's own model supplies its modality's embeddings (and a vision stack its
    final LayerNorm); only the other modality's are new. embeddings="fresh" (the paper's): both are new and
    randomly initialised, and only the transformer layers come from the stack's model.
    """

    EMBEDDINGS = ("tower", "fresh")

    def __init__(self, stack, stack_modality, vocab_size, image_size, patch_size, max_text_len, pooling, image_mean,
                 image_std, embeddings="tower", bert_init=False):
        super().__init__()
        if embeddings not in self.EMBEDDINGS:
            raise TowerLoadError(f"onetower_embeddings must be one of {', '.join(self.EMBEDDINGS)}, not '{embeddings}'")
        self.pixel_norm = PixelNormalize(image_mean, image_std)
        config = stack.config
        dim = config.hidden_size
        dropout = getattr(config, "hidden_dropout_prob", 0.0)
        if getattr(config, "use_relative_position_bias", False) or getattr(config, "use_shared_relative_position_bias", False):
            raise TowerLoadError(f"{config.model_type} with relative position bias is tied to its patch grid and "
                                 "cannot run a joint text+image sequence; use it as a two-tower vision tower")
        reuse = embeddings == "tower"
        if reuse and stack_modality == "text":
            self.text_embeddings = stack.embeddings  # word + position + token type, then LayerNorm
            self.text_embeddings_project = getattr(stack, "embeddings_project", None)  # ELECTRA's small embeddings
        else:
            self.text_embeddings = TextEmbeddings(vocab_size, dim, max(max_text_len, 512), dropout)
            self.text_embeddings_project = None
        if reuse and stack_modality == "vision":
            self.image_embeddings = stack.embeddings  # patches + CLS + positions
        else:
            self.image_embeddings = PatchEmbeddings(image_size, patch_size, dim, dropout)
        self.stack_modality = stack_modality
        self.layers = tower_layers(stack)
        # pre-LN vision stacks end with a norm, BERT does not; with fresh embeddings only the layers are reused
        self.final_norm = getattr(stack, "layernorm", None) if reuse else None
        self.stack_config = config
        self.bert_init = bert_init  # the heads built on this encoder start the same way
        self.modality_type = init_new(nn.Embedding(3, dim), bert_init)  # 0 text, 1 image, 2 second image (NLVR2)
        self.pooling = pooling
        self.text_pooler = init_new(Pooler(dim), bert_init)
        self.image_pooler = init_new(Pooler(dim), bert_init) if pooling == "double" else None
        self.dim = dim
        self.pooled_dim = 2 * dim if pooling == "double" else dim
        self.gradient_checkpointing = False

    def module_groups(self):
        embeddings = nn.ModuleList([m for m in (self.text_embeddings, self.text_embeddings_project,
                                                self.image_embeddings, self.modality_type) if m is not None])
        stack = nn.ModuleList([m for m in (self.layers, self.final_norm, self.text_pooler, self.image_pooler)
                               if m is not None])
        return {"embeddings": embeddings, "stack": stack}

    def beyond_text_features(self):
        """Names of the modules the text features do not depend on: the poolers."""
        return ["text_pooler"] + (["image_pooler"] if self.image_pooler is not None else [])

    def encode_text(self, input_ids, attention_mask):  # (B, T) -> Embedded (B, T, D)
        t = self.text_embeddings(input_ids)
        if self.text_embeddings_project is not None:
            t = self.text_embeddings_project(t)
        return Embedded(t + self.modality_type.weight[0], attention_mask)

    def encode_image(self, pixel_values, image_type=1):  # (B, 3, H, W) -> Embedded (B, 1 + P, D)
        pixel_values = self.pixel_norm(pixel_values)
        if isinstance(self.image_embeddings, PatchEmbeddings):
            v = self.image_embeddings(pixel_values)
        else:  # the vision stack's own embeddings
            size_differs = pixel_values.shape[-1] != self.stack_config.image_size
            v = self.image_embeddings(pixel_values, **({"interpolate_pos_encoding": True} if size_differs else {}))
        v = v + self.modality_type.weight[image_type]
        return Embedded(v, torch.ones(v.shape[:2], dtype=torch.long, device=v.device), unpadded=True)

    def fuse(self, text, image, cls_only=()):
        """The joint stack over both parts. cls_only is TwoTowerEncoder.fuse's saving hint; it changes nothing
        here, because the layers are a Hugging Face model's and always update every row."""
        parts = [e for e in (text, image) if e is not None]
        x = torch.cat([e.feats for e in parts], dim=1)  # (B, T + P, D)
        mask = torch.cat([e.mask for e in parts], dim=1)  # (B, T + P)
        attn_mask = additive_mask(mask, x.dtype)  # the joint mask really reaches every layer
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and requires_grad(layer):
                x = checkpoint(layer, x, attention_mask=attn_mask, use_reentrant=False)
            else:
                x = layer(x, attention_mask=attn_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        T = text.feats.shape[1] if text is not None else 0
        text_feats = x[:, :T] if text is not None else None
        image_feats = x[:, T:] if image is not None else None
        if self.pooling == "double" and text is not None and image is not None:
            pooled = torch.cat([self.text_pooler(x[:, 0]), self.image_pooler(x[:, T])], dim=-1)  # (B, 2D)
        elif text is None and self.image_pooler is not None:
            pooled = self.image_pooler(x[:, 0])  # (B, D)
        else:
            pooled = self.text_pooler(x[:, 0])  # (B, D): "single", or text-only input
        return EncoderOutput(text_feats, image_feats, pooled,
                             text.mask if text is not None else None, image.mask if image is not None else None)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_type=1):
        text = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        image = self.encode_image(pixel_values, image_type) if pixel_values is not None else None
        return self.fuse(text, image)


def build_encoder(cfg, vocab_size, tower_configs=None):
    """The encoder the config describes. `vocab_size` is the tokenizer's, used by randomly initialised text sides.
    tower_configs: {modality: Hugging Face config dict} a checkpoint recorded (FreezableModel.tower_configs); the
    towers are then built from those, not from the hub or a directory, ready for the checkpoint's weights.
    Adapters (text_align / vision_align, alignment.py) go into the towers after their weights are loaded."""
    saved = tower_configs or {}
    if cfg.model_type in ("two_tower", "dual_encoder"):
        text = load_tower(cfg, "text", vocab_size, saved.get("text"))
        vision = load_tower(cfg, "vision", saved_config=saved.get("vision"))
        if vocab_size > text.config.vocab_size:
            raise TowerLoadError(f"tokenizer has {vocab_size} tokens but text_tower '{cfg.text_tower}' only "
                                 f"{text.config.vocab_size} embeddings")
        if cfg.model_type == "dual_encoder":
            from contrastive import DualEncoder  # contrastive.py builds on this module: imported here, not above
            encoder = DualEncoder(text, vision, cfg.embed_dim, cfg.embed_pooling, cfg.image_mean, cfg.image_std)
        else:
            encoder = TwoTowerEncoder(text, vision, cfg.cross_hidden, cfg.cross_layers, cfg.cross_heads,
                                      cfg.cross_mlp_ratio, cfg.cross_dropout, cfg.image_mean, cfg.image_std,
                                      cfg.cross_layer_type, cfg.init_new_modules == "bert")
    elif cfg.model_type == "one_tower":
        if cfg.onetower_stack not in ("text", "vision"):
            raise TowerLoadError(f"onetower_stack must be 'text' or 'vision', not '{cfg.onetower_stack}'")
        stack = load_tower(cfg, cfg.onetower_stack, vocab_size, saved.get(cfg.onetower_stack))
        patch = cfg.patch_size if cfg.patch_size > 0 else getattr(stack.config, "patch_size", 16)
        encoder = OneTowerEncoder(stack, cfg.onetower_stack, vocab_size, cfg.image_size, patch,
                                  cfg.max_text_len, cfg.pooling, cfg.image_mean, cfg.image_std,
                                  cfg.onetower_embeddings, cfg.init_new_modules == "bert")
    else:
        raise TowerLoadError(f"model_type must be 'two_tower', 'one_tower' or 'dual_encoder', not '{cfg.model_type}'")
    add_configured_adapters(encoder, cfg, tower_layers)
    return encoder


def hf_towers(encoder):
    """{modality: Hugging Face model} of an encoder's towers, sharing the encoder's parameters: a two-tower or
    dual encoder's own two; for a one-tower encoder its stack, reassembled into the Hugging Face model it came from
    (its own modality's embeddings, the layers, the final norm), which export.py saves with save_pretrained."""
    if hasattr(encoder, "text_tower"):  # two towers: two-tower or dual encoder
        return {"text": encoder.text_tower, "vision": encoder.vision_tower}
    model_class, kwargs = tower_class(encoder.stack_config)
    with torch.device("meta"):  # every parameter is replaced by the encoder's below
        tower = model_class(encoder.stack_config, **kwargs)
    tower.embeddings = encoder.text_embeddings if encoder.stack_modality == "text" else encoder.image_embeddings
    if encoder.text_embeddings_project is not None:
        tower.embeddings_project = encoder.text_embeddings_project
    tower.set_submodule(layers_path(tower), encoder.layers)
    if encoder.final_norm is not None:
        tower.layernorm = encoder.final_norm
    return {encoder.stack_modality: tower}


