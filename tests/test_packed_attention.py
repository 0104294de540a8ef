"""The cross-modal layers' packed products against the plain ones they replace: self-attention with one q|k|v
product, and LXMERT's shared cross-attention running both directions on the streams side by side. Outputs and
gradients (inputs and every weight) must be those of the unpacked computation, padding masks included."""

import torch
import torch.nn.functional as F

from encoders import Attention, LxmertCrossModalLayer

B, T, S, D, HEADS = 3, 6, 9, 32, 4


def separate(attention, x, context, context_mask):
    """Attention as it was before packing: q from x, k and v from context, each with its own product."""
    heads = attention.heads
    q = attention.q(x).view(B, x.shape[1], heads, D // heads).transpose(1, 2)
    k, v = attention.kv(context).view(B, context.shape[1], 2, heads, D // heads).permute(2, 0, 3, 1, 4)
    mask = None if context_mask is None else context_mask[:, None, None, :].bool()
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attention.out(y.transpose(1, 2).reshape(B, x.shape[1], D))


def gradients(module, inputs, output):
    module.zero_grad(set_to_none=True)
    for x in inputs:
        x.grad = None
    output.square().sum().backward()
    return [x.grad.clone() for x in inputs] + [p.grad.clone() for p in module.parameters()]


def assert_same(packed, plain):
    for a, b in zip(packed, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def streams():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(B, T, D, generator=g, requires_grad=True)
    v = torch.randn(B, S, D, generator=g, requires_grad=True)
    t_mask = torch.ones(B, T, dtype=torch.long)
    t_mask[0, 4:] = 0  # padded text
    return t, t_mask, v


def test_self_attention_with_one_product_matches_separate_products():
    torch.manual_seed(0)
    attention = Attention(D, HEADS, dropout=0.0).train()
    x, mask, _ = streams()
    packed = attention(x, x, mask)  # x is its own context: the packed path
    plain = separate(attention, x, x, mask)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)
    assert_same(gradients(attention, [x], packed), gradients(attention, [x], plain))


def test_co_attention_side_by_side_matches_the_two_directions():
    torch.manual_seed(0)
    attention = Attention(D, HEADS, dropout=0.0).train()
    t, t_mask, v = streams()
    packed = attention.co_attend(torch.cat([t, v], 1), T, t_mask, None)
    plain = torch.cat([separate(attention, t, v, None), separate(attention, v, t, t_mask)], 1)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)
    assert_same(gradients(attention, [t, v], packed), gradients(attention, [t, v], plain))


def test_lxmert_layer_matches_its_unpacked_reference():
    """The whole layer, cls_only included, against cross-attention run once per direction and self-attention
    with separate products."""
    torch.manual_seed(0)
    layer = LxmertCrossModalLayer(D, HEADS, 2.0, dropout=0.0).train()
    t, t_mask, v = streams()

    def stream(part, x, mask, cls_only):
        q = x[:, :1] if cls_only else x
        x = part.norm_self(q + separate(part.self_attn, q, x, mask))
        return part.norm_mlp(x + part.mlp(x))

    def reference(cls_only):
        t_cross = layer.norm_cross(t + separate(layer.cross_attn, t, v, None))
        v_cross = layer.norm_cross(v + separate(layer.cross_attn, v, t, t_mask))
        return (stream(layer.text, t_cross, t_mask, "text" in cls_only),
                stream(layer.image, v_cross, None, "image" in cls_only))

    for cls_only in ((), ("image",), ("text", "image")):
        packed, plain = torch.cat(layer(t, t_mask, v, None, cls_only), 1), torch.cat(reference(cls_only), 1)
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
        assert_same(gradients(layer, [t, v], packed), gradients(layer, [t, v], plain))
