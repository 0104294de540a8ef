"""bench.py and the speed work it measures: FLOP and saved-activation counting, the pruned and shared pretraining
passes (same losses as a plain reference), the frozen vision feature cache (same losses as images), the offline
paper towers, and an end-to-end run of bench.py."""

import dataclasses
import functools
import json
import subprocess
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import batching
import bench
import data
import engine
import pretrain
from config import Config, ConfigError, load_config
from encoders import Attention, Embedded, build_encoder
import attention as attention_module
from attention import attention_with_dropout, dropout, keep_mask
from model import PretrainModel, apply_freezing, build_pretrain_model, compile_model, enable_gradient_checkpointing
from tiny import TINY, tiny_config

VOCAB = 60
B, T = 4, 9
INFO = data.TokenizerInfo(mask_token_id=4, vocab_size=VOCAB, special_ids=(0, 1, 2, 3, 4))
DIM = TINY["cross_hidden"]


def with_positions(batch, pretrain_pass):
    """The batch with the MLM positions that pass reads, as pretrain.make_prepare_batch adds them."""
    return dict(batch, mlm_positions=PretrainModel.mlm_positions(batch["mlm_labels"], batch["itm_labels"],
                                                                 pretrain_pass))


def make_batch(seed=0, labelled=2, pretrain_pass="separate"):
    """A prepared batch: `labelled` MLM targets per row, ITM pairs with two negatives."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (B, T), generator=g)
    labels = torch.full((B, T), -100)
    labels[:, 1:1 + labelled] = input_ids[:, 1:1 + labelled]
    return with_positions(dict(pixel_values=torch.randn(B, 3, 32, 32, generator=g), input_ids=input_ids,
                               attention_mask=torch.ones(B, T, dtype=torch.long), mlm_labels=labels,
                               mlm_input_ids=input_ids.masked_fill(labels != -100, INFO.mask_token_id),
                               itm_image_index=torch.tensor([1, 0, 2, 3]), itm_labels=torch.tensor([0, 0, 1, 1])),
                          pretrain_pass)


def pretrain_model(pretrain_pass="separate", **overrides):
    cfg = tiny_config(**overrides)
    cfg.pretrain_pass = pretrain_pass
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, VOCAB)
    apply_freezing(model, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def flops(model, batch):
    return bench.step_flops(model, batch, engine.autocast_context(torch.device("cpu"), "float32"))


def saved(model, batch):
    return bench.saved_activation_bytes(model, batch, engine.autocast_context(torch.device("cpu"), "float32"))


# -----------------------------------------------------------------------------
# Counting


def test_flop_counter_sees_freezing_shared_pass_and_labelled_positions():
    batch = make_batch()
    none, both = flops(pretrain_model(), batch), flops(pretrain_model(freeze_text=True, freeze_vision=True), batch)
    assert both < none
    assert flops(pretrain_model("shared"), make_batch(pretrain_pass="shared")) < none
    # each labelled position costs the MLM head's transform and vocabulary projection, forward and backward
    # (input and weight gradients), and nothing else changes
    one, three = flops(pretrain_model(), make_batch(labelled=1)), flops(pretrain_model(), make_batch(labelled=3))
    assert three - one == 2 * B * 3 * 2 * DIM * (DIM + VOCAB)


def test_cpu_attention_is_counted():
    q, k, v = torch.randn(2, 3, 5, 8, requires_grad=True), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    counter = FlopCounterMode(display=False, custom_mapping=bench.CPU_ATTENTION_FLOPS)
    with counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 5 * 7 * 8)  # q @ k^T and weights @ v


def test_saved_activations_shrink_with_freezing_and_checkpointing():
    batch = make_batch()
    none = saved(pretrain_model(), batch)
    both = saved(pretrain_model(freeze_text=True, freeze_vision=True), batch)
    both_ckpt = saved(pretrain_model(freeze_text=True, freeze_vision=True, gradient_checkpointing=True), batch)
    none_ckpt = saved(pretrain_model(gradient_checkpointing=True), batch)
    assert both < none and both_ckpt < both / 2 and none_ckpt < none / 2


# -----------------------------------------------------------------------------
# The pretraining passes give the losses and gradients of a plain reference


def reference_losses(model, batch, shared):
    """MLM and ITM computed the plain way: every cross-modal row of every layer, head on gathered positions."""
    enc = model.encoder
    image = enc.encode_image(batch["pixel_values"])
    paired = Embedded(image.feats[batch["itm_image_index"]], image.mask[batch["itm_image_index"]])
    labels = batch["mlm_labels"]
    if shared:
        mlm_fused = itm_fused = enc.fuse(enc.encode_text(batch["mlm_input_ids"], batch["attention_mask"]), paired)
        labels = torch.where(batch["itm_labels"][:, None] == 1, labels, -100)
    else:
        mlm_fused = enc.fuse(enc.encode_text(batch["mlm_input_ids"], batch["attention_mask"]), image)
        itm_fused = enc.fuse(enc.encode_text(batch["input_ids"], batch["attention_mask"]), paired)
    selected = labels != -100
    logits = model.mlm_head.decoder(model.mlm_head.transform(mlm_fused.text_feats[selected]))
    return F.cross_entropy(logits, labels[selected]), F.cross_entropy(model.itm_head(itm_fused.pooled),
                                                                      batch["itm_labels"])


def padded(batch, pretrain_pass):
    """The batch with its first caption cut to 5 tokens (padding after), its labels left where they were."""
    mask = batch["attention_mask"].clone()
    mask[0, 5:] = 0
    return with_positions(dict(batch, attention_mask=mask), pretrain_pass)


@pytest.mark.parametrize("pretrain_pass", ["separate", "shared"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("model_type", ["two_tower", "one_tower"])
def test_pretraining_passes_match_the_plain_reference(pretrain_pass, checkpointing, model_type):
    model = pretrain_model(pretrain_pass, gradient_checkpointing=checkpointing, model_type=model_type)
    batch = padded(make_batch(pretrain_pass=pretrain_pass), pretrain_pass)
    out = model(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    mlm, itm = reference_losses(model, batch, pretrain_pass == "shared")
    (mlm + itm).backward()
    torch.testing.assert_close(out["mlm_loss"], mlm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["itm_loss"], itm, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("itc", [False, True])
def test_separate_pass_runs_the_text_tower_once_on_both_captions(itc):
    """The masked and the clean caption go through the text tower as one (2B, T) batch, masked first, with the
    padding mask of each row; the MLM pass reads the first half and the ITM pass (and ITC) the second."""
    model = pretrain_model("separate", **(dict(itc_weight=1.0) if itc else {}))
    batch = dict(padded(make_batch(), "separate"), image_ids=torch.arange(B))
    calls = []
    hook = model.encoder.text_tower.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs),
                                                          with_kwargs=True)
    out = model(batch)
    hook.remove()
    assert len(calls) == 1
    assert torch.equal(calls[0]["input_ids"], torch.cat([batch["mlm_input_ids"], batch["input_ids"]]))
    assert torch.equal(calls[0]["attention_mask"], torch.cat([batch["attention_mask"]] * 2))
    if itc:  # ITC compares the clean captions with the pictures
        enc = model.encoder
        clean = enc.encode_text(batch["input_ids"], batch["attention_mask"])
        expected = model.itc_head(clean, enc.encode_image(batch["pixel_values"]), batch)[0]["itc_loss"]
        torch.testing.assert_close(out["itc_loss"], expected)


def test_cpu_attention_with_dropout_keeps_weights_and_byte_mask():
    """Cross-modal attention with dropout on CPU: outputs and gradients are autograd's through the written-out ops
    with keep_mask's mask, and backward keeps the (B, h, T, S) softmax weights and a one-byte mask, not a second
    float map (the dropped weights), and no recomputation."""
    attention = Attention(DIM, heads=2, dropout=0.3).train()
    x, context = torch.randn(B, T, DIM, requires_grad=True), torch.randn(B, 5, DIM, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * B)
    g = torch.randn(B, T, DIM)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append((t.shape, t.dtype)), t)[1], lambda t: t):
        torch.manual_seed(0)
        y = attention(x, context, mask)
    assert sorted(str(dtype) for shape, dtype in saved if shape == (B, 2, T, 5)) == ["torch.float32", "torch.uint8"]
    grads = torch.autograd.grad((y * g).sum(), (x, context))
    torch.manual_seed(0)
    q = attention.q(x).view(B, T, 2, DIM // 2).transpose(1, 2)
    k, v = attention.kv(context).view(B, 5, 2, 2, DIM // 2).permute(2, 0, 3, 1, 4)
    weights = (q * (DIM // 2) ** -0.5 @ k.transpose(-2, -1)).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    weights = weights.softmax(-1)
    keep = keep_mask(weights, 0.3)
    assert keep.dtype == torch.uint8 and 0.6 < keep.float().mean() < 0.8
    reference = (weights * keep * 2 ** 15 / (2 ** 15 - round(0.3 * 2 ** 15))) @ v
    reference = attention.out(reference.transpose(1, 2).reshape(B, T, DIM))
    torch.testing.assert_close(y, reference, rtol=1e-6, atol=1e-6)
    for grad, ref in zip(grads, torch.autograd.grad((reference * g).sum(), (x, context))):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)
    # without dropout it is scaled_dot_product_attention, masked keys and all
    q, k, v = torch.randn(B, 2, T, 8), torch.randn(B, 2, 5, 8), torch.randn(B, 2, 5, 8)
    torch.testing.assert_close(attention_with_dropout(q, k, v, mask[:, None, None, :].bool(), 0.0),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].bool()))


def test_cpu_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(2_000_000, requires_grad=True)
    y = dropout(x, 0.1)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002 and abs(y.mean().item() - 1.0) < 0.005
    kept = y[y != 0]
    assert torch.all(kept == kept[0]) and abs(kept[0].item() * (1 - 0.1) - 1) < 1e-4
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, 2 * y.detach())  # the same mask and scale in backward
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1), y)  # torch's generator: seeded as usual
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x
    zeros = torch.empty(7, 3).random_()  # 21 elements: three of the last int64 draw's four parts go unused
    assert dropout(zeros, 0.5).shape == (7, 3)
    # each of an int64 draw's four 16-bit parts gives its element the rate (no part of the draw is constant)
    keep = keep_mask(torch.empty(4_000_000), 0.3).view(-1, 4).float().mean(0)
    assert torch.all((keep - 0.7).abs() < 0.002), keep


def test_shared_pass_with_no_matched_pair_still_reaches_every_head_parameter():
    """A micro-batch of negatives only has no MLM target; the MLM head must still get (zero) gradients, or
    DDP would wait for them."""
    model = pretrain_model("shared")
    batch = with_positions(dict(make_batch(), itm_labels=torch.zeros(B, dtype=torch.long),
                                itm_image_index=torch.tensor([1, 0, 3, 2])), "shared")
    out = model(batch)
    out["loss"].backward()
    assert out["mlm_loss"] == 0
    assert all(p.grad is not None and not p.grad.any() for p in model.mlm_head.parameters())


def test_shared_pass_needs_both_tasks():
    with pytest.raises(ValueError, match="mlm_weight > 0 and itm_weight > 0"):
        PretrainModel(build_encoder(tiny_config(), VOCAB), VOCAB, itm_weight=0.0, pretrain_pass="shared")


# -----------------------------------------------------------------------------
# The frozen vision feature cache


def cache_config(tmp_path, **overrides):
    cfg = tiny_config(data_root=str(tmp_path / "data"), corpora=["synthetic"], synthetic_images=8,
                      synthetic_image_size=32, micro_batch_size=4, num_workers=0, freeze_vision=True, **overrides)
    cfg.pretrain_pass, cfg.vision_feature_cache = "separate", str(tmp_path / "cache")
    return cfg


def test_feature_cache_gives_the_losses_of_the_images(tmp_path):
    cfg = cache_config(tmp_path)
    tokenizer = data.build_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, len(tokenizer))
    apply_freezing(model, cfg)
    model.eval()
    dist = SimpleNamespace(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    plain = pretrain.build_data(dataclasses.replace(cfg, vision_feature_cache=""), dist, tokenizer, model)[0]
    cached = pretrain.build_data(cfg, dist, tokenizer, model)[0]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # the training and the held-out pictures
    prepare = pretrain.make_prepare_batch(cfg, data.TokenizerInfo.from_tokenizer(tokenizer), dist.device)
    items = [0, 5, 9, 17]
    plain_batch = prepare(batching.PretrainCollator(tokenizer, cfg.max_text_len)([plain[i] for i in items]), 0, 0)
    cached_batch = prepare(batching.CachedFeatureCollator(tokenizer, cfg.max_text_len)([cached[i] for i in items]), 0, 0)
    assert "pixel_values" not in cached_batch and cached_batch["image_feats"].dtype == torch.float16
    with torch.no_grad():
        tower_out = model.encoder.vision_features(plain_batch["pixel_values"])
        torch.testing.assert_close(cached_batch["image_feats"], tower_out.half(), rtol=0, atol=0)
        plain_out, cached_out = model(plain_batch), model(cached_batch)
    for name in ("mlm_loss", "itm_loss"):
        torch.testing.assert_close(cached_out[name], plain_out[name], rtol=1e-3, atol=1e-3)
    # reused, not recomputed; a different tower gets its own file
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    pretrain.build_data(cfg, dist, tokenizer, model)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == stamps
    with torch.no_grad():
        model.encoder.vision_tower.embeddings.cls_token.add_(1.0)
    pretrain.build_data(cfg, dist, tokenizer, model)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4


def test_feature_cache_refuses_a_trainable_tower_or_augmentation(tmp_path):
    for overrides in (dict(freeze_vision=False), dict(augment=True)):
        cfg = dataclasses.replace(cache_config(tmp_path), **overrides)
        with pytest.raises(ValueError, match="freeze_vision=True and augment=False"):
            batching.with_cached_vision_features(None, cfg, None, torch.device("cpu"), None)


# -----------------------------------------------------------------------------
# Offline paper towers and the whole script


def test_random_feature_cache_input_is_built_where_the_vision_tower_is():
    """The probe that sizes the random cached features runs on the tower's device (here the meta device, which
    refuses a CPU input as CUDA would)."""
    cfg = tiny_config(micro_batch_size=2)
    encoder = build_encoder(cfg, VOCAB).to("meta")
    batch = next(bench.with_random_vision_features(bench.random_batches(cfg, INFO), encoder, cfg))
    assert batch["image_feats"].shape == (2, 1 + (32 // 8) ** 2, 32) and "pixel_values" not in batch


@pytest.mark.parametrize("name, peak", [("NVIDIA H200 NVL", 835.5), ("NVIDIA H200", 989.4),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA A10", 125.0), ("NVIDIA L4", 121.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1)])
def test_gpu_peak_table_takes_the_most_specific_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench.gpu_peak_from_table(torch.device("cuda"), "bfloat16")[0] == peak * 1e12
    monkeypatch.setattr(bench, "GPU_PEAK_TFLOPS", bench.GPU_PEAK_TFLOPS[::-1])  # whatever the table's order
    assert bench.gpu_peak_from_table(torch.device("cuda"), "bfloat16")[0] == peak * 1e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert bench.gpu_peak_from_table(torch.device("cuda"), "bfloat16") is None


@pytest.mark.parametrize("flags, native", [("fpu avx2 fma", False), ("fpu avx512f avx512_bf16", True),
                                           ("fpu amx_bf16 amx_tile", True), (None, None)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\n" + (f"flags\t\t: {flags}\n" if flags else ""))
    assert bench.cpu_native_bf16(str(cpuinfo)) is native
    assert bench.cpu_native_bf16(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("native, dtype, said", [(False, "bfloat16", True), (True, "bfloat16", False),
                                                  (False, "float32", False)])
def test_bf16_on_a_cpu_without_it_is_said(tmp_path, capsys, monkeypatch, native, dtype, said):
    monkeypatch.setattr(bench, "cpu_native_bf16", lambda: native)
    monkeypatch.setattr(bench, "measure_gemm_peak", lambda device, dtype: 1e9)
    config = tmp_path / "tiny.py"
    config.write_text("".join(f"{key} = {value!r}\n" for key, value in TINY.items()))
    report = bench.main([str(config), f"--dtype={dtype}", "--variants=", "--decode_images=1",
                         f"--data_root={tmp_path / 'data'}", "--corpora=synthetic", "--synthetic_images=8",
                         "--synthetic_image_size=32", f"--json={tmp_path / 'bench.json'}"])
    assert (bench.NO_NATIVE_BF16_NOTE in capsys.readouterr().out) is said
    assert report["cpu_native_bf16"] is native


def test_random_init_towers_builds_the_hub_models_exact_dimensions():
    cfg = Config(random_init_towers=True)  # the paper's towers: ELECTRA-Small and DeiT-Tiny, by hub name
    encoder = build_encoder(cfg, 1000)  # no hub access: the tests run with HF_HUB_OFFLINE=1
    text, vision = encoder.text_tower.config, encoder.vision_tower.config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.intermediate_size, text.embedding_size, text.vocab_size) == ("electra", 256, 12, 4, 1024, 128, 30522)
    assert (vision.model_type, vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads,
            vision.intermediate_size, vision.patch_size, vision.image_size) == ("deit", 192, 12, 3, 768, 16, 224)
    one_tower = build_encoder(dataclasses.replace(cfg, model_type="one_tower", onetower_stack="vision",
                                                  vision_tower="google/vit-base-patch16-224-in21k"), 1000)
    assert one_tower.stack_config.hidden_size == 768 and len(one_tower.layers) == 12
    with pytest.raises(ValueError, match="random_init_towers: vision_tower 'someone/vit-huge'"):
        build_encoder(dataclasses.replace(cfg, vision_tower="someone/vit-huge"), 1000)
    with pytest.raises(ValueError, match="vision_tower 'bert-base-uncased' is a bert model, not a vision tower"):
        build_encoder(dataclasses.replace(cfg, text_tower="bert-base-uncased", vision_tower="bert-base-uncased"), 1000)


def test_random_data_skips_the_tokenizer_only_for_a_hub_text_tower_built_offline():
    random, loader = SimpleNamespace(data="random"), SimpleNamespace(data="loader")
    assert not bench.needs_tokenizer(Config(random_init_towers=True), random)  # ELECTRA-Small's own
    assert bench.needs_tokenizer(Config(), random)  # real towers: the tokenizer is loaded
    assert bench.needs_tokenizer(Config(random_init_towers=True, tokenizer="synthetic"), random)
    assert bench.needs_tokenizer(Config(random_init_towers=True), loader)


def test_bench_runs_and_writes_its_table(tmp_path, capsys, monkeypatch):
    # bench.py measures each variant in a child process; here each gets a time limit, so none can hang the test
    monkeypatch.setattr(bench.subprocess, "run", functools.partial(subprocess.run, timeout=300))
    config = tmp_path / "tiny.py"
    config.write_text("".join(f"{key} = {value!r}\n" for key, value in TINY.items()))
    report = bench.main([str(config), "--data=random", "--steps=2", "--warmup=0", "--peak_tflops=1",
                         "--variants=none,vision+shared+ckpt+cache", f"--json={tmp_path / 'bench.json'}",
                         "--micro_batch_size=4", "--batch_size=4", "--profile=1", "--cross_dropout=0.1"])
    assert json.loads((tmp_path / "bench.json").read_text())["variants"] == report["variants"]
    none, lean = report["variants"]
    assert lean["trainable_params"] < none["trainable_params"] == none["total_params"]
    assert lean["saved_activation_bytes"] < none["saved_activation_bytes"]
    assert lean["flops_per_sample"] < none["flops_per_sample"]
    # recomputation is executed but is not model FLOPs
    assert lean["executed_flops_per_sample"] > lean["flops_per_sample"]
    for row in report["variants"]:
        assert row["samples_per_sec"] > 0 and row["mfu"] > 0 and row["peak_memory_bytes"] > 0
    printed = capsys.readouterr().out
    assert "GFLOP/sample" in printed and "vision+shared+ckpt+cache" in printed
    # --profile: every bucket of every variant, shares summing to the whole, each phase where it belongs
    assert "where the time goes" in printed and "normalisation" in printed
    for row in report["variants"]:
        profile = row["profile"]
        assert set(profile["share"]) == set(bench.PROFILE_COLUMNS) and profile["steps"] == 1
        assert sum(profile["share"].values()) == pytest.approx(1.0)
        for bucket in ("data", "optimizer", "matmul", "attention", "normalisation", "elementwise", "dropout"):
            assert profile["ms_per_step"][bucket] > 0, (row["variant"], bucket)


@pytest.mark.parametrize("name, bucket", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::convolution_backward", "matmul"),
    ("autograd::engine::evaluate_function: AddmmBackward0", "matmul"), ("aten::summary", "elementwise"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"), ("aten::_softmax", "attention"),
    ("aten::_log_softmax", "elementwise"), ("autograd::engine::evaluate_function: LogSoftmaxBackward0", None),
    ("aten::native_layer_norm_backward", "normalisation"), ("aten::gelu", "elementwise"),
    ("aten::native_dropout", "dropout"), ("aten::random_", "dropout"), (bench.PHASE_DATA, "data"),
    (bench.PHASE_OPTIMIZER, "optimizer"), (bench.PHASE_MODEL, None),
    # the CPU's attention function with its own backward: no bucket, so its products stay matmul time
    (attention_module._Attend.__name__, None), (attention_module._Attend.__name__ + "Backward", None),
    ("_KeepAndScale", "dropout"), ("_KeepAndScaleBackward", "dropout")])
def test_profile_puts_known_ops_in_their_bucket(name, bucket):
    assert bench.op_bucket(name) == bucket


def test_profile_charges_an_op_to_the_first_bucket_around_it():
    def chain(*names):  # outermost first, as the profiler nests events
        event = None
        for name in names:
            event = SimpleNamespace(name=name, cpu_parent=event)
        return event

    model = bench.PHASE_MODEL
    assert bench.event_bucket(chain(model, "aten::dropout", "aten::mul")) == "dropout"
    assert bench.event_bucket(chain(model, "autograd::engine::evaluate_function: AddmmBackward0",
                                    "aten::sum")) == "matmul"
    assert bench.event_bucket(chain(bench.PHASE_OPTIMIZER, "Optimizer.step#AdamW.step", "aten::_foreach_mul_")) \
        == "optimizer"
    assert bench.event_bucket(chain(model, "aten::linear", "aten::t")) == "matmul"
    assert bench.event_bucket(chain(model)) == "other"
    events = [SimpleNamespace(name="aten::mm", cpu_parent=None, self_cpu_time_total=3000.0,
                              self_device_time_total=0),
              SimpleNamespace(name=model, cpu_parent=None, self_cpu_time_total=1000.0, self_device_time_total=0)]
    shares = bench.time_shares(events, steps=2)
    assert shares["ms_per_step"]["matmul"] == 1.5 and shares["share"]["other"] == 0.25


def test_decode_rate_times_one_workers_items(tmp_path):
    cfg = cache_config(tmp_path)
    train_set = data.build_pretrain_datasets(cfg, data.build_transform(cfg))[0]
    opened = []
    timed = type("Timed", (), {"__len__": lambda self: len(train_set),
                               "__getitem__": lambda self, i: opened.append(i) or train_set[i]})()
    assert bench.decode_rate(timed, 5) > 0 and opened == [0, 0, 1, 2, 3, 4]  # one untimed warm-up item
    assert train_set[0]["image"].dtype == torch.uint8
    # bench.py with no variant times the decoding alone; with neither, there is nothing to measure
    config = tmp_path / "decode.py"
    config.write_text("".join(f"{key} = {value!r}\n" for key, value in TINY.items()))
    common = [str(config), f"--data_root={tmp_path / 'data'}", "--corpora=synthetic", "--synthetic_images=8",
              "--synthetic_image_size=32", "--peak_tflops=1", f"--json={tmp_path / 'decode.json'}", "--variants="]
    report = bench.main(common + ["--decode_images=4"])
    assert report["variants"] == [] and report["decode_images_per_sec_per_worker"] > 0
    with pytest.raises(ConfigError, match="nothing to measure"):
        bench.main(common)


def test_compiled_model_with_a_frozen_tower_matches_eager():
    """torch.compile traces the pretraining model with a frozen tower (the aot_eager backend: the same graph
    capture and autograd as inductor, without generating C++), giving eager's losses and gradients and no
    gradient to the frozen tower."""
    model = pretrain_model("shared", freeze_vision=True, cross_dropout=0.0)
    batch = make_batch(pretrain_pass="shared")
    eager = model(batch)
    eager["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager")(batch)
    compiled["loss"].backward()
    torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=1e-5, atol=1e-6)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(grads)
    assert not any(n.startswith("encoder.vision_tower") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("cross_dropout", [0.0, 0.1])
def test_compiling_the_cross_modal_layers_alone_matches_eager(cross_dropout):
    """compile_scope="cross_modal" compiles each cross-modal layer in place and nothing else: the losses and
    gradients are eager's, dropout included (the compiled layers draw eager's masks from the same generator, in
    the same order, and none again in backward), the towers keep their eager forward, and the layers share their
    graphs (one for the inner layers, one for each set of rows the last layer updates in the two passes)."""
    model = pretrain_model("separate", cross_dropout=cross_dropout, cross_layers=3, text_dropout=0.0)
    batch = make_batch()
    torch.manual_seed(5)
    eager = model(batch)
    eager["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_model(model, "cross_modal", backend="aot_eager")
    torch.manual_seed(5)
    compiled = model(batch)
    compiled["loss"].backward()
    assert [layer._compiled_call_impl is not None for layer in model.encoder.cross_layers] == [True] * 3
    assert model._compiled_call_impl is None and model.encoder.text_tower._compiled_call_impl is None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3  # inner; last of MLM; last of ITM
    torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=1e-5, atol=1e-6)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_cpu_dropout_draws_a_mask_per_call(backend):
    """Two dropouts of one tensor in a compiled function draw two masks (the compiler must not merge the draws
    as common subexpressions), each at the configured rate, and backward applies each call's own mask."""
    torch._dynamo.reset()
    x = torch.ones(200, 100, requires_grad=True)
    first, second = torch.compile(lambda x: (dropout(x, 0.3), dropout(x, 0.3)), backend=backend)(x)
    assert not torch.equal(first, second)
    for out in (first, second):
        assert abs((out == 0).float().mean().item() - 0.3) < 0.02
    (first * 1 + second * 2).sum().backward()
    torch.testing.assert_close(x.grad, (first.detach() + 2 * second.detach()))  # x is ones: out = mask * scale


def test_compiling_the_cross_modal_layers_needs_them():
    with pytest.raises(ConfigError, match="compile_scope='cross_modal'.*one_tower"):
        load_config(["--model_type=one_tower", "--compile=true", "--compile_scope=cross_modal"])
    with pytest.raises(ValueError, match="compile_scope='cross_modal'"):
        compile_model(pretrain_model("separate", model_type="one_tower"), "cross_modal")


@pytest.mark.parametrize("pretrain_pass, overrides", [("separate", dict(cross_dropout=0.1)), ("shared", {})])
def test_pretraining_forward_is_one_graph(pretrain_pass, overrides):
    """torch.compile captures the whole pretraining forward, dropout included: the MLM head gathers positions
    of known number (no boolean index), no Python branch reads a tensor, and the CPU dropout masks give way to
    the compiler's own."""
    model = pretrain_model(pretrain_pass, **overrides)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(make_batch(pretrain_pass=pretrain_pass))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

