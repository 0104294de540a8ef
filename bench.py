"""Benchmark pretraining: speed, FLOPs, model FLOPs utilisation (MFU), memory and parameters of a config and its
freezing variants. Prints a table and writes JSON.

    python bench.py configs/freeze_none.py --variants=none,text,vision,both --micro_batch_size=8
    python bench.py configs/freeze_none.py --random_init_towers=true --data=random --micro_batch_size=8 --variants=none,both

Config overrides (--key=value) work as for pretrain.py; --random_init_towers=true (the config key) builds the hub
towers the config names offline at their exact dimensions from random init, and with --data=random and such a
text tower's own tokenizer nothing at all is downloaded. Bench options:
  --variants=a,b,...    what to measure, each a freezing variant, config (as configured), none, text, vision or
                        both, optionally followed by modifiers: +shared / +separate (pretrain_pass), +ckpt
                        (gradient checkpointing), +compile (torch.compile, compile_scope as configured),
                        +compile_cross (torch.compile of the cross-modal layers alone), +cache (the frozen vision feature
                        cache, in vision_feature_cache with --data=loader; a variant without +cache reads images);
                        empty (--variants=) with --decode_images: only the decoding is timed
  --steps=N, --warmup=N timed steps (medians are reported) after untimed warm-up steps
  --data=loader|random  loader: the config's corpora through the training DataLoader, so the data time is real;
                        random: in-memory batches of captions exactly max_text_len tokens long (no padding) and
                        random pixels, the shape the paper's targets are stated at; the data time is masking only
  --decode_images=N     first time reading N training pictures (open, decode, transform: one loader worker's work)
                        in this process on one thread, and print images/s per worker; with num_workers workers
                        per process the loader can feed at most that many times as much
  --peak_tflops=X       the device's peak for MFU (default: the table of dense GPU peaks; on CPU a GEMM in the
                        run's dtype measured at start)
  --profile[=N]         after the timed steps, profile N more (default 2) with torch.profiler and print each
                        variant's time shares: matmul, attention, normalisation, elementwise, dropout, optimizer,
                        data, other (PROFILE_BUCKETS says which op goes where); the JSON has them per variant in ms
  --json=PATH           where the JSON goes (default: out_dir/bench.json)

One step is one micro-batch (micro_batch_size samples) forward and backward, then the optimizer step as
engine.train takes it (clipping, the finiteness check, AdamW); batch_size and accumulation play no part.
FLOPs are counted (torch.utils.flop_counter) on one step's forward and backward: model FLOPs, which MFU uses,
leave recomputation out (gradient checkpointing); executed FLOPs, in the JSON,
count it. Each variant runs in a process of its own. Activation bytes are those
autograd saves for backward in one forward (saved-tensor hooks; parameters excluded). Peak memory is CUDA's max
allocated over the timed steps, or on CPU the peak resident set size over them.
"""

import argparse
import ctypes
import dataclasses
import gc
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import data
import engine
import pretrain
from config import ConfigError, load_config, main_guard
from model import apply_freezing, build_pretrain_model, compile_model, enable_gradient_checkpointing, parameter_summary
from towers import HUB_TOWERS

# -----------------------------------------------------------------------------
# Random batches without a tokenizer

# Every text model of towers.HUB_TOWERS uses BERT's uncased WordPiece vocabulary: its size and special tokens
# ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103).
PAPER_TOKENIZER_INFO = data.TokenizerInfo(mask_token_id=103, vocab_size=30522, special_ids=(0, 100, 101, 102, 103))


def needs_tokenizer(cfg, args):
    """Whether the tokenizer must be loaded: always for --data=loader; for random data unless random_init_towers
    builds the text tower offline and the tokenizer is that hub model's (then PAPER_TOKENIZER_INFO describes it)."""
    name = cfg.tokenizer or cfg.text_tower
    paper_vocabulary = name in HUB_TOWERS and "vocab_size" in HUB_TOWERS[name][1]
    return args.data == "loader" or not (cfg.random_init_towers and paper_vocabulary)


