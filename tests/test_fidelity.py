"""Fidelity to the original Renaissance code: the LXMERT cross layer against transformers' LxmertXLayer, fresh
one-tower embeddings, BERT-style initialisation, dropout in frozen towers, the crop transform, and every paper
config's resolved values against README's "Differences from the original" table."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image
from transformers import BertConfig, BertModel, LxmertConfig
from transformers.models.lxmert.modeling_lxmert import LxmertXLayer

import data
from config import Config, ConfigError, KEY_TYPES, load_config, validate
from encoders import (LxmertCrossModalLayer, OneTowerEncoder, PatchEmbeddings, TextEmbeddings, TwoTowerEncoder,
                      build_encoder)
from model import (PretrainModel, TaskModel, apply_freezing, build_pretrain_model, enable_gradient_checkpointing,
                   parameter_summary)
from tiny import tiny_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
VOCAB = 60


def batch(B=3, T=7, image_size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0  # padding, so the masks are exercised
    return ids, mask, torch.randn(B, 3, image_size, image_size, generator=g)


# -----------------------------------------------------------------------------
# The LXMERT cross layer


def copy_into_lxmert(ours, theirs):
    """Copy our LxmertCrossModalLayer's weights into transformers' LxmertXLayer (fused k|v split in two)."""
    def attention(src, att, out, norm):
        d = src.q.out_features
        att.query.load_state_dict(src.q.state_dict())
        att.key.weight.data, att.key.bias.data = src.kv.weight[:d].clone(), src.kv.bias[:d].clone()
        att.value.weight.data, att.value.bias.data = src.kv.weight[d:].clone(), src.kv.bias[d:].clone()
        out.dense.load_state_dict(src.out.state_dict())
        out.LayerNorm.load_state_dict(norm.state_dict())

    attention(ours.cross_attn, theirs.visual_attention.att, theirs.visual_attention.output, ours.norm_cross)
    for stream, self_att, inter, output in ((ours.text, theirs.lang_self_att, theirs.lang_inter, theirs.lang_output),
                                            (ours.image, theirs.visn_self_att, theirs.visn_inter, theirs.visn_output)):
        attention(stream.self_attn, self_att.self, self_att.output, stream.norm_self)
        inter.dense.load_state_dict(stream.mlp[0].state_dict())
        output.dense.load_state_dict(stream.mlp[2].state_dict())
        output.LayerNorm.load_state_dict(stream.norm_mlp.state_dict())


def test_lxmert_layer_matches_transformers_lxmert_x_layer():
    torch.manual_seed(0)
    ours = LxmertCrossModalLayer(32, 4, 2.0, 0.0).eval()
    for p in ours.parameters():  # not the init's zero biases and unit norms: every weight must be copied right
        p.data.normal_(0, 0.2)
    theirs = LxmertXLayer(LxmertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    copy_into_lxmert(ours, theirs)
    g = torch.Generator().manual_seed(1)
    t, v = torch.randn(3, 7, 32, generator=g), torch.randn(3, 5, 32, generator=g)
    t_mask, v_mask = torch.ones(3, 7, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)
    t_mask[0, 3:] = 0
    v_mask[1, 4:] = 0
    additive = lambda m: (1.0 - m[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        want_t, want_v = theirs(t, additive(t_mask), v, additive(v_mask))[:2]
        got_t, got_v = ours(t, t_mask, v, v_mask)
        cls_t, cls_v = ours(t, t_mask, v, v_mask, cls_only=("text", "image"))
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v, want_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls_t, want_t[:, :1], atol=1e-5, rtol=1e-5)  # the saving hint is exact
    torch.testing.assert_close(cls_v, want_v[:, :1], atol=1e-5, rtol=1e-5)


def test_lxmert_cross_attention_is_one_module_shared_by_both_directions():
    layer = LxmertCrossModalLayer(32, 4, 2.0, 0.0)
    names = [n for n, _ in layer.named_modules()]
    assert [n for n in names if "cross" in n] == ["cross_attn", "cross_attn.q", "cross_attn.kv", "cross_attn.out",
                                                 "norm_cross"]
    assert not any(n.startswith(("text.cross", "image.cross")) for n in names)


LXMERT = dict(cross_layer_type="lxmert", cross_dropout=0.1)


def test_lxmert_two_tower_keeps_the_contract_freezing_checkpointing_and_cpu_dropout():
    cfg = tiny_config(**LXMERT)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, VOCAB)
    enc = model.encoder
    assert all(isinstance(layer, LxmertCrossModalLayer) for layer in enc.cross_layers)
    assert isinstance(enc.text_norm, nn.Identity)  # post-LN layers end normalised: no final norm, as the original
    ids, mask, pixels = batch()
    out = enc.eval()(ids, mask, pixels)
    assert out.text_feats.shape == (3, 7, 32) and out.image_feats.shape == (3, 17, 32) and out.pooled.shape == (3, 64)
    padded = enc(ids[:, :4], mask[:, :4], pixels)  # padding changes nothing for the row that has it
    torch.testing.assert_close(out.pooled[0], padded.pooled[0], atol=1e-5, rtol=1e-5)

    apply_freezing(model, tiny_config(**LXMERT, freeze_cross=True))
    assert not any(p.requires_grad for p in enc.cross_layers.parameters())
    apply_freezing(model, cfg)

    data_batch = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, mlm_input_ids=ids.clone(),
                      mlm_labels=torch.where(torch.arange(7) == 2, ids, -100), itm_image_index=torch.tensor([1, 0, 2]),
                      itm_labels=torch.tensor([0, 0, 1]))
    data_batch["mlm_positions"] = PretrainModel.mlm_positions(data_batch["mlm_labels"], data_batch["itm_labels"],
                                                              cfg.pretrain_pass)

    def grads(checkpointing):
        torch.manual_seed(0)
        m = build_pretrain_model(cfg, VOCAB).train()
        if checkpointing:
            enable_gradient_checkpointing(m)
        torch.manual_seed(5)  # the same dropout masks
        m(data_batch)["loss"].backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and any("cross_layers" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], recomputed[name], atol=1e-5, rtol=1e-4)
    # dropout is live in training (the CPU path) and off in eval
    model.train()
    assert not torch.equal(enc(ids, mask, pixels).pooled, enc(ids, mask, pixels).pooled)
    model.eval()
    assert torch.equal(enc(ids, mask, pixels).pooled, enc(ids, mask, pixels).pooled)


def frozen_base_model(layer_type):
    """frozen_base's trainable part at its exact sizes: ELECTRA-Base and ViT-Base widths (768), 10 cross-modal
    layers of 256, BERT's 30,522 word pieces. Frozen towers count for nothing trainable, so they get one layer."""
    cfg = Config(text_tower="electra", text_hidden_size=768, text_layers=1, text_heads=12,
                        text_embedding_size=768, vision_tower="vit", vision_hidden_size=768, vision_layers=1,
                        vision_heads=12, patch_size=16, cross_layers=10, cross_hidden=256, cross_heads=4,
                        cross_layer_type=layer_type, freeze_text=True, freeze_vision=True, device="cpu")
    model = build_pretrain_model(cfg, 30522)
    apply_freezing(model, cfg)
    return model


