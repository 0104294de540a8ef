"""Attention and dropout kernels the encoders share: dropout with cheap masks on the CPU, attention written out
with that dropout, and the attention function the Hugging Face towers call (`tower_attention`).

On GPUs everything here hands over to torch's fused kernels (F.dropout, scaled_dot_product_attention). The CPU is
where they cost: bernoulli_ masks, the flash kernel's backward in bfloat16, and SDPA's unfused path with dropout.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

# -----------------------------------------------------------------------------
# Dropout

# On CPU torch draws a dropout mask with bernoulli_, about 9 ns an element on a 2-core machine (ten times a
# softmax): with dropout in every attention map and sublayer, the cross-modal layers of the paper's model spent
# a sixth of a pretraining step drawing masks. Their dropout draws 15-bit random integers instead (four from each
# 63-bit int64 draw) and keeps an element where its integer is at least round(p * 2**15): the rate is p to within
# 2**-16, the kept elements are scaled so the expectation is exact, the mask comes from torch's generator (so
# seeds, checkpoint recomputation and resume behave as before) and is saved as one byte an element. On GPUs,
# F.dropout and the fused attention kernels are fast already and are used as they are. Under torch.compile the
# mask comes from the same draw, wrapped as an opaque operator (`dropout_keep`, tagged as seeded random so the
# compiler neither merges two draws nor recomputes one in backward): the compiler's own CPU random numbers cost
# more than the fusion they allow, and the masks still come from torch's generator, drawn as in eager.
DROPOUT_BITS = 15


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A uint8 mask shaped like x, each element 1 (kept) with probability 1 - p to within 2**-16, else 0. uint8,
    not bool: torch's CPU kernels compare into it and multiply by it about three times as fast."""
    threshold = round(p * 2 ** DROPOUT_BITS)
    n = x.numel()
    # uniform over [0, 2**63): each of an int64's four 16-bit parts has 15 random low bits. torch draws integers
    # one at a time on one thread, and an int64 costs 1.3x an int32 for twice the bits (8.3 against 6.3 ns)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
    low_bits = draws.view(torch.int16)[:n] & (2 ** DROPOUT_BITS - 1)
    return torch.ge(low_bits, threshold, out=torch.empty(n, dtype=torch.uint8)).view(x.shape)


# keep_mask as the operator compiled code calls; eager code calls keep_mask itself (the operator's dispatch costs
# about 65 us a call, measured on this project's 2-core CPU). The name says the dtype: inductor's on-disk cache
# kept graphs compiled when the masks were bool and reused them for a uint8 operator of the old name.
dropout_keep = torch.library.custom_op("vlenc::dropout_keep_u8", mutates_args=(),
                                       tags=(torch.Tag.nondeterministic_seeded,))(keep_mask)


@dropout_keep.register_fake
def _(x, p):
    return torch.empty_like(x, dtype=torch.uint8)


def dropout_scale(p):
    """What the kept elements are multiplied by: 1 / the exact keep rate of `keep_mask`."""
    return 2 ** DROPOUT_BITS / (2 ** DROPOUT_BITS - round(p * 2 ** DROPOUT_BITS))


def _masked(x, keep):
    """x * keep for a uint8 keep mask, in x's dtype: the mask is cast and then multiplied in place, where
    x.mul(keep) would cast it into a temporary of its own and multiply into a third tensor."""
    return keep.to(x.dtype).mul_(x)