# -----------------------------------------------------------------------------
# Variants

FREEZING = {"config": {}, "none": dict(freeze_text=False, freeze_vision=False),
            "text": dict(freeze_text=True, freeze_vision=False), "vision": dict(freeze_text=False, freeze_vision=True),
            "both": dict(freeze_text=True, freeze_vision=True)}
MODIFIERS = {"shared": dict(pretrain_pass="shared"), "separate": dict(pretrain_pass="separate"),
             "ckpt": dict(gradient_checkpointing=True), "compile": dict(compile=True),
             "compile_cross": dict(compile=True, compile_scope="cross_modal"), "cache": {}}


def variant_config(cfg, variant):
    """(cfg of a variant such as "both+shared+ckpt", whether it reads cached vision features)."""
    base, *modifiers = variant.split("+")
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if base not in FREEZING or unknown:
        raise ValueError(f"--variants: unknown variant '{variant}': use one of {', '.join(FREEZING)}, each with any "
                         f"of +{', +'.join(MODIFIERS)}")
    changes = dict(FREEZING[base])
    for modifier in modifiers:
        changes.update(MODIFIERS[modifier])
    return dataclasses.replace(cfg, **changes), "cache" in modifiers


# -----------------------------------------------------------------------------
# Batches

def random_batches(cfg, tokenizer_info, count=4):
    """`count` collated batches, cycled: micro_batch_size captions of exactly max_text_len tokens of random
    non-special ids (special positions first and last, no padding, one word per token), each row its own
    picture, random pixels."""
    g = torch.Generator().manual_seed(cfg.seed)
    B, T, S = cfg.micro_batch_size, cfg.max_text_len, cfg.image_size
    allowed = torch.ones(tokenizer_info.vocab_size, dtype=torch.bool)
    allowed[list(tokenizer_info.special_ids)] = False
    allowed_ids = allowed.nonzero().squeeze(1)
    special = torch.zeros(B, T, dtype=torch.bool)
    special[:, [0, -1]] = True  # where CLS and SEP sit
    word_ids = (torch.arange(T) - 1).masked_fill(special[0], -1).expand(B, T)
    batches = [dict(pixel_values=torch.randn(B, 3, S, S, generator=g),
                    input_ids=allowed_ids[torch.randint(len(allowed_ids), (B, T), generator=g)],
                    attention_mask=torch.ones(B, T, dtype=torch.long), special_tokens_mask=special,
                    word_ids=word_ids, image_ids=torch.arange(B) + i * B) for i in range(count)]
    return itertools.cycle(batches)


def with_random_vision_features(batches, encoder, cfg):
    """Random batches as the feature cache hands them out: the vision tower's output shape, float16, instead of
    pixels (the compute side of the cache; --data=loader measures the data side too)."""
    device = next(encoder.vision_tower.parameters()).device  # the probe goes where the tower is
    with torch.no_grad():
        shape = encoder.vision_features(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device)).shape[1:]
    g = torch.Generator().manual_seed(cfg.seed)
    for batch in batches:
        feats = torch.randn(len(batch["image_ids"]), *shape, generator=g).half()
        yield {**{k: v for k, v in batch.items() if k != "pixel_values"}, "image_feats": feats}


# -----------------------------------------------------------------------------
# Measurements

