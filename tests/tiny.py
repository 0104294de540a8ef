"""Tiny configurations shared by the tests: every tower built offline at hidden size 32."""

from config import Config

TINY = dict(
    text_tower="bert", vision_tower="vit", tokenizer="synthetic",
    text_hidden_size=32, text_layers=2, text_heads=2, text_mlp_ratio=2.0, text_embedding_size=0, text_dropout=0.0,
    vision_hidden_size=32, vision_layers=2, vision_heads=2, vision_mlp_ratio=2.0, vision_dropout=0.0,
    image_size=32, patch_size=8, cross_layers=2, cross_hidden=32, cross_heads=2, cross_mlp_ratio=2.0,
    cross_dropout=0.0, max_text_len=16, device="cpu",
)

# a dual encoder: no fusion, trained by ITC alone
DUAL_ENCODER = dict(model_type="dual_encoder", mlm_weight=0.0, itm_weight=0.0, itc_weight=1.0, embed_dim=24)


def tiny_config(**overrides):
    return Config(**{**TINY, **overrides})