class _KeepAndScale(torch.autograd.Function):
    """x * keep * scale with keep a uint8 mask; backward applies the same mask (saved as bytes, not floats)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return _masked(grad, keep).mul_(ctx.scale), None, None


def dropout(x, p, training=True):
    """F.dropout(x, p, training), with the mask drawn as the comment above says when x is on the CPU."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    scale = dropout_scale(p)
    if torch.compiler.is_compiling():  # the compiler fuses the product into its neighbours and saves the mask
        return x * dropout_keep(x, p) * scale
    return _KeepAndScale.apply(x, keep_mask(x, p), scale)


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` above (same p, same train/eval behaviour)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


def attention_weights(q, k, attn_mask):
    """softmax(q k^T + attn_mask) (B, h, T, S) for q already scaled, attn_mask as for `attention_with_dropout`."""
    scores = q @ k.transpose(-2, -1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores.masked_fill_(~attn_mask, float("-inf"))  # in place: the product's backward does not read it
    elif attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(-1)


class _Attend(torch.autograd.Function):
    """dropout(softmax(q k^T * scale + mask)) @ v for training on the CPU, with backward written out too.

    It keeps for backward the softmax weights and the one-byte keep mask and applies the mask again there, where
    autograd would keep the dropped weights as well (9 bytes an element of the (B, h, T, S) map against 5). And
    it makes q, k and v contiguous once: heads split off one (B, N, 3D) product are strided views, which each
    batched product would otherwise copy, backward's four products as well as forward's two. (Its name matches
    none of bench.py's profile buckets, so its products count as matmul time and its softmax as attention.)"""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q, k, v, attn_mask, p, scale):
        q = torch.mul(q, scale, out=torch.empty(q.shape, dtype=q.dtype))  # scaled and contiguous in one pass
        k, v = k.contiguous(), v.contiguous()
        weights = attention_weights(q, k, attn_mask)
        keep = keep_mask(weights, p)
        ctx.save_for_backward(q, k, v, weights, keep)
        ctx.scale, ctx.keep_scale = scale, dropout_scale(p)
        # the keep rate's scale goes on the (B, h, T, d) output, not on the (B, h, T, S) map
        return (_masked(weights, keep) @ v).mul_(ctx.keep_scale)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        q, k, v, weights, keep = ctx.saved_tensors  # q scaled
        # the output's gradient arrives with its heads interleaved, (B, T, h, d) in memory: scaled by the keep
        # rate's scale and made contiguous in one pass, it carries that scale into both products below
        grad = torch.mul(grad, ctx.keep_scale, out=torch.empty(grad.shape, dtype=grad.dtype))
        grad_v = _masked(weights, keep).transpose(-2, -1) @ grad
        grad_weights = (grad @ v.transpose(-2, -1)).mul_(keep)
        grad_scores = torch._softmax_backward_data(grad_weights.to(weights.dtype), weights, -1, weights.dtype)
        return (grad_scores @ k).mul_(ctx.scale), grad_scores.transpose(-2, -1) @ q, grad_v, None, None, None


def attention_with_dropout(q, k, v, attn_mask, p, scale=None):
    """scaled_dot_product_attention written out, with `dropout` on the attention weights. q (B, h, T, d),
    k and v (B, h, S, d), attn_mask broadcasting to (B, h, T, S): bool (True = attend), additive float, or None;
    scale defaults to d ** -0.5 -> (B, h, T, d). Training on the CPU goes through _Attend; elsewhere
    (no gradient, or under torch.compile, which writes its own backward) autograd takes the same ops."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if (p > 0 and q.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (attn_mask is None or not attn_mask.requires_grad)):
        return _Attend.apply(q, k, v, attn_mask, p, scale)
    return dropout(attention_weights(q * scale, k, attn_mask), p) @ v


# -----------------------------------------------------------------------------
# The towers' attention

# The Hugging Face towers call attention through transformers' AttentionInterface, under this name (towers.py sets
# it on every tower family that supports the interface, "sdpa" on the others). On a GPU it is transformers' own
# SDPA function. On the CPU torch's SDPA costs more than it saves in two cases, measured on the paper's towers
# (fwd + bwd, 2 threads; tests/test_attention.py checks both against SDPA):
# - with dropout (ELECTRA trains with 0.1 on its attention weights) SDPA takes its unfused path and draws the mask
#   with bernoulli_; written out with `dropout` above it draws the cheap mask instead;
# - in bfloat16 the flash kernel's backward is slow: DeiT-Tiny's attention (8 x 3 heads x 198 tokens) took 9.2 ms
#   fwd + bwd with SDPA and 3.8 ms written out, on a CPU with AVX-512 BF16 (1.0x in float32, where SDPA stays).
TOWER_ATTENTION = "vlenc"


def tower_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                    **kwargs):
    """transformers' attention function contract: q (B, h, T, d), k and v (B, h, S, d), the mask from
    `sdpa_mask` (bool, True = attend, or None) -> ((B, T, h, d), None)."""
    written_out = query.device.type == "cpu" and (dropout > 0 or query.dtype != torch.float32)
    if not written_out or is_causal or key.shape[1] != query.shape[1]:  # causal or grouped heads: not encoders'
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :key.shape[-2]]
    out = attention_with_dropout(query, key, value, attention_mask, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(TOWER_ATTENTION, tower_attention)
AttentionMaskInterface.register(TOWER_ATTENTION, sdpa_mask)