def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the GPU attention kernels but not the CPU one, which would count attention as free.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def step_flops(model, batch, autocast):
    """FLOPs of one training step's forward and backward (the optimizer's elementwise work is not counted)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        with autocast:
            loss = model(batch)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def model_flops_twin(cfg, vocab_size, device):
    """The variant's model as MFU counts it: the same computation without recomputation, i.e. without gradient
    checkpointing, and without cross-modal dropout (which costs no FLOPs), so attention takes its fused path."""
    cfg = dataclasses.replace(cfg, gradient_checkpointing=False, cross_dropout=0.0)
    model = build_pretrain_model(cfg, vocab_size)
    apply_freezing(model, cfg)
    return model.to(device).train()


def saved_activation_bytes(model, batch, autocast):
    """Bytes of the distinct storages autograd saves for backward in one training forward. Parameters and
    buffers are left out: they are held anyway. Checkpointed blocks save only their inputs, so they count so."""
    held = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(batch)  # the graph, and what it saved, goes when the output does
    return sum(saved.values())


# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets: (bf16/fp16 tensor cores, tf32 tensor cores,
# fp32 without tensor cores). The longest name fragment found in the device name wins, so "H200 NVL" is not
# taken for "H200", nor "A100" for "A10".
GPU_PEAK_TFLOPS = [
    ("H100 NVL", (835.0, 417.5, 60.0)), ("H100 PCIe", (756.5, 378.0, 51.2)), ("H100", (989.4, 494.7, 66.9)),
    ("H200 NVL", (835.5, 417.5, 60.0)), ("H200", (989.4, 494.7, 66.9)), ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.1, 183.2, 91.6)),
    ("L40", (181.0, 90.5, 90.5)), ("L4", (121.0, 60.0, 30.3)), ("A10", (125.0, 62.5, 31.2)),
    ("RTX 4090", (165.2, 82.6, 82.6)), ("RTX 3090", (71.0, 35.6, 35.6)),
]


def gpu_peak_from_table(device, dtype):
    """(peak FLOP/s, source) from GPU_PEAK_TFLOPS, or None for a GPU the table does not know."""
    name = torch.cuda.get_device_name(device)
    found = [(fragment, peaks) for fragment, peaks in GPU_PEAK_TFLOPS if fragment in name]
    if not found:
        return None
    half, tf32, fp32 = max(found, key=lambda entry: len(entry[0]))[1]
    if dtype != "float32":
        return half * 1e12, f"datasheet {dtype} dense peak of {name}"
    if torch.get_float32_matmul_precision() != "highest":
        return tf32 * 1e12, f"datasheet tf32 dense peak of {name}"
    return fp32 * 1e12, f"datasheet fp32 peak of {name}"


def measure_gemm_peak(device, dtype):
    """Best FLOP/s of a square matmul in `dtype`: the side doubles from 512 until one product takes 0.5 s
    (or the side reaches 4096), then the best of three at that side."""
    def seconds(a, b):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    n = 512
    while True:
        a, b = (torch.randn(n, n, device=device).to(getattr(torch, dtype)) for _ in range(2))
        if seconds(a, b) > 0.5 or n >= 4096:
            break
        n *= 2
    return max(2 * n ** 3 / seconds(a, b) for _ in range(3))


def device_peak(device, dtype, peak_tflops):
    """(peak FLOP/s, where it comes from) for MFU."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, "--peak_tflops"
    if device.type == "cuda":
        found = gpu_peak_from_table(device, dtype)
        if found:
            return found
        return measure_gemm_peak(device, dtype), f"measured {dtype} GEMM (no table entry for " \
                                                 f"{torch.cuda.get_device_name(device)})"
    return measure_gemm_peak(device, dtype), f"measured {dtype} GEMM"


# CPU flags of a native bfloat16 matmul: AVX-512 BF16 (dot products) and AMX (tile multiply), as Linux lists them
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


NO_NATIVE_BF16_NOTE = ("note: this CPU has no native bfloat16 matmul (neither avx512_bf16 nor amx_bf16 among its "
                       "flags): bfloat16 autocast runs slower than float32 here; README, Performance, gives bfloat16 "
                       "figures from a CPU that has it")


def cpu_native_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU multiplies bfloat16 natively (one of NATIVE_BF16_FLAGS among the flags lscpu shows),
    or None where the flags cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else any(flag in flags for flag in NATIVE_BF16_FLAGS)


