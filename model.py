"""Vision-language transformer encoders built from Hugging Face towers.

Two model types, one output contract (`EncoderOutput`), so heads and losses never care which built it:

  OneTowerEncoder  word pieces + image patches -> one joint sequence -> one transformer stack
  TwoTowerEncoder  text tower + vision tower -> co-attention cross-modal layers (LXMERT's or METER's)

Both expose the same three steps: `encode_text`, `encode_image`, `fuse`. `forward` is the three in a row.
On top sit the heads (MLM, ITM, classifier), `PretrainModel` (MLM + ITM losses) and `TaskModel`
(an encoder plus one downstream head), freezing, gradient checkpointing and checked weight loading.
"""

import inspect
import json
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model
from torch.utils.checkpoint import checkpoint
from transformers import (AutoConfig, AutoModel, BeitConfig, BertConfig, DeiTConfig, ElectraConfig,
                          RobertaConfig, ViTConfig)

from alignment import add_configured_adapters, train_alignment_parameters

# -----------------------------------------------------------------------------
# Towers: any Hugging Face text encoder of the BERT family or transformer vision encoder

# A family name builds a randomly initialised tower with no hub access at all.
TEXT_FAMILIES = {"bert": BertConfig, "electra": ElectraConfig, "roberta": RobertaConfig}
VISION_FAMILIES = {"vit": ViTConfig, "deit": DeiTConfig, "beit": BeitConfig}
# model_type values accepted from a hub name or local directory.
TEXT_MODEL_TYPES = {"bert", "electra", "roberta", "xlm-roberta", "camembert", "albert", "distilbert",
                    "deberta", "deberta-v2", "mpnet", "ernie"}
VISION_MODEL_TYPES = {"vit", "deit", "beit", "data2vec-vision", "dinov2", "vit_msn", "vit_mae"}


# What random_init_towers builds in place of a hub name, offline: the family and the hub model's dimensions
# (its config.json values). Every text model here has BERT's uncased WordPiece vocabulary, every vision model
# 16-pixel patches.
HUB_TOWERS = {
    "google/electra-small-discriminator": ("electra", dict(
        hidden_size=256, num_hidden_layers=12, num_attention_heads=4, intermediate_size=1024, embedding_size=128,
        vocab_size=30522)),
    "google/electra-base-discriminator": ("electra", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, embedding_size=768,
        vocab_size=30522)),
    "bert-base-uncased": ("bert", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522)),
    "facebook/deit-tiny-patch16-224": ("deit", dict(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, patch_size=16)),
    "google/vit-base-patch16-224-in21k": ("vit", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16)),
    "google/vit-base-patch16-224": ("vit", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16)),
}


class TowerLoadError(ValueError):
    """A tower or its config could not be loaded; the message is one line naming it."""


def one_line(error):
    """An exception's whole message as one line (transformers' messages run over several)."""
    return " ".join(str(error).split()) or type(error).__name__


def hub_unreachable(timeout=5.0):
    """Why the Hugging Face hub cannot be reached, from one request without retries; "" when it answers at all."""
    from huggingface_hub import constants, get_session
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # the HTTP client's connection errors: refused, no route, name not resolved, timeout
        return one_line(e)
    return ""


def from_hub_or_directory(load, name, key, offline_fix):
    """`load(name, **kwargs)` (a from_pretrained) for config key `key`, each failure one line naming the key.

    A local directory is read as it is, and a path that is not one is reported as such. A hub name is read from
    the local cache first; the hub is asked only when HF_HUB_OFFLINE is unset and one request shows that it answers,
    so without hub access the run fails in seconds (transformers would retry for half a minute), saying
    `offline_fix`: how to run without the hub.
    """
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        try:
            return load(path)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... all mean "cannot load"
            raise TowerLoadError(f"could not load {key} from directory '{name}': {one_line(e)}") from None
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a hub name is "name" or "namespace/name"
        raise TowerLoadError(f"{key}: directory '{name}' does not exist")
    try:
        return load(name, local_files_only=True)
    except Exception:
        pass  # not in the cache
    from huggingface_hub import constants
    if constants.is_offline_mode():
        raise TowerLoadError(f"could not load {key} '{name}': it is not in the local Hugging Face cache and "
                             f"HF_HUB_OFFLINE is set; {offline_fix}")
    unreachable = hub_unreachable()
    if unreachable:
        raise TowerLoadError(f"could not load {key} '{name}': the Hugging Face hub ({constants.ENDPOINT}) is "
                             f"unreachable ({unreachable}) and '{name}' is not in the local cache; {offline_fix}")
    try:
        return load(name)
    except Exception as e:
        raise TowerLoadError(f"could not load {key} '{name}' from the hub: {one_line(e)}") from None


