"""alignment.py: LayerNorm-only, bias-only and adapter alignment of frozen towers in every model type; fresh
adapters leave outputs unchanged; a checkpoint from before the adapters loads with only them missing."""

import pytest
import torch
import torch.nn as nn

import engine
import finetune
import tasks
from alignment import Adapter, add_adapters, is_adapter_parameter
from config import ConfigError, load_config
from encoders import build_encoder
from model import PretrainModel, apply_freezing, build_pretrain_model, format_parameter_summary, parameter_summary
from tiny import DUAL_ENCODER as DUAL, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 60
ALL_KINDS = ["layernorm", "bias", "adapter"]


def make_batch(B=3, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (B, T), generator=g)
    labels = torch.full((B, T), -100)
    labels[:, 2] = input_ids[:, 2]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    return dict(pixel_values=torch.randn(B, 3, 32, 32, generator=g), input_ids=input_ids, attention_mask=mask,
                mlm_input_ids=input_ids, mlm_labels=labels, image_ids=torch.arange(B),
                itm_image_index=torch.tensor([1, 0, 2]), itm_labels=torch.tensor([0, 0, 1]),
                mlm_positions=PretrainModel.mlm_positions(labels, None, "separate"))


def is_layer_norm(name):  # the towers' own names: BERT "LayerNorm", ViT "layernorm_before/after", "layernorm"
    return "layernorm" in name.lower()


MODEL_TYPES = {"two_tower": dict(), "dual_encoder": DUAL,
               "one_tower": dict(model_type="one_tower", vision_tower="deit")}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fresh_adapters_give_exactly_the_plain_towers_outputs(model_type):
    """A model with fresh adapters, loaded with the weights of one without them (checked: only the adapters are
    missing), gives bit-identical outputs; the adapter sits after both sublayers of every layer."""
    base = dict(MODEL_TYPES[model_type], vision_dropout=0.0, text_dropout=0.0)
    plain = build_encoder(tiny_config(**base), VOCAB).eval()
    aligned = tiny_config(**base, text_align=["adapter"],
                          vision_align=["adapter"] if model_type != "one_tower" else [])
    adapted = build_encoder(aligned, VOCAB).eval()
    adapters = [n for n, m in adapted.named_modules() if isinstance(m, Adapter)]
    layers = 2 if model_type == "one_tower" else 4  # 2 layers per tower
    assert len(adapters) == 2 * layers
    result = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys and all(map(is_adapter_parameter, result.missing_keys))
    batch = make_batch()
    with torch.no_grad():
        a = plain(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        b = adapted(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.text_feats, b.text_feats)
    assert torch.equal(a.image_feats, b.image_feats)
    with torch.no_grad():  # and a trained adapter does change them: the adapter really is in the path
        for name, p in adapted.named_parameters():
            if is_adapter_parameter(name) and name.endswith("up.weight"):
                p.normal_(0, 0.5)
        c = adapted(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert not torch.allclose(a.pooled, c.pooled)


def _expected_trainable(name, towers_rule, rest=True):
    for prefix, rule in towers_rule.items():
        if name.startswith(prefix):
            return rule(name)
    return rest


def _trains(kinds, below_top=lambda name: True):
    """Rule for a tower's parameter names: trainable when an alignment kind covers it, or when freezing left it."""
    return lambda name: (("layernorm" in kinds and is_layer_norm(name)) or ("bias" in kinds and name.endswith("bias"))
                         or ("adapter" in kinds and is_adapter_parameter(name)) or not below_top(name))


FROZEN = lambda name: True  # noqa: E731  the whole tower is frozen
CASES = {
    "dual encoder, LilT: frozen towers, layer norms + biases + adapters": (
        dict(DUAL, freeze_text=True, freeze_vision=True, text_align=ALL_KINDS, vision_align=ALL_KINDS),
        {"encoder.text_tower.": _trains(ALL_KINDS), "encoder.vision_tower.": _trains(ALL_KINDS)}),
    "two-tower, frozen vision with biases only": (
        dict(freeze_vision=True, vision_align=["bias"]),
        {"encoder.vision_tower.": _trains(["bias"])}),
    "two-tower, text top layer + layer norms below it": (
        dict(text_trainable_top=1, text_align=["layernorm"]),
        {"encoder.text_tower.": _trains(["layernorm"], lambda n: not n.startswith("encoder.text_tower.encoder.layer.1."))}),
    "dual encoder, frozen vision with adapters only, text trained": (
        dict(DUAL, freeze_vision=True, vision_align=["adapter"]),
        {"encoder.vision_tower.": _trains(["adapter"])}),
    "one-tower, frozen stack with adapters": (
        dict(model_type="one_tower", freeze_modules=["encoder.layers"], text_align=["adapter"]),
        {"encoder.layers.": _trains(["adapter"])}),
}


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_only_what_is_meant_to_train(case):
    overrides, rules = CASES[case]
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, VOCAB)
    apply_freezing(model, cfg)
    model.train()
    model(make_batch())["loss"].backward()
    for name, p in model.named_parameters():
        expected = _expected_trainable(name, rules)
        assert p.requires_grad == expected, name
        assert (p.grad is not None) == expected, name
    # the parameter names above stand for what they say: every LayerNorm of the towers is named as one
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm) and name.startswith(("encoder.text_tower", "encoder.vision_tower", "encoder.layers")):
            assert is_layer_norm(name), name