def reset_peak_memory(device):
    """Start a new peak-memory window; False where the platform cannot (CPU outside Linux)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        # hand memory that earlier variants freed back to the system, or it would count in this one's peak
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets this process's peak resident set size (VmHWM)
        return True
    except OSError:
        return False


def peak_memory(device):
    """Bytes: CUDA max allocated, or the peak resident set size (VmHWM) of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(dataset, count):
    """Items per second of `dataset[i]` for the first `count` items on one thread: what one loader worker
    produces (the map-style corpora open, decode and transform a picture per item)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker process runs one thread
    try:
        dataset[0]  # file-system caches and lazy set-up out of the timing
        start = time.perf_counter()
        for i in range(count):
            dataset[i % len(dataset)]
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# Where the time goes (--profile)

# Each timed step runs in three profiler ranges; ops inside the data and optimizer ranges are charged to them.
PHASE_DATA, PHASE_MODEL, PHASE_OPTIMIZER = "bench::data", "bench::forward_backward", "bench::optimizer"
# Forward and backward ops are charged to a bucket by name: the op's own, or that of an enclosing op or autograd
# node (a mul inside aten::dropout is dropout; the bias-gradient sum of AddmmBackward0 is matmul). Where several
# enclosing names match, the first bucket in this order wins. A pattern must match the whole name, lower-case,
# without the "autograd::engine::evaluate_function: " of backward nodes.
PROFILE_BUCKETS = {
    "data": PHASE_DATA,  # masking and collation (random data), or waiting for the loader, and the transfer
    "optimizer": PHASE_OPTIMIZER,  # clipping, the finiteness check, AdamW, zero_grad
    "dropout": r".*(dropout|bernoulli|random_|keepandscale).*",  # F.dropout and model.dropout's masks
    "attention": r".*(scaled_?dot_?product|attention|(?<!log)(?<!log_)softmax).*",  # SDPA, written-out attention
    "normalisation": r".*(layer_?norm|group_?norm|batch_?norm).*",
    "matmul": r"(aten::)?(mm|addmm|bmm|baddbmm|matmul|linear|addmv|mv|conv2d|_?convolution|mkldnn_convolution"
              r"|convolution_backward)(backward\d*)?",  # the patch embedding is a convolution
    "elementwise": r"aten::.*",  # every other op: activations, adds, copies, reductions, indexing, the loss
}
# "other": time in no op: Python and framework overhead between ops, and anything outside the three ranges.
PROFILE_COLUMNS = [*PROFILE_BUCKETS, "other"]
_BUCKET_PATTERNS = {bucket: re.compile(pattern) for bucket, pattern in PROFILE_BUCKETS.items()}


def profiler_activities(device):
    return [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])


def op_bucket(name):
    """The bucket a profiler event's name alone puts it in (the first of PROFILE_BUCKETS that matches), or None."""
    bare = name.lower().removeprefix("autograd::engine::evaluate_function: ")
    return next((bucket for bucket, pattern in _BUCKET_PATTERNS.items() if pattern.fullmatch(bare)), None)


def event_bucket(event):
    """The bucket of a profiler event: the first in PROFILE_BUCKETS' order among those of its name and its
    enclosing events' names; "other" for framework time outside any op (the model range's own time)."""
    found = set()
    while event is not None:
        found.add(op_bucket(event.name))
        event = event.cpu_parent
    return next((bucket for bucket in PROFILE_BUCKETS if bucket in found), "other")


def time_shares(events, steps):
    """{"ms_per_step": {bucket: ms}, "share": {bucket: fraction}, "steps": steps} from a profile of `steps` steps:
    each event's self time (its own, without its children's; on a GPU the time of the kernels it launched) in
    its bucket, so every microsecond counts once."""
    use_device = any(getattr(e, "self_device_time_total", 0) > 0 for e in events)
    totals = dict.fromkeys(PROFILE_COLUMNS, 0.0)
    for event in events:
        seconds = event.self_device_time_total if use_device else event.self_cpu_time_total
        totals[event_bucket(event)] += seconds / 1e3  # microseconds -> ms
    whole = sum(totals.values()) or 1.0
    return {"ms_per_step": {b: t / steps for b, t in totals.items()},
            "share": {b: t / whole for b, t in totals.items()}, "steps": steps}