def _tower_overrides(cfg, modality):
    """Hand-set dimensions from the config; a value <= 0 (dropout < 0) keeps the tower's own."""
    p = f"{modality}_"
    hidden = getattr(cfg, p + "hidden_size")
    mlp_ratio = getattr(cfg, p + "mlp_ratio")
    dims = {"hidden_size": hidden, "num_hidden_layers": getattr(cfg, p + "layers"),
            "num_attention_heads": getattr(cfg, p + "heads")}
    dims = {k: v for k, v in dims.items() if v > 0}
    if mlp_ratio > 0:
        dims["mlp_ratio"] = mlp_ratio  # becomes intermediate_size once the hidden size is known
    if modality == "text" and cfg.text_embedding_size > 0:
        dims["embedding_size"] = cfg.text_embedding_size
    dropout = getattr(cfg, p + "dropout")
    rates = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout} if dropout >= 0 else {}
    return dims, rates


def load_tower(cfg, modality, vocab_size=None, saved_config=None):
    """Build the text or vision tower named by `cfg.<modality>_tower`.

    Three ways: a family name ("bert", "vit", ...) -> random init with the config's hand-set dimensions;
    a hub name or local directory with `<modality>_pretrained=True` -> its weights; with False -> random
    init from its config. With random_init_towers a hub name is built offline from HUB_TOWERS instead, as the hub
    model's config would build it, vocabulary included (hand-set dimensions still apply). Poolers the model never
    uses are not built, so DDP needs no unused-parameter search.
    saved_config: the tower's Hugging Face config dict as a checkpoint recorded it (tower_configs): the tower
    is rebuilt from it, at random, for the checkpoint's weights, with no access to the tower's source.
    """
    name = getattr(cfg, f"{modality}_tower")
    pretrained = getattr(cfg, f"{modality}_pretrained")
    families = TEXT_FAMILIES if modality == "text" else VISION_FAMILIES
    dims, rates = _tower_overrides(cfg, modality)
    tower_key = f"{modality}_tower"
    offline_fix = "give a local directory (save_pretrained output), a family name or random_init_towers=True"
    from_table = cfg.random_init_towers and name not in families and not os.path.isdir(os.path.expanduser(name))
    if saved_config is not None:
        config = AutoConfig.for_model(**saved_config)
        dims = {}  # the recorded config already has the sizes it was built with
        pretrained = False
    elif name in families:
        config = families[name]()
        pretrained = False
    elif from_table:
        if name not in HUB_TOWERS:
            raise TowerLoadError(f"random_init_towers: {tower_key} '{name}' is not a hub model it knows "
                                 f"({', '.join(HUB_TOWERS)}); give a family name and its dimensions instead")
        family, hub_dims = HUB_TOWERS[name]
        if family not in families:
            raise TowerLoadError(f"random_init_towers: {tower_key} '{name}' is a {family} model, "
                                 f"not a {modality} tower")
        config = families[family](**hub_dims)
        pretrained = False
    else:
        config = from_hub_or_directory(AutoConfig.from_pretrained, name, tower_key, offline_fix)
    allowed = TEXT_MODEL_TYPES if modality == "text" else VISION_MODEL_TYPES
    if config.model_type not in allowed:
        kind = "text encoder of the BERT family" if modality == "text" else "transformer vision encoder"
        raise TowerLoadError(f"{modality}_tower '{name}' has model_type '{config.model_type}', not a {kind} "
                             f"(supported: {', '.join(sorted(allowed))})")
    if dims and pretrained:
        raise TowerLoadError(f"{modality} tower dimensions {sorted(dims)} are set but '{name}' is loaded "
                             f"pretrained; set {modality}_pretrained=False to build it at those sizes")
    mlp_ratio = dims.pop("mlp_ratio", None)
    for key, value in {**dims, **rates}.items():
        setattr(config, key, value)
    if mlp_ratio:
        config.intermediate_size = int(mlp_ratio * config.hidden_size)
    if modality == "text" and not pretrained and vocab_size is not None and not from_table:
        config.vocab_size = vocab_size
    if modality == "vision" and not pretrained:
        config.image_size = cfg.image_size
        if cfg.patch_size > 0:
            config.patch_size = cfg.patch_size
    config._attn_implementation = "sdpa"
    model_class, kwargs = _tower_class(config)
    if pretrained:
        return from_hub_or_directory(lambda path, **flags: model_class.from_pretrained(path, config=config, **kwargs,
                                                                                        **flags),
                                     name, f"{tower_key} weights", offline_fix)
    return model_class(config, **kwargs)