def test_frozen_tower_with_alignment_parameters_is_not_in_eval_mode_and_runs_with_a_graph():
    cfg = tiny_config(**DUAL, freeze_vision=True, vision_align=["layernorm"])
    model = build_pretrain_model(cfg, VOCAB)
    apply_freezing(model, cfg)
    model.train()
    assert "encoder.vision_tower" not in model.frozen_modules and model.encoder.vision_tower.training
    cfg = tiny_config(**DUAL, freeze_vision=True)
    apply_freezing(model, cfg)  # idempotent: without alignment the tower is frozen again, in eval mode
    model.train()
    assert "encoder.vision_tower" in model.frozen_modules and not model.encoder.vision_tower.training


def test_summary_prints_each_towers_trainable_share():
    cfg = tiny_config(**DUAL, freeze_text=True, freeze_vision=True, text_align=["bias"], vision_align=["adapter"])
    model = build_pretrain_model(cfg, VOCAB)
    apply_freezing(model, cfg)
    rows = {name: (trainable, total) for name, trainable, total in parameter_summary(model)}
    text_biases = sum(p.numel() for n, p in model.encoder.text_tower.named_parameters() if n.endswith("bias"))
    assert rows["text_tower"][0] == text_biases
    lines = {line.split()[0]: line.split() for line in format_parameter_summary(model).splitlines()}
    for group in ("text_tower", "vision_tower", "total"):
        trainable, total = rows[group]
        assert lines[group][-1] == f"{trainable / total:.2%}"
    assert 0 < rows["vision_tower"][0] < rows["vision_tower"][1]


def test_pre_adapter_checkpoint_loads_into_an_adapter_model_with_checked_loading():
    """finetune.py: a model pretrained without adapters fine-tuned with them; the check still catches anything
    else missing. And a run from a checkpoint that has adapters gets them from its saved config."""
    torch.manual_seed(0)
    pretrained = build_pretrain_model(tiny_config(itc_weight=1.0), VOCAB).state_dict()
    task = tasks.get_task("snli_ve")
    cfg = tiny_config(text_align=["adapter", "layernorm"], vision_align=["adapter"], adapter_reduction=4)
    model = task.build_model(build_encoder(cfg, VOCAB), ["a", "b", "c"])
    message = finetune.load_pretrained(model, task, pretrained, "ckpt.pt")
    assert "loaded ckpt.pt" in message
    for name, value in pretrained.items():
        if name.startswith("encoder."):
            assert torch.equal(model.state_dict()[name], value), name
    partial = {k: v for k, v in pretrained.items() if not k.startswith("encoder.text_tower.encoder.layer.0.output.")}
    with pytest.raises(ValueError, match="layer.0.output.LayerNorm"):
        finetune.load_pretrained(model, task, partial, "ckpt.pt")
    saved = engine.asdict(cfg)
    adopted = engine.adopt_architecture(tiny_config(text_align=["bias"]), saved, "ckpt.pt", verbose=False)
    assert adopted.text_align == ["bias", "adapter"] and adopted.vision_align == ["adapter"]
    assert adopted.adapter_reduction == 4


def test_bad_alignment_settings_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="text_align"):
        load_config(["--text_align=layernorm,lora"])
    with pytest.raises(ValueError, match="vision_align"):
        build_encoder(tiny_config(model_type="one_tower", vision_align=["bias"]), VOCAB)
    with pytest.raises(ValueError, match="sublayer layouts"):
        add_adapters(nn.ModuleList([nn.Sequential(nn.Linear(4, 4))]), 2)
    with pytest.raises(ValueError, match="adapter_reduction"):
        Adapter(32, 64)
