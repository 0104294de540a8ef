"""The synthetic studies' pretrained towers: configs/synthetic_text_tower.py (text-only MLM, pretrain.py) and
configs/synthetic_vision_tower.py (scene attributes, image only, finetune.py) are the quickstart's towers, and
what export.py writes from their runs loads as text_tower / vision_tower into a two-tower model and as the stack
of a one-tower model, with the trained weights."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModel

import export
import finetune
import pretrain
from config import load_config
from data import synthetic_tokenizer
from encoders import build_encoder, hf_towers
from towers import tower_layers

ROOT = Path(__file__).resolve().parent.parent
TEXT_SIZES = ("text_tower", "text_hidden_size", "text_layers", "text_heads", "text_mlp_ratio", "text_embedding_size")
VISION_SIZES = ("vision_tower", "vision_hidden_size", "vision_layers", "vision_heads", "vision_mlp_ratio",
                "patch_size", "image_size")
# a run at CI sizes: towers at hidden size 32, a small world, a few steps on the CPU
SMALL = dict(tokenizer="synthetic", device="cpu", dtype="float32", num_workers=0,
             text_hidden_size=32, text_layers=2, text_heads=2, text_mlp_ratio=2.0,
             vision_hidden_size=32, vision_layers=2, vision_heads=2, vision_mlp_ratio=2.0,
             cross_layers=1, cross_hidden=32, cross_heads=2, cross_mlp_ratio=2.0,
             image_size=32, patch_size=8, max_text_len=16, synthetic_images=40, synthetic_image_size=32,
             synthetic_text_lines=200, batch_size=4, micro_batch_size=4, max_steps=3, warmup_steps=1,
             log_interval=1, eval_interval=3, eval_batches=1, ckpt_interval=3)
# a config naming an exported tower keeps the tower's own sizes
TOWER_OWN = dict(text_hidden_size=-1, text_layers=-1, text_heads=-1, text_mlp_ratio=-1.0, text_embedding_size=-1,
                 vision_hidden_size=-1, vision_layers=-1, vision_heads=-1, vision_mlp_ratio=-1.0, patch_size=-1)


def args(**values):
    return [f"--{key}={value}" for key, value in values.items()]


def resolved(name, **values):
    return load_config([str(ROOT / "configs" / name), "--out_dir=/nonexistent/run", *args(**values)])


@pytest.mark.parametrize("config, keys", [("synthetic_text_tower.py", TEXT_SIZES),
                                          ("synthetic_vision_tower.py", VISION_SIZES)])
def test_tower_configs_train_the_quickstarts_towers(config, keys):
    """Same family and sizes as the quickstart's tower, so a study config built on the quickstart can load it."""
    tower, quickstart = resolved(config), resolved("quickstart.py")
    assert {k: getattr(tower, k) for k in keys} == {k: getattr(quickstart, k) for k in keys}
    if config == "synthetic_text_tower.py":  # text-only MLM on the synthetic text
        assert tower.text_only_fraction == 1.0 and tower.text_corpora == ["synthetic"] and not tower.task
    else:  # image only, on the world's pictures
        assert tower.task == "scenes" and tower.synthetic_task


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both tower configs run a few steps at CI sizes and exported: {"text": DIR, "vision": DIR}."""
    root = tmp_path_factory.mktemp("towers")
    data_root = root / "data"
    pretrain.main([str(ROOT / "configs/synthetic_text_tower.py"),
                   *args(**SMALL, data_root=data_root, out_dir=root / "text_run")])
    finetune.main([str(ROOT / "configs/synthetic_vision_tower.py"),
                   *args(**SMALL, data_root=data_root, out_dir=root / "vision_run")])
    dirs = {"text": root / "text_export", "vision": root / "vision_export"}
    export.main([str(root / "text_run"), "--out", str(dirs["text"])])
    export.main([str(root / "vision_run"), "--out", str(dirs["vision"])])
    return dirs


def study_encoder(exported, **values):
    """The encoder a quickstart-based study config builds with the exported towers."""
    cfg = resolved("quickstart.py", **{**SMALL, **TOWER_OWN, "text_tower": exported["text"] / "text_tower",
                                       "text_pretrained": True, "vision_tower": exported["vision"] / "vision_tower",
                                       "vision_pretrained": True, **values})
    return build_encoder(cfg, vocab_size=len(synthetic_tokenizer()))


def first_layer(tower):
    """The tower's first transformer layer's parameters, by name."""
    return dict(tower_layers(tower)[0].named_parameters())


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_towers_load_into_a_two_tower_model(exported):
    trained_text = AutoModel.from_pretrained(exported["text"] / "text_tower")
    trained_vision = AutoModel.from_pretrained(exported["vision"] / "vision_tower")
    encoder = study_encoder(exported)
    towers = hf_towers(encoder)
    assert torch.equal(towers["text"].embeddings.word_embeddings.weight, trained_text.embeddings.word_embeddings.weight)
    assert same(first_layer(towers["text"]), first_layer(trained_text))
    assert torch.equal(towers["vision"].embeddings.patch_embeddings.projection.weight,
                       trained_vision.embeddings.patch_embeddings.projection.weight)
    assert same(first_layer(towers["vision"]), first_layer(trained_vision))
    # trained, not the random init a tower of that config gets
    fresh = study_encoder(exported, text_pretrained=False, vision_pretrained=False)
    assert not same(first_layer(hf_towers(fresh)["text"]), first_layer(trained_text))
    assert not same(first_layer(hf_towers(fresh)["vision"]), first_layer(trained_vision))


@pytest.mark.parametrize("stack", ["text", "vision"])
def test_exported_towers_are_a_one_tower_models_stack(exported, stack):
    trained = AutoModel.from_pretrained(exported[stack] / f"{stack}_tower")
    encoder = study_encoder(exported, model_type="one_tower", onetower_stack=stack)
    assert encoder.stack_modality == stack
    assert same(first_layer(hf_towers(encoder)[stack]), first_layer(trained))
    own = encoder.text_embeddings.word_embeddings.weight if stack == "text" else \
        encoder.image_embeddings.patch_embeddings.projection.weight
    theirs = trained.embeddings.word_embeddings.weight if stack == "text" else \
        trained.embeddings.patch_embeddings.projection.weight
    assert torch.equal(own, theirs)  # onetower_embeddings="tower": the stack's own modality's embeddings too