def _tower_class(config):
    """The Hugging Face model class of `config`, and the keyword that leaves out a pooler the model never uses."""
    model_class = AutoModel._model_mapping[type(config)]
    kwargs = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}
    return model_class, kwargs


def _layers_path(tower):
    for path in ("encoder.layer", "layers", "encoder.layers", "transformer.layer"):
        try:
            tower.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise TowerLoadError(f"cannot find the transformer layers of {type(tower).__name__}")


def tower_layers(tower):
    """The tower's stack of transformer layers (attribute names differ between families)."""
    return tower.get_submodule(_layers_path(tower))


def tower_parts(tower):
    """Dotted names of the tower's parts, bottom to top: (embeddings, [layer 0 .. n-1], final parts).

    "Train only the top k layers" freezes the embeddings and the layers below the top k: one number.
    """
    path = _layers_path(tower)
    layers = [f"{path}.{i}" for i in range(len(tower.get_submodule(path)))]
    children = [n for n, m in tower.named_children() if any(True for _ in m.parameters())]
    embeddings = [n for n in children if n in ("embeddings", "embeddings_project")]
    final = [n for n in children if n not in embeddings and n != path.split(".")[0]]
    return embeddings, layers, final


def requires_grad(module):
    return any(p.requires_grad for p in module.parameters())


def init_new(module, bert_init):
    """`module` with BERT's initialisation when bert_init (init_new_modules="bert"), else PyTorch's defaults."""
    return init_bert_style(module) if bert_init else module


def init_bert_style(module):
    """BERT's initialisation, as the original gives every module it adds: Linear and Embedding weights
    N(0, 0.02) with zero biases, LayerNorm weight 1 and bias 0. Returns the module."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


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


# On CPU torch draws a dropout mask with bernoulli_, about 9 ns an element on a 2-core machine (ten times a
# softmax): with dropout in every attention map and sublayer, the cross-modal layers of the paper's model spent
# a sixth of a pretraining step drawing masks. Their dropout draws 15-bit random integers instead (two from each
# 31-bit int32 draw) and keeps an element where its integer is at least round(p * 2**15): the rate is p to within
# 2**-16, the kept elements are scaled so the expectation is exact, the mask comes from torch's generator (so
# seeds, checkpoint recomputation and resume behave as before) and is saved as one byte an element. On GPUs,
# F.dropout and the fused attention kernels are fast already and are used as they are; so is F.dropout under
# torch.compile, which generates its own masks (an in-place random_ would break the graph).
DROPOUT_BITS = 15


class _KeepAndScale(torch.autograd.Function):
    """x * keep * scale with keep a bool mask; backward applies the same mask (saved as bools, not floats)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def dropout(x, p, training=True):
    """F.dropout(x, p, training), with the mask drawn as the comment above says when x is on the CPU."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    threshold = round(p * 2 ** DROPOUT_BITS)
    n = x.numel()
    draws = torch.empty((n + 1) // 2, dtype=torch.int32).random_()  # uniform over [0, 2**31)
    keep = (draws.view(torch.int16)[:n] & (2 ** DROPOUT_BITS - 1)) >= threshold  # low 15 bits of each half
    return _KeepAndScale.apply(x, keep.view(x.shape), 2 ** DROPOUT_BITS / (2 ** DROPOUT_BITS - threshold))


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` above (same p, same train/eval behaviour)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


def attention_with_dropout(q, k, v, attn_mask, p):
    """scaled_dot_product_attention written out, with `dropout` on the attention weights. q (B, h, T, d),
    k and v (B, h, S, d), attn_mask (B, 1, 1, S) bool (True = attend) or None -> (B, h, T, d)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, T, S)
    if attn_mask is not None:
        scores.masked_fill_(~attn_mask, float("-inf"))  # in place: the product's backward does not read it
    return dropout(scores.softmax(-1), p) @ v


