"""towers.py, encoders.py, model.py: shapes, masks, tower loading, freezing, gradient checkpointing, checked loading, DDP."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, BertConfig, BertModel, ResNetConfig, ViTConfig, ViTModel

from encoders import Embedded, EncoderOutput, OneTowerEncoder, TwoTowerEncoder, build_encoder
from model import (MLMHead, PretrainModel, TaskModel, apply_freezing, build_pretrain_model,
                   enable_gradient_checkpointing, load_checked, parameter_summary)
from processes import join_spawned
from tiny import tiny_config
from towers import TowerLoadError, load_tower

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 60
B, T = 3, 7


def make_batch(seed=0, T=T):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (B, T), generator=g)
    input_ids[:, 0] = 2  # a CLS-like first token
    labels = torch.full((B, T), -100)
    labels[:, 2] = input_ids[:, 2]
    mlm_input_ids = input_ids.clone()
    mlm_input_ids[:, 2] = 4
    itm_labels = torch.tensor([0, 0, 1])
    return dict(pixel_values=torch.randn(B, 3, 32, 32, generator=g), input_ids=input_ids,
                attention_mask=torch.ones(B, T, dtype=torch.long), mlm_input_ids=mlm_input_ids, mlm_labels=labels,
                mlm_positions=PretrainModel.mlm_positions(labels, itm_labels, "separate"),
                itm_image_index=torch.tensor([1, 0, 2]), itm_labels=itm_labels)


CONFIGS = {
    "two_tower bert+vit": dict(),
    "two_tower electra+deit": dict(text_tower="electra", text_embedding_size=16, vision_tower="deit"),
    "two_tower roberta+beit": dict(text_tower="roberta", vision_tower="beit"),
    "one_tower text stack, double": dict(model_type="one_tower", onetower_stack="text"),
    "one_tower text stack, single": dict(model_type="one_tower", onetower_stack="text", pooling="single"),
    "one_tower vision stack, double": dict(model_type="one_tower", onetower_stack="vision", vision_tower="deit"),
    "one_tower electra stack": dict(model_type="one_tower", text_tower="electra", text_embedding_size=16),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_output_shapes(name):
    cfg = tiny_config(**CONFIGS[name])
    torch.manual_seed(0)
    enc = build_encoder(cfg, VOCAB).eval()
    batch = make_batch()
    out = enc(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert isinstance(out, EncoderOutput)
    vision_side = cfg.model_type == "two_tower" or cfg.onetower_stack == "vision"
    extra = 2 if vision_side and cfg.vision_tower == "deit" else 1  # DeiT adds a distillation token after CLS
    assert out.text_feats.shape == (B, T, 32)
    assert out.image_feats.shape == (B, 16 + extra, 32)
    assert out.text_mask.shape == (B, T) and out.image_mask.shape == (B, 16 + extra)
    assert out.pooled.shape == (B, 32 if cfg.pooling == "single" else 64) == (B, enc.pooled_dim)
    text_only = enc(batch["input_ids"], batch["attention_mask"])
    image_only = enc(pixel_values=batch["pixel_values"])
    assert text_only.pooled.shape == image_only.pooled.shape == (B, enc.dim)
    assert text_only.image_feats is None and image_only.text_feats is None
    losses = build_pretrain_model(cfg, VOCAB)(batch)
    assert set(losses) == {"loss", "mlm_loss", "mlm_acc", "itm_loss", "itm_acc"}
    assert torch.isfinite(losses["loss"])


@pytest.mark.parametrize("model_type", ["two_tower", "one_tower"])
def test_padding_changes_nothing(model_type):
    """Pad tokens added to a caption change neither the pooled output nor the features of real tokens."""
    torch.manual_seed(0)
    enc = build_encoder(tiny_config(model_type=model_type), VOCAB).eval()
    batch = make_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    padded_ids = torch.cat([ids, torch.full((B, 5), 0)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(B, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = enc(ids, mask, batch["pixel_values"])
        b = enc(padded_ids, padded_mask, batch["pixel_values"])
        # random junk in the padded positions must not matter either
        junk_ids = padded_ids.clone()
        junk_ids[:, T:] = torch.randint(5, VOCAB, (B, 5))
        c = enc(junk_ids, padded_mask, batch["pixel_values"])
    for other in (b, c):
        torch.testing.assert_close(other.pooled, a.pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.text_feats[:, :T], a.text_feats, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.image_feats, a.image_feats, atol=1e-5, rtol=1e-5)


def test_towers_from_local_directory_match_hugging_face(tmp_path):
    """A tower loaded from a save_pretrained directory is the Hugging Face model itself, weights or config."""
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64), add_pooling_layer=False).save_pretrained(tmp_path / "text")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(tmp_path / "vision")
    cfg = tiny_config(text_tower=str(tmp_path / "text"), vision_tower=str(tmp_path / "vision"),
                      text_hidden_size=0, text_layers=0, text_heads=0, text_mlp_ratio=0.0, text_dropout=-1.0,
                      vision_hidden_size=0, vision_layers=0, vision_heads=0, vision_mlp_ratio=0.0,
                      vision_dropout=-1.0, patch_size=0)
    batch = make_batch()
    batch["attention_mask"][0, 4:] = 0
    for pretrained in (True, False):
        cfg.text_pretrained = cfg.vision_pretrained = pretrained

        def reference(directory):
            if pretrained:
                return AutoModel.from_pretrained(directory, add_pooling_layer=False).eval()
            return AutoModel.from_config(AutoConfig.from_pretrained(directory), add_pooling_layer=False).eval()

        torch.manual_seed(1)
        text = load_tower(cfg, "text", VOCAB).eval()
        torch.manual_seed(1)
        ref_text = reference(tmp_path / "text")
        torch.manual_seed(2)
        vision = load_tower(cfg, "vision").eval()
        torch.manual_seed(2)
        ref_vision = reference(tmp_path / "vision")
        with torch.no_grad():
            torch.testing.assert_close(
                text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state,
                ref_text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state,
                rtol=0, atol=0)
            torch.testing.assert_close(vision(pixel_values=batch["pixel_values"]).last_hidden_state,
                                       ref_vision(pixel_values=batch["pixel_values"]).last_hidden_state, rtol=0, atol=0)
        if not pretrained:  # random init really is new weights, not the saved ones
            saved = AutoModel.from_pretrained(tmp_path / "text", add_pooling_layer=False)
            assert not torch.equal(saved.embeddings.word_embeddings.weight, text.embeddings.word_embeddings.weight)


def test_two_tower_text_side_gets_embeddings_once_and_the_mask(tmp_path):
    """What the text tower hands to the cross-modal layers is exactly the Hugging Face model's output."""
    torch.manual_seed(0)
    enc = build_encoder(tiny_config(), VOCAB).eval()
    enc.text_tower.save_pretrained(tmp_path / "text")
    reference = AutoModel.from_pretrained(tmp_path / "text", add_pooling_layer=False).eval()
    seen = {}
    enc.text_proj.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    batch = make_batch()
    batch["attention_mask"][1, 3:] = 0
    with torch.no_grad():
        enc(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(seen["x"], expected, rtol=0, atol=0)


def test_convolutional_vision_tower_refused(tmp_path):
    ResNetConfig().save_pretrained(tmp_path / "resnet")
    with pytest.raises(TowerLoadError, match="model_type 'resnet'"):
        load_tower(tiny_config(vision_tower=str(tmp_path / "resnet"), vision_hidden_size=0, vision_layers=0,
                               vision_heads=0, vision_mlp_ratio=0.0), "vision")


def test_unreachable_tower_is_one_clear_line():
    cfg = tiny_config(text_tower="google/electra-small-discriminator", text_hidden_size=0, text_layers=0,
                      text_heads=0, text_mlp_ratio=0.0)
    with pytest.raises(TowerLoadError) as err:
        load_tower(cfg, "text", VOCAB)
    message = str(err.value)
    assert "google/electra-small-discriminator" in message and "\n" not in message


def test_missing_local_directory_is_named_as_one(tmp_path):
    for modality in ("text", "vision"):
        with pytest.raises(TowerLoadError) as err:
            load_tower(tiny_config(**{f"{modality}_tower": str(tmp_path / "electra-small")}), modality, VOCAB)
        assert str(err.value) == f"{modality}_tower: directory '{tmp_path / 'electra-small'}' does not exist"


def test_unreachable_hub_fails_within_seconds_saying_what_to_do(tmp_path):
    """HF_HUB_OFFLINE unset, an empty cache and a hub that refuses connections (transformers alone retries for
    over 20 s): one request, no retries, and the way out. Timed in the child after its imports."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # nothing listens on port 9
    code = ("import time, towers\nfrom config import Config\nstart = time.monotonic()\n"
            "try:\n    towers.load_tower(Config(), 'text')\n"
            "except towers.TowerLoadError as e:\n    print(time.monotonic() - start)\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    seconds, message = done.stdout.strip().split("\n")
    assert float(seconds) < 20
    assert message.startswith("could not load text_tower 'google/electra-small-discriminator': the Hugging Face "
                              "hub (http://127.0.0.1:9) is unreachable")
    assert "local directory (save_pretrained output)" in message and "random_init_towers=True" in message


def test_hand_set_dimensions_with_pretrained_weights_refused(tmp_path):
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "text")
    with pytest.raises(TowerLoadError, match="text_pretrained=False"):
        load_tower(tiny_config(text_tower=str(tmp_path / "text")), "text", VOCAB)


def test_mlm_head_projects_only_labelled_positions():
    head = MLMHead(32, VOCAB)
    calls = []
    head.decoder.register_forward_hook(lambda m, args, out: calls.append(args[0]))
    labels = torch.full((B, T), -100)
    labels[0, 1], labels[2, 5] = 7, 9
    itm_labels = torch.tensor([1, 0, 1])
    positions = PretrainModel.mlm_positions(labels, itm_labels, "separate")
    assert positions.tolist() == [1, 2 * T + 5]
    feats = torch.randn(B, T, 32)
    logits = head(feats, positions)
    assert logits.shape == (2, VOCAB) and calls[0].shape == (2, 32)
    torch.testing.assert_close(calls[0], head.transform(feats[[0, 2], [1, 5]]))  # the rows of those positions
    labels[1, 3] = 8  # the shared pass reads matched pairs only (row 1 is a mismatch)
    assert PretrainModel.mlm_positions(labels, itm_labels, "shared").tolist() == [1, 2 * T + 5]
    assert PretrainModel.mlm_positions(labels, itm_labels, "separate").tolist() == [1, T + 3, 2 * T + 5]


def test_mlm_decoder_runs_in_float32_under_autocast():
    """Under bfloat16 autocast the transform runs in bfloat16 and the vocabulary decoder in float32 on the float32
    weight (no bfloat16 copy of it), so the logits are F.linear of the transform's output in float32."""
    torch.manual_seed(0)
    head = MLMHead(32, VOCAB)
    feats, positions = torch.randn(B, T, 32), torch.tensor([1, 2 * T + 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(feats, positions)
        hidden = head.transform(feats.flatten(0, 1)[positions])
    assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, F.linear(hidden.float(), head.decoder.weight, head.decoder.bias),
                               rtol=0, atol=0)


def test_image_keys_take_no_attention_mask(monkeypatch):
    """Cross-modal attention over image patches passes no mask (so SDPA may take FlashAttention), attention over
    text keeps its padding mask, and the result equals attention with the image's all-ones mask."""
    encoder = build_encoder(tiny_config(), VOCAB).eval()
    batch = make_batch()
    batch["attention_mask"][0, -3:] = 0  # padding that must stay masked
    text = encoder.encode_text(batch["input_ids"], batch["attention_mask"])
    image = encoder.encode_image(batch["pixel_values"])
    P = image.feats.shape[1]
    assert P != T
    calls, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        calls.append((k.shape[2], attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    fast = encoder.fuse(text, image)
    layers = len(encoder.cross_layers)
    assert [mask is None for keys, mask in calls if keys == P] == [True] * 2 * layers  # text->image, image->image
    text_key_masks = [mask for keys, mask in calls if keys == T]
    assert len(text_key_masks) == 2 * layers and all(torch.equal(m[:, 0, 0], batch["attention_mask"].bool())
                                                     for m in text_key_masks)
    calls.clear()
    masked = encoder.fuse(text, Embedded(image.feats, image.mask))  # the same image, mask not known to be all ones
    assert all(mask is not None for _, mask in calls)
    for name in ("text_feats", "image_feats", "pooled"):
        torch.testing.assert_close(getattr(fast, name), getattr(masked, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["two_tower", "one_tower"])
def test_uint8_pixels_are_normalised_on_the_model_side(model_type):
    """Loaders send uint8 pixels; the encoder normalises them with image_mean / image_std, exactly as a float
    input normalised beforehand, and float input passes as it is."""
    cfg = tiny_config(model_type=model_type, image_mean=(0.5, 0.4, 0.3), image_std=(0.25, 0.2, 0.5))
    encoder = build_encoder(cfg, VOCAB).eval()
    pixels = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(cfg.image_mean).view(1, 3, 1, 1), torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    normalised = (pixels.float() / 255 - mean) / std
    torch.testing.assert_close(encoder.pixel_norm(pixels), normalised)
    assert encoder.pixel_norm(normalised) is normalised
    torch.testing.assert_close(encoder.encode_image(pixels).feats, encoder.encode_image(normalised).feats)
    assert not any("pixel_norm" in key for key in encoder.state_dict())  # checkpoints keep their keys


def _train_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        model(make_batch(step))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_frozen_parameters_stay_put_and_trainable_ones_move():
    cfg = tiny_config(text_dropout=0.1, vision_dropout=0.1, freeze_vision=True, text_trainable_top=1)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, VOCAB)
    apply_freezing(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(model)
    frozen_prefixes = ("encoder.vision_tower.", "encoder.text_tower.embeddings.", "encoder.text_tower.encoder.layer.0.")
    for name, p in model.named_parameters():
        if name.startswith(frozen_prefixes):
            assert not p.requires_grad and torch.equal(p, before[name]), name
        else:
            assert p.requires_grad, name
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert "encoder.text_tower.encoder.layer.1.attention.self.query.weight" in str(moved) or any(
        n.startswith("encoder.text_tower.encoder.layer.1.") for n in moved)
    assert any(n.startswith("encoder.cross_layers.") for n in moved) and any(n.startswith("itm_head.") for n in moved)
    # frozen parts stay in eval mode (no dropout) whatever train() the parent receives
    model.train()
    assert not model.encoder.vision_tower.training and not model.encoder.text_tower.embeddings.training
    assert model.encoder.text_tower.encoder.layer[1].training and model.encoder.cross_layers.training
    # trainable counts match a hand count
    text = model.encoder.text_tower
    hand = sum(p.numel() for p in text.encoder.layer[1].parameters())
    rows = {name: (trainable, total) for name, trainable, total in parameter_summary(model)}
    assert rows["text_tower"] == (hand, sum(p.numel() for p in text.parameters()))
    assert rows["vision_tower"][0] == 0
    assert rows["total"][0] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_freezing_is_idempotent_and_explicit():
    cfg = tiny_config(freeze_text=True)
    model = build_pretrain_model(cfg, VOCAB)
    apply_freezing(model, cfg)
    first = [p.requires_grad for p in model.parameters()]
    cfg.freeze_text = False
    apply_freezing(model, cfg)  # un-freezing works: every flag is set explicitly each time
    assert all(p.requires_grad for p in model.parameters())
    cfg.freeze_text = True
    apply_freezing(model, cfg)
    assert [p.requires_grad for p in model.parameters()] == first
    cfg.freeze_modules = ["encoder.nonexistent"]
    with pytest.raises(ValueError, match="encoder.nonexistent"):
        apply_freezing(model, cfg)


def test_frozen_tower_builds_no_autograd_graph():
    cfg = tiny_config(freeze_vision=True)
    model = build_pretrain_model(cfg, VOCAB)
    apply_freezing(model, cfg)
    model.train()
    seen = []
    model.encoder.image_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model.encoder.text_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(make_batch())
    image_input, text_input = seen[0], seen[1]
    assert image_input.grad_fn is None and not image_input.requires_grad
    assert text_input.requires_grad


@pytest.mark.parametrize("overrides", [dict(), dict(freeze_vision=True, text_trainable_top=1),
                                       dict(model_type="one_tower", text_trainable_top=1)])
def test_gradient_checkpointing_gives_the_same_gradients(overrides):
    grads = []
    for checkpointing in (False, True):
        cfg = tiny_config(**overrides)
        torch.manual_seed(0)
        model = build_pretrain_model(cfg, VOCAB)
        apply_freezing(model, cfg)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        model(make_batch())["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None, f"no gradient for {name} with checkpointing"
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_fine_tuning_load_checks_exactly_the_new_head_is_missing():
    cfg = tiny_config()
    torch.manual_seed(0)
    pretrain = build_pretrain_model(cfg, VOCAB)
    task = TaskModel(build_encoder(cfg, VOCAB), num_labels=3)
    load_checked(task, pretrain.state_dict(), expected_missing=("head.",),
                 allowed_unexpected=("mlm_head.", "itm_head."))
    for name, p in task.encoder.state_dict().items():
        assert torch.equal(p, pretrain.encoder.state_dict()[name])
    with pytest.raises(ValueError, match="missing"):  # the pretraining heads are not allowed to go unused silently
        load_checked(task, pretrain.state_dict(), expected_missing=("head.",))
    partial = {k: v for k, v in pretrain.state_dict().items() if not k.startswith("encoder.cross_layers.0.")}
    with pytest.raises(ValueError, match="cross_layers.0"):
        load_checked(task, partial, expected_missing=("head.",), allowed_unexpected=("mlm_head.", "itm_head."))
    other = build_pretrain_model(tiny_config(cross_hidden=48, cross_heads=2), VOCAB)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_checked(task, other.state_dict(), expected_missing=("head.",),
                     allowed_unexpected=("mlm_head.", "itm_head."))


@pytest.mark.parametrize("model_type", ["two_tower", "one_tower"])
@pytest.mark.parametrize("weights", [dict(itm_weight=0.0), dict(mlm_weight=0.0), {}])
def test_with_a_loss_off_every_trainable_parameter_gets_a_gradient(model_type, weights):
    """What a zero-weight loss alone would have read is frozen, so every trainable parameter gets a gradient:
    DDP then needs no unused-parameter search (see test_ddp_... below)."""
    cfg = tiny_config(model_type=model_type, **weights)
    model = build_pretrain_model(cfg, VOCAB)
    apply_freezing(model, cfg)
    model(make_batch())["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.grad is not None}
    unused = model.unused_modules()
    assert bool(unused) == (weights == dict(itm_weight=0.0)) and set(unused) <= set(model.frozen_modules)
    if unused:  # the text features MLM reads still train, up to the last layer's text stream
        last = "encoder.cross_layers.1.text" if model_type == "two_tower" else "encoder.layers.1"
        assert any(n.startswith(last) for n in trainable) and not any(n.startswith("encoder.text_pooler")
                                                                      for n in trainable)


DDP_CONFIGS = [dict(freeze_vision=True, text_trainable_top=1), dict(itm_weight=0.0), dict(mlm_weight=0.0)]


def _ddp_worker(rank, world_size, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    for i, overrides in enumerate(DDP_CONFIGS):
        cfg = tiny_config(**overrides)
        torch.manual_seed(0)
        model = build_pretrain_model(cfg, VOCAB)
        apply_freezing(model, cfg)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(3):  # an unused parameter would make the second step's forward raise
            ddp(make_batch(step * world_size + rank))["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[rank, i] = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    torch.distributed.destroy_process_group()


def test_ddp_with_frozen_tower_or_one_loss_off_needs_no_unused_parameter_search():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        join_spawned(mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=False), timeout=300)
        for i in range(len(DDP_CONFIGS)):
            torch.testing.assert_close(results[0, i], results[1, i], rtol=0, atol=0)  # replicas stay in sync