def test_frozen_base_trains_under_27m_parameters_as_the_paper_says():
    trainable = {t: parameter_summary(frozen_base_model(t))[-1][1] for t in ("lxmert", "meter")}
    print(f"frozen_base trainable parameters: lxmert {trainable['lxmert']:,}, meter {trainable['meter']:,}")
    assert 26_000_000 < trainable["lxmert"] < 27_000_000  # the paper: "under 27M trainable"
    assert trainable["meter"] > 29_000_000  # what METER's per-stream cross-attention costs


# -----------------------------------------------------------------------------
# One-tower embeddings


def saved_bert(tmp_path):
    torch.manual_seed(3)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                     add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    return bert


def test_fresh_one_tower_embeddings_are_new_and_only_the_layers_are_the_towers(tmp_path):
    bert = saved_bert(tmp_path)
    common = dict(model_type="one_tower", onetower_stack="text", text_tower=str(tmp_path / "bert"),
                  text_pretrained=True, text_hidden_size=-1, text_layers=-1, text_heads=-1, text_mlp_ratio=-1.0,
                  text_embedding_size=-1, text_dropout=-1.0)
    fresh = build_encoder(tiny_config(**common, onetower_embeddings="fresh"), VOCAB)
    tower = build_encoder(tiny_config(**common, onetower_embeddings="tower"), VOCAB)
    want = bert.encoder.layer.state_dict()
    for enc in (fresh, tower):  # the stack's weights are the tower's either way
        for name, value in enc.layers.state_dict().items():
            torch.testing.assert_close(value, want[name])
    assert isinstance(fresh.text_embeddings, TextEmbeddings) and isinstance(fresh.image_embeddings, PatchEmbeddings)
    assert fresh.final_norm is None
    assert not torch.equal(fresh.text_embeddings.word.weight, bert.embeddings.word_embeddings.weight)
    tower_embedding_storage = {p.data_ptr() for p in bert.embeddings.parameters()}
    assert not tower_embedding_storage & {p.data_ptr() for p in fresh.parameters()}
    assert tower.text_embeddings is not None and not isinstance(tower.text_embeddings, TextEmbeddings)
    assert all(not k.startswith("text_embeddings.word_embeddings") for k in fresh.state_dict())
    ids, mask, pixels = batch()
    out = fresh(ids, mask, pixels)
    assert out.text_feats.shape == (3, 7, 32) and out.image_feats.shape == (3, 17, 32)