class Attention(nn.Module):
    """Multi-head attention of `x` over `context` (itself for self-attention) with scaled_dot_product_attention."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        assert dim % heads == 0, f"cross_hidden {dim} is not divisible by cross_heads {heads}"
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context, context_mask):
        B, T, D = x.shape
        S = context.shape[1]
        q = self.q(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, h, T, d)
        k, v = self.kv(context).view(B, S, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, S, d)
        attn_mask = None if context_mask is None else context_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        dropout_p = self.dropout if self.training else 0.0
        if dropout_p > 0 and q.device.type == "cpu" and not torch.compiler.is_compiling():
            # No fused CPU kernel takes dropout. Written out, attention would keep the (B, h, T, S) weights and
            # their mask for backward; they are recomputed there instead (same RNG state, so the same mask), as
            # the fused GPU kernels do: a few percent more FLOPs for about a fifth less activation memory.
            if torch.is_grad_enabled():
                y = checkpoint(attention_with_dropout, q, k, v, attn_mask, dropout_p, use_reentrant=False)
            else:
                y = attention_with_dropout(q, k, v, attn_mask, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


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

    def attend_across(self, x, other, other_mask):  # (B, T, D) attends to (B, S, D) -> (B, T, D)
        return self.norm_cross(x + self.drop(self.cross_attn(x, other, other_mask)))

    def forward(self, t, t_mask, v, v_mask, cls_only=()):
        # every row goes through cross-attention (self-attention reads them all); cls_only trims after it
        t_cross, v_cross = self.attend_across(t, v, v_mask), self.attend_across(v, t, t_mask)
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
    model_class, kwargs = _tower_class(encoder.stack_config)
    with torch.device("meta"):  # every parameter is replaced by the encoder's below
        tower = model_class(encoder.stack_config, **kwargs)
    tower.embeddings = encoder.text_embeddings if encoder.stack_modality == "text" else encoder.image_embeddings
    if encoder.text_embeddings_project is not None:
        tower.embeddings_project = encoder.text_embeddings_project
    tower.set_submodule(_layers_path(tower), encoder.layers)
    if encoder.final_norm is not None:
        tower.layernorm = encoder.final_norm
    return {encoder.stack_modality: tower}


# -----------------------------------------------------------------------------
# Heads


class MLMHead(nn.Module):
    """Masked language modelling: transform, then vocabulary logits only at the given positions."""

    def __init__(self, dim, vocab_size, bert_init=False):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.decoder = nn.Linear(dim, vocab_size)
        init_new(self, bert_init)

    def forward(self, text_feats, positions):  # (B, T, D), (N,) indices into the B*T positions -> (N, V)
        # Gathering first avoids paying the vocabulary projection for ~85% of positions that carry no label.
        return self.decoder(self.transform(text_feats.flatten(0, 1).index_select(0, positions)))


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
                  image: two text-tower and two cross-modal passes (the ViLT / METER recipe).
      "shared"    one pass of the masked caption with the paired image serves both: ITM reads the pooled
                  output, MLM the text features of matched pairs only (a mismatched picture would teach the
                  MLM head to ignore the image). One text-tower and one cross-modal pass: over a third fewer
                  FLOPs per step for the paper's two-tower model, and half the MLM targets per batch.
    Text-only batches (no "pixel_values" and no "image_feats": a text corpus, see data.ScheduledLoader) train MLM
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
        see data.with_cached_vision_features), else through the tower."""
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
        clean = paired = None
        if self.itc_head is not None:  # ITC on the clean caption and its picture, before fusion (ALBEF)
            clean = enc.encode_text(batch["input_ids"], batch["attention_mask"])
            itc, paired = self.itc_head(clean, image, batch)  # paired: ITM's pictures (hard negatives if asked)
            out.update(itc)
            loss = loss + self.itc_weight * itc["itc_loss"]
        if paired is None and self.itm_head is not None:
            paired = image.select(batch["itm_image_index"])
        if self.pretrain_pass == "shared":
            mlm_fused = itm_fused = enc.fuse(enc.encode_text(batch["mlm_input_ids"], batch["attention_mask"]),
                                             paired, cls_only=("image",))
        else:
            if self.mlm_head is not None:  # MLM reads text features: only the image stream may stop at its CLS
                mlm_fused = enc.fuse(enc.encode_text(batch["mlm_input_ids"], batch["attention_mask"]), image,
                                     cls_only=("image",))
            if self.itm_head is not None:  # ITM reads the pooled CLS pair only
                clean = clean if clean is not None else enc.encode_text(batch["input_ids"], batch["attention_mask"])
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