def format_profile(rows):
    header = f"{'share of step time':<22} " + " ".join(f"{b:>13}" for b in PROFILE_COLUMNS)
    lines = [header]
    for r in rows:
        if r.get("profile"):
            shares = r["profile"]["share"]
            lines.append(f"{r['variant']:<22} " + " ".join(f"{100 * shares[b]:>12.1f}%" for b in PROFILE_COLUMNS))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# One variant

def bench_variant(variant, cfg, dist, vocab_size, tokenizer, tokenizer_info, args):
    cfg, cached = variant_config(cfg, variant)
    if cached and not cfg.freeze_vision:
        raise ValueError(f"variant '{variant}': +cache needs a frozen vision tower (variants vision or both)")
    if cached and args.data == "loader" and not cfg.vision_feature_cache:
        raise ValueError(f"variant '{variant}': +cache with --data=loader needs --vision_feature_cache=DIR")
    if not cached:
        cfg = dataclasses.replace(cfg, vision_feature_cache="")
    device = dist.device
    torch.manual_seed(cfg.seed)
    model = build_pretrain_model(cfg, vocab_size)
    apply_freezing(model, cfg)
    engine.require_trainable(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device)
    if args.data == "loader":
        batches = iter(pretrain.build_data(cfg, dist, tokenizer, model)[2])
    else:
        batches = random_batches(cfg, tokenizer_info)
        if cached:
            batches = with_random_vision_features(batches, model.encoder, cfg)
    prepare_batch = pretrain.make_prepare_batch(cfg, tokenizer_info, device)
    autocast = engine.autocast_context(device, cfg.dtype)
    optimizer = engine.build_optimizer(model, cfg, engine.lr_scales(cfg, model), verbose=False)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    model.train()

    first = prepare_batch(next(batches), "bench", 0)
    executed_flops = step_flops(model, first, autocast)
    flops = step_flops(model_flops_twin(cfg, vocab_size, device), first, autocast)
    saved = saved_activation_bytes(model, first, autocast)
    samples = len(first["itm_labels"])
    if cfg.compile:  # after counting, in place as engine.train does: the warm-up steps compile
        compile_model(model, cfg.compile_scope)

    def train_step(step):
        """One step, each phase in a profiler range (no cost while no profiler runs); (data s, compute s)."""
        start = time.perf_counter()
        with torch.profiler.record_function(PHASE_DATA):
            batch = prepare_batch(next(batches), "bench", step)  # loading (or waiting for workers), masking, transfer
            synchronize(device)
        loaded = time.perf_counter()
        with torch.profiler.record_function(PHASE_MODEL):
            with autocast:
                loss = model(batch)["loss"]
            loss.backward()
        with torch.profiler.record_function(PHASE_OPTIMIZER):
            engine.optimizer_step(optimizer, scaler, params, cfg.grad_clip, loss.detach().float(), step)
            synchronize(device)
        return loaded - start, time.perf_counter() - loaded

    data_seconds, compute_seconds, warmup_seconds = [], [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            has_peak = reset_peak_memory(device)
        data_s, compute_s = train_step(step)
        if step < args.warmup:
            warmup_seconds.append(data_s + compute_s)  # with +compile, the compilation is in these
        else:
            data_seconds.append(data_s)
            compute_seconds.append(compute_s)
    profile = None
    if args.profile:
        with torch.profiler.profile(activities=profiler_activities(device)) as profiler:
            for step in range(args.warmup + args.steps, args.warmup + args.steps + args.profile):
                train_step(step)
        profile = time_shares(profiler.events(), args.profile)
    step_seconds = statistics.median(d + c for d, c in zip(data_seconds, compute_seconds))
    samples_per_sec = samples / step_seconds
    trainable, total = parameter_summary(model)[-1][1:]
    return {"variant": variant, "samples": samples, "trainable_params": trainable, "total_params": total,
            "flops_per_sample": flops / samples, "executed_flops_per_sample": executed_flops / samples,
            "samples_per_sec": samples_per_sec,
            "mfu": flops / samples * samples_per_sec / args.peak_flops,
            "data_ms": 1e3 * statistics.median(data_seconds), "compute_ms": 1e3 * statistics.median(compute_seconds),
            "peak_memory_bytes": peak_memory(device) if has_peak else None, "saved_activation_bytes": saved,
            "step_seconds": [d + c for d, c in zip(data_seconds, compute_seconds)], "warmup_seconds": warmup_seconds,
            "profile": profile,
            "load_average": os.getloadavg()[0]}  # other processes' work: the timings are only as good as it is low


# -----------------------------------------------------------------------------
# Report

def machine_description(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model_name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                              model_name)
    return f"{model_name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def format_table(rows):
    header = (f"{'variant':<22} {'trainable/total M':>17} {'GFLOP/sample':>12} {'samples/s':>9} {'data ms':>8} "
              f"{'compute ms':>10} {'MFU':>6} {'peak mem MB':>11} {'saved act MB':>12} {'load':>5} {'warm-up s':>9}")
    lines = [header]
    for r in rows:
        params = f"{r['trainable_params'] / 1e6:.1f}/{r['total_params'] / 1e6:.1f}"
        memory = f"{r['peak_memory_bytes'] / 2 ** 20:.0f}" if r["peak_memory_bytes"] is not None else "n/a"
        lines.append(f"{r['variant']:<22} {params:>17} {r['flops_per_sample'] / 1e9:>12.2f} "
                     f"{r['samples_per_sec']:>9.2f} {r['data_ms']:>8.1f} {r['compute_ms']:>10.1f} "
                     f"{100 * r['mfu']:>5.1f}% {memory:>11} {r['saved_activation_bytes'] / 2 ** 20:>12.1f} "
                     f"{r['load_average']:>5.2f} {sum(r['warmup_seconds']):>9.1f}")
    return "\n".join(lines)


def parse_args(argv):
    """(bench options, the rest: CONFIG.py and --key=value overrides for config.load_config)."""
    parser = argparse.ArgumentParser(prog="bench.py", description="see the module docstring")
    parser.add_argument("--variants", default="config")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data", choices=("loader", "random"), default="loader")
    parser.add_argument("--decode_images", type=int, default=0)
    parser.add_argument("--peak_tflops", type=float, default=0.0)
    parser.add_argument("--profile", type=int, nargs="?", const=2, default=0)
    parser.add_argument("--json", default="")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # measure one variant, write its row
    args, rest = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.profile < 0:
        raise ConfigError(f"--steps={args.steps} must be at least 1, --warmup={args.warmup} and "
                          f"--profile={args.profile} not negative")
    return args, rest


def run_child(variant, argv, peak_flops, json_path):
    """Measure one variant in a process of its own (so peak memory is its own, not the largest so far) and
    return its row; a failure there is raised here with the child's error line."""
    options = [a for a in argv if not a.startswith(("--variants=", "--json=", "--peak_tflops="))]
    command = [sys.executable, os.path.abspath(__file__), *options, f"--variants={variant}", "--child",
               f"--json={json_path}", f"--peak_tflops={peak_flops / 1e12!r}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        message = lines[-1].removeprefix("error: ")
        raise (FloatingPointError if done.returncode == 3 else ValueError)(f"variant '{variant}': {message}")
    with open(json_path) as f:
        return json.load(f)


def main(argv):
    args, config_argv = parse_args(argv)
    cfg = load_config(config_argv)
    dist = engine.setup_distributed(cfg)
    if dist.is_ddp:
        raise ValueError("bench.py measures one process: run it with python, not torchrun")
    engine.autocast_context(dist.device, cfg.dtype)  # refuses float16 on CPU before any work
    variants = [v for v in args.variants.split(",") if v]  # none: --decode_images alone
    if not variants and args.decode_images <= 0:
        raise ConfigError("--variants is empty and --decode_images is not set: nothing to measure")
    for variant in variants:
        variant_config(cfg, variant)  # an unknown variant fails now, not after the others ran

    if args.child:
        tokenizer = data.build_tokenizer(cfg) if needs_tokenizer(cfg, args) else None
        info = data.TokenizerInfo.from_tokenizer(tokenizer) if tokenizer is not None else PAPER_TOKENIZER_INFO
        args.peak_flops = args.peak_tflops * 1e12
        row = bench_variant(variants[0], cfg, dist, info.vocab_size, tokenizer, info, args)
        with open(args.json, "w") as f:  # the parent's temporary directory
            json.dump(row, f)
        return row

    load_start = os.getloadavg()
    peak_flops, peak_source = device_peak(dist.device, cfg.dtype, args.peak_tflops)
    command = "python bench.py " + " ".join(argv)
    print(f"{command}\nmachine: {machine_description(dist.device)}\n"
          f"dtype {cfg.dtype} | micro batch {cfg.micro_batch_size} | image {cfg.image_size} | text "
          f"{cfg.max_text_len} tokens | data {args.data} | {args.warmup} warm-up + {args.steps} timed steps (medians)\n"
          f"peak {peak_flops / 1e9:.1f} GFLOP/s ({peak_source}) | load average {load_start[0]:.2f}")
    native_bf16 = cpu_native_bf16() if dist.device.type == "cpu" else None
    if native_bf16 is False and cfg.dtype == "bfloat16":
        print(NO_NATIVE_BF16_NOTE)
    if dist.device.type == "cpu" and cfg.dtype != "float32" and args.peak_tflops <= 0:
        fp32 = measure_gemm_peak(dist.device, "float32")
        if fp32 > peak_flops:
            print(f"note: this CPU multiplies {cfg.dtype} matrices {fp32 / peak_flops:.0f}x slower than float32 "
                  f"({fp32 / 1e9:.1f} GFLOP/s), so autocast slows training down")
    decode = None
    if args.decode_images > 0:
        train_set = data.build_pretrain_datasets(cfg, data.build_transform(cfg, train=True))[0]
        if isinstance(train_set, torch.utils.data.IterableDataset):
            raise ValueError("--decode_images needs map-style corpora (coco, coco_official, vg, synthetic)")
        decode = decode_rate(train_set, args.decode_images)
        print(f"data: {decode:.1f} images/s per loader worker (open, decode, transform to uint8; one thread); "
              f"{cfg.num_workers} workers per process: at most {decode * max(cfg.num_workers, 1):.0f} images/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(variants):
            rows.append(run_child(variant, argv, peak_flops, os.path.join(tmp, f"{i}.json")))
            table = format_table(rows[-1:]).splitlines()
            print("\n".join(table if i == 0 else table[1:]), flush=True)
    if args.profile:
        print(f"\nwhere the time goes ({args.profile} profiled steps after the timed ones; bench.PROFILE_BUCKETS)\n"
              + format_profile(rows))
    load_end = os.getloadavg()
    print(f"load average at the end {load_end[0]:.2f}")
    report = {"command": command, "machine": machine_description(dist.device), "dtype": cfg.dtype,
              "micro_batch_size": cfg.micro_batch_size, "image_size": cfg.image_size,
              "max_text_len": cfg.max_text_len, "data": args.data,
              "warmup": args.warmup, "steps": args.steps, "peak_flops": peak_flops, "peak_source": peak_source,
              "load_average": [load_start[0], load_end[0]], "decode_images_per_sec_per_worker": decode,
              "cpu_native_bf16": native_bf16,
              "config": dataclasses.asdict(cfg), "variants": rows}
    path = args.json or os.path.join(cfg.out_dir, "bench.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:  # written whole, then renamed: never half a report
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