def test_fresh_vision_stack_drops_the_towers_patch_embeddings_and_final_norm():
    common = dict(model_type="one_tower", onetower_stack="vision")
    fresh = build_encoder(tiny_config(**common, onetower_embeddings="fresh"), VOCAB)
    tower = build_encoder(tiny_config(**common), VOCAB)
    assert isinstance(fresh.image_embeddings, PatchEmbeddings) and fresh.final_norm is None
    assert not isinstance(tower.image_embeddings, PatchEmbeddings) and tower.final_norm is not None
    ids, mask, pixels = batch()
    assert fresh(ids, mask, pixels).pooled.shape == (3, 64)


# -----------------------------------------------------------------------------
# Initialisation of new modules


def new_module_parts(model):
    enc = model.encoder
    if isinstance(enc, TwoTowerEncoder):
        parts = [enc.text_proj, enc.image_proj, enc.modality_type, enc.cross_layers, enc.text_pooler, enc.image_pooler]
    else:
        parts = [enc.modality_type, enc.text_pooler, enc.image_pooler]
    return parts + list(model.heads())


@pytest.mark.parametrize("overrides", [dict(cross_layer_type="lxmert"), dict(cross_layer_type="meter"),
                                       dict(model_type="one_tower")])
def test_new_modules_start_bert_style(overrides):
    cfg = tiny_config(cross_hidden=64, cross_heads=4, text_hidden_size=64, text_heads=4, init_new_modules="bert",
                      **overrides)
    torch.manual_seed(0)
    for model in (build_pretrain_model(cfg, 500), TaskModel(build_encoder(cfg, 500), num_labels=3)):
        weights, counted = [], 0
        for part in new_module_parts(model):
            for m in part.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    weights.append(m.weight.detach().flatten())
                if isinstance(m, nn.Linear):
                    assert torch.equal(m.bias, torch.zeros_like(m.bias))
                if isinstance(m, nn.LayerNorm):
                    counted += 1
                    assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
        w = torch.cat(weights)
        assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.02, rel=0.03)
        assert model.encoder.modality_type.weight.std().item() == pytest.approx(0.02, rel=0.15)  # not N(0, 1)


@pytest.mark.parametrize("model_type", ["two_tower", "one_tower"])
def test_new_modules_keep_pytorch_initialisation_by_default(model_type):
    """init_new_modules="torch" (the default): PyTorch's own start, e.g. N(0, 1) modality-type embeddings and
    Linear weights of scale 1/sqrt(fan_in), not 0.02."""
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_config(cross_hidden=64, model_type=model_type), 500)
    assert model.encoder.modality_type.weight.std().item() == pytest.approx(1.0, rel=0.15)
    assert model.itm_head.weight.std().item() > 0.05 and model.itm_head.bias.abs().sum() > 0


# -----------------------------------------------------------------------------
# Frozen towers and dropout


