"""attention.py: the attention function the Hugging Face towers call (`tower_attention`) against transformers' own
SDPA function, and its wiring into every tower load_tower builds."""

import pytest
import torch
import torch.nn as nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import attention
from attention import TOWER_ATTENTION, keep_mask, tower_attention
from towers import load_tower
from tiny import tiny_config

B, H, T, D = 3, 2, 7, 8


def qkv(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def padding_mask():
    """sdpa_mask's form: (B, 1, T, T) bool, True = attend; row 1 has three padded keys, row 2 one."""
    keys = torch.ones(B, T, dtype=torch.bool)
    keys[1, -3:] = False
    keys[2, -1:] = False
    return keys[:, None, None, :].expand(B, 1, T, T)


def forward_backward(fn, q, k, v, **kwargs):
    out, weights = fn(nn.Module(), q, k, v, padding_mask(), scaling=0.3, **kwargs)
    assert weights is None and out.shape == (B, T, H, D)
    grads = torch.autograd.grad((out.float() * torch.linspace(-1, 1, D)).sum(), (q, k, v))
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tower_attention_without_dropout_is_sdpa(dtype):
    """Padding mask, scaling and the (B, T, h, d) layout as transformers' SDPA function, values and gradients;
    bfloat16 (written out on the CPU) within bfloat16's rounding."""
    q, k, v = qkv(dtype)
    out, grads = forward_backward(tower_attention, q, k, v)
    ref, ref_grads = forward_backward(sdpa_attention_forward, q, k, v)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **(tol if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)))


def test_tower_attention_with_dropout_draws_the_cheap_mask():
    """With dropout on the CPU: softmax(q k^T * scaling, padding) with keep_mask's mask (torch's generator, so the
    same seed gives the same mask) and the kept weights scaled up, values and gradients."""
    q, k, v = qkv()
    torch.manual_seed(5)
    out, grads = forward_backward(tower_attention, q, k, v, dropout=0.25)
    torch.manual_seed(5)
    scores = (q * 0.3) @ k.transpose(-2, -1)
    weights = scores.masked_fill(~padding_mask(), float("-inf")).softmax(-1)
    keep = keep_mask(weights, 0.25)
    assert 0.6 < keep.float().mean() < 0.9
    dropped = weights * keep / (1 - round(0.25 * 2 ** 15) / 2 ** 15)
    ref = (dropped @ v).transpose(1, 2)
    ref_grads = torch.autograd.grad((ref * torch.linspace(-1, 1, D)).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    torch.manual_seed(6)
    assert not torch.equal(tower_attention(nn.Module(), q, k, v, padding_mask(), dropout=0.25, scaling=0.3)[0], out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "padding", "additive"])
def test_written_out_attention_backward_is_autograds(dtype, mask):
    """attention_with_dropout in CPU training (its own backward) against autograd through the same ops with the
    same mask, on q, k and v split off one packed product as the layers do (strided views), under bfloat16
    autocast too: float32 within its rounding (products and scaling come in another order), bfloat16 within
    its own."""
    g = torch.Generator().manual_seed(1)
    packed = torch.randn(B, T, 3, H, D, generator=g, requires_grad=True)
    q, k, v = packed.permute(2, 0, 3, 1, 4)
    attn_mask = {"none": None, "padding": padding_mask(), "additive": torch.randn(B, 1, T, T, generator=g)}[mask]
    weight = torch.randn(B, T, H, D, generator=g)

    def grads(fn):
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fn()
        return out, torch.autograd.grad((out.transpose(1, 2).float() * weight).sum(), packed)[0]

    out, grad = grads(lambda: attention.attention_with_dropout(q, k, v, attn_mask, 0.25, scale=0.3))
    ref, ref_grad = grads(lambda: attention.dropout(attention.attention_weights(q * 0.3, k, attn_mask), 0.25) @ v)
    assert out.dtype == ref.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)  # the keep rate's scale is applied after the product there
    torch.testing.assert_close(grad, ref_grad, **tol)


def test_tower_attention_hands_causal_attention_to_sdpa():
    q, k, v = qkv()
    out, _ = tower_attention(nn.Module(), q, k, v, None, dropout=0.0, scaling=0.3, is_causal=True)
    ref, _ = sdpa_attention_forward(nn.Module(), q, k, v, None, dropout=0.0, scaling=0.3, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_towers_call_tower_attention(modality, monkeypatch):
    """Every tower load_tower builds attends through tower_attention and drops out through attention.Dropout: in
    training each layer draws a cheap mask over its (B, h, N, N) attention weights and its hidden states; in eval
    mode none; and a tower switched to transformers' SDPA gives the same output in eval mode, in float32 exactly
    and under bfloat16 autocast within rounding."""
    cfg = tiny_config(text_dropout=0.2, vision_dropout=0.2)
    torch.manual_seed(0)
    tower = load_tower(cfg, modality, vocab_size=50)
    assert tower.config._attn_implementation == TOWER_ATTENTION
    inputs = ({"input_ids": torch.randint(5, 50, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
              if modality == "text" else {"pixel_values": torch.randn(2, 3, 32, 32)})
    drawn = []
    monkeypatch.setattr(attention, "keep_mask", lambda x, p: (drawn.append((tuple(x.shape), p)), torch.ones_like(
        x, dtype=torch.bool))[1])
    tower.train()(**inputs)
    n = 6 if modality == "text" else 17
    assert [s for s in drawn if s[0] == (2, 2, n, n)] == [((2, 2, n, n), 0.2)] * 2  # two layers' attention weights
    # and the hidden states' dropout too: the embeddings', then each layer's after attention and after its MLP
    assert [s for s in drawn if s[0] == (2, n, 32)] == [((2, n, 32), 0.2)] * 5
    assert not any(type(m) is nn.Dropout for m in tower.modules())
    drawn.clear()
    with torch.no_grad():
        tower.eval()
        out = tower(**inputs).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = tower(**inputs).last_hidden_state
        tower.config._attn_implementation = "sdpa"
        ref = tower(**inputs).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16 = tower(**inputs).last_hidden_state
    assert not drawn
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out_bf16.float(), ref_bf16.float(), rtol=5e-2, atol=5e-2)