@pytest.mark.parametrize("frozen_dropout", [False, True])
def test_frozen_dropout_switch(frozen_dropout):
    cfg = tiny_config(text_dropout=0.5, freeze_text=True, frozen_dropout=frozen_dropout)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, VOCAB)
    apply_freezing(model, cfg)
    model.train()
    tower = model.encoder.text_tower
    assert tower.training == frozen_dropout and model.encoder.cross_layers.training
    assert not any(p.requires_grad for p in tower.parameters())
    ids, mask, _ = batch()
    first, second = (model.encoder.encode_text(ids, mask).feats for _ in range(2))
    assert torch.equal(first, second) != frozen_dropout  # dropout on in the frozen tower only with the switch
    model.eval()
    assert not tower.training


# -----------------------------------------------------------------------------
# Images


def test_crop_transform_resizes_the_shorter_side_and_centre_crops():
    picture = Image.new("RGB", (80, 20), (0, 0, 0))
    picture.paste((255, 255, 255), (10, 0, 70, 20))  # white, with black left and right edges
    cfg = tiny_config(image_size=8)
    crop = data.build_transform(dataclasses.replace(cfg, image_resize="crop"), train=False)
    squash = data.build_transform(cfg, train=False)
    cropped, squashed = crop(picture), squash(picture)  # uint8: the model normalises on its device
    assert cropped.shape == squashed.shape == (3, 8, 8) and cropped.dtype == torch.uint8
    assert cropped.min() > 250  # the middle square only: shorter side 20 -> 8, width 80 -> 32, centre 8
    assert squashed[:, :, 0].max() < 50  # the squashed picture keeps the black edges
    assert "BICUBIC" in repr(crop)


def test_crop_refused_for_box_tasks():
    with pytest.raises(ConfigError, match="image_resize"):
        validate(Config(task="refcoco", image_resize="crop"))


# -----------------------------------------------------------------------------
# README "Differences from the original" against the paper configs


def differences_table():
    """Rows of README's differences table: (what, default cell, key cell, paper configs cell)."""
    start = README.index("<!-- differences-table")
    table = README[README.index("\n", start) + 1:README.index("<!-- end differences-table -->")].strip()
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]
    assert rows and all(len(r) == 5 for r in rows), "each row: what | original | default | key | paper configs"
    return [(r[0], r[2], r[3], r[4]) for r in rows]


def literal(cell):
    """'`value`', optionally followed by a remark in parentheses -> the Python value."""
    match = re.fullmatch(r"`([^`]+)`(\s*\(.*\))?", cell.strip())
    assert match, f"not a single `literal`: {cell!r}"
    return ast.literal_eval(match[1])


def paper_config_values(cell):
    """'`glob`, `glob`: `value`; ...' -> {config file name: value}."""
    values = {}
    for part in cell.split(";"):
        names, value = part.rsplit(":", 1)
        for glob in re.findall(r"`([\w*]+)`", names):
            found = sorted(p.name for p in (ROOT / "configs").glob(f"{glob}.py"))
            assert found, f"no config matches {glob}"
            for name in found:
                values[name] = literal(value)
    return values


def test_paper_configs_resolve_to_the_differences_table():
    rows = [r for r in differences_table() if r[2] != "—"]
    assert {"onetower_embeddings", "cross_layer_type", "whole_word_mask", "max_text_len", "eps", "grad_clip",
            "image_resize", "image_mean", "frozen_dropout", "vision_tower", "max_steps", "lr_mult_cross",
            "lr_mult_heads", "image_size"} <= {r[2].strip("`") for r in rows}
    defaults = Config()
    resolved = {}
    checked = 0
    for what, default, key_cell, paper in rows:
        key = key_cell.strip("`")
        assert key in KEY_TYPES, f"{what}: unknown key {key}"
        assert getattr(defaults, key) == literal(default), f"{what}: README default of {key} is not config.Config's"
        for name, value in paper_config_values(paper).items():
            if name not in resolved:
                resolved[name] = load_config([str(ROOT / "configs" / name)])
            got = getattr(resolved[name], key)
            assert got == (tuple(value) if isinstance(got, tuple) else value), f"{name}: {key}={got!r}, README {value!r}"
            checked += 1
    pretraining = {"freeze_none.py", "freeze_text.py", "freeze_vision.py", "freeze_both.py", "frozen_base.py",
                   "onetower_random.py", "onetower_bert.py", "onetower_vit.py"}
    assert pretraining | {"nlvr2.py", "snli_ve.py", "refcoco.py"} <= set(resolved)
    assert checked > 50
