"""Checks only a CUDA machine can run: mixed-precision training, the fused optimizer, FlashAttention in the
cross-modal layers, moving a run between CPU and GPU, NCCL DDP, torch.compile, bf16 against fp32 evaluation, and
bench.py's MFU on the paper model against the datasheet peak.

    python gpu_check.py [--out=DIR] [--only=name,name] [--mfu_target=0.40]

Prints one line per check (PASS, FAIL or SKIP, its name, what it saw) and exits with status 1 when any check
failed. Without a GPU it says so and exits 0. Runs in a few minutes on one H100-class GPU; the multi-GPU check
needs two devices and is skipped with fewer.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

import data
import engine
import evaluate
import pretrain
from config import Config, ConfigError, main_guard
from encoders import Attention
from model import apply_freezing, build_pretrain_model

ROOT = Path(__file__).resolve().parent
# A small two-tower model built offline (family towers at hand-set sizes), for the in-process checks.
SMALL = dict(text_tower="bert", vision_tower="vit", tokenizer="synthetic", text_hidden_size=128, text_layers=2,
             text_heads=4, text_mlp_ratio=2.0, vision_hidden_size=128, vision_layers=2, vision_heads=4,
             vision_mlp_ratio=2.0, image_size=64, patch_size=8, cross_layers=2, cross_hidden=128, cross_heads=2,
             cross_mlp_ratio=2.0, cross_dropout=0.1, max_text_len=24, micro_batch_size=16, lr=3e-4, warmup_steps=0)
# pretrain.py on the synthetic world, a handful of steps (the quick-start model)
QUICK = ["configs/quickstart.py", "--synthetic_images=200", "--micro_batch_size=16", "--batch_size=32",
         "--log_interval=1", "--eval_batches=2", "--num_workers=2"]


class Skip(Exception):
    """A check that cannot run on this machine (too few GPUs): reported as SKIP, not as a failure."""


def run_checks(checks, context):
    """Run each (name, function(context) -> detail) in order; returns [(status, name, detail)], status PASS when
    the function returns, SKIP when it raises Skip, FAIL with the exception's last line otherwise."""
    results = []
    for name, check in checks:
        try:
            status, detail = "PASS", check(context)
        except Skip as e:
            status, detail = "SKIP", str(e)
        except Exception as e:  # a failed check must not stop the others
            traceback.print_exc(file=sys.stderr)
            status, detail = "FAIL", f"{type(e).__name__}: {' '.join(str(e).split())[-400:]}"
        results.append((status, name, detail))
        print(f"{status} {name}: {detail}", flush=True)
    return results


def mean(values):
    return sum(values) / len(values)


def small_setup(device, dtype):
    """(cfg, model on `device`, a fixed batch prepared as pretraining prepares it)."""
    cfg = Config(**SMALL, dtype=dtype, device=str(device))
    tokenizer = data.synthetic_tokenizer()
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, len(tokenizer))
    apply_freezing(model, cfg)
    model.to(device).train()
    g = torch.Generator().manual_seed(0)
    B, T = cfg.micro_batch_size, cfg.max_text_len
    special = torch.zeros(B, T, dtype=torch.bool)
    special[:, [0, -1]] = True
    raw = dict(pixel_values=torch.randint(0, 256, (B, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                                          generator=g),
               input_ids=torch.randint(5, len(tokenizer), (B, T), generator=g).masked_fill(special, 2),
               attention_mask=torch.ones(B, T, dtype=torch.long), special_tokens_mask=special,
               word_ids=(torch.arange(T) - 1).expand(B, T).masked_fill(special, -1), image_ids=torch.arange(B))
    prepare = pretrain.make_prepare_batch(cfg, data.TokenizerInfo.from_tokenizer(tokenizer), device)
    return cfg, model, prepare(raw, 0, 0)


def train_small(device, dtype, steps=30):
    """Losses of `steps` optimizer steps on one fixed batch, as engine.train takes them (autocast, scaler)."""
    cfg, model, batch = small_setup(device, dtype)
    optimizer = engine.build_optimizer(model, cfg, {}, verbose=False)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    losses = []
    for step in range(steps):
        with engine.autocast_context(device, dtype):
            loss = model(batch)["loss"]
        scaler.scale(loss).backward()
        engine.optimizer_step(optimizer, scaler, params, cfg.grad_clip, loss.detach().float(), step)
        losses.append(loss.item())
    return losses, optimizer


def check_training(dtype):
    def check(ctx):
        losses, _ = train_small(ctx["device"], dtype)
        first, last = mean(losses[:5]), mean(losses[-5:])
        if not all(torch.isfinite(torch.tensor(losses))) or not last < 0.8 * first:
            raise AssertionError(f"losses {losses[:3]} ... {losses[-3:]}: not finite, or not decreasing by 20%")
        return f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps"
    return check


def check_fused_adamw(ctx):
    _, optimizer = train_small(ctx["device"], "bfloat16", steps=2)
    if not optimizer.defaults.get("fused"):
        raise AssertionError(f"AdamW defaults {optimizer.defaults}: not fused")
    return "engine.build_optimizer gives fused AdamW on CUDA, and it steps"


def check_flash_attention(ctx):
    """FlashAttention runs the cross-modal attention over image keys (no mask): forced on one Attention module,
    and picked on its own inside the model (the profiler counts its calls in one bf16 forward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = ctx["device"]
    attention = Attention(128, 2, 0.0).to(device)
    x, context = torch.randn(4, 24, 128, device=device), torch.randn(4, 65, 128, device=device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        attention(x, context, None).float().sum().backward()  # raises if the flash kernel cannot take the call
    cfg, model, batch = small_setup(device, "bfloat16")
    encoder = model.eval().encoder
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        text = encoder.encode_text(batch["input_ids"], batch["attention_mask"])
        image = encoder.encode_image(batch["pixel_values"])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            encoder.fuse(text, image)  # the cross-modal layers only: the towers' own attention is not counted
    flash = sum(event.count for event in profile.key_averages() if "flash" in event.key)
    expected = 2 * cfg.cross_layers  # per layer: text -> image and image -> image
    if flash < expected:
        raise AssertionError(f"{flash} flash attention calls in the cross-modal layers, expected {expected}")
    return f"forced on a module; {flash} flash calls in the cross-modal layers ({expected} over image keys)"


def run(command, timeout, env=None):
    """Run a command from the repository root; raise with its last stderr line when it fails."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()
        raise RuntimeError(f"{' '.join(command[:4])} ...: {lines[-1]}")
    return done.stdout


def check_resume_across_devices(ctx):
    """A run checkpointed on the CPU resumes on the GPU, and back."""
    out, data_root = ctx["out"] / "moved", ctx["out"] / "data"
    common = [sys.executable, "pretrain.py", *QUICK, f"--out_dir={out}", f"--data_root={data_root}",
              "--ckpt_interval=2", "--eval_interval=2"]
    run(common + ["--device=cpu", "--max_steps=2"], timeout=900)
    on_gpu = run(common + ["--device=cuda", "--max_steps=4"], timeout=900)
    back = run(common + ["--device=cpu", "--max_steps=6"], timeout=900)
    if "resumed from" not in on_gpu or "resumed from" not in back:
        raise AssertionError("a run did not resume")
    ctx["pretrained"] = out
    return "CPU steps 1-2, GPU steps 3-4, CPU steps 5-6, each resumed from the last checkpoint"


def check_compile(ctx):
    out = ctx["out"] / "compiled"
    run([sys.executable, "pretrain.py", *QUICK, f"--out_dir={out}", f"--data_root={ctx['out'] / 'data'}",
         "--device=cuda", "--compile=true", "--max_steps=6", "--dtype=bfloat16"], timeout=1200)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "split" not in line]
    return f"6 bf16 steps compiled, loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}"


def check_nccl_ddp(ctx):
    if torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU: needs two")
    results = []
    for name, extra in (("MLM + ITM, compiled", ["--compile=true"]), ("MLM only", ["--itm_weight=0"]),
                        ("ITM only", ["--mlm_weight=0"])):
        out = ctx["out"] / f"ddp_{len(results)}"
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py",
             *QUICK, f"--out_dir={out}", f"--data_root={ctx['out'] / 'data'}", "--max_steps=4", "--dtype=bfloat16",
             *extra], timeout=1200)
        results.append(name)
    return "2 processes, nccl: " + ", ".join(results)


def check_eval_parity(ctx):
    """The same weights score alike evaluated in bf16 and in fp32: held-out MLM/ITM of the pretraining run, and
    retrieval ranks of a model fine-tuned from it."""
    if "pretrained" not in ctx:
        raise Skip("needs the run of resume_across_devices")
    device, run_dir = ctx["device"], ctx["pretrained"]
    cfg = evaluate.run_config(run_dir, [f"--device={device}"])
    dist = engine.Dist(0, 0, 1, True, device, False)
    tokenizer = data.build_tokenizer(cfg)
    model = build_pretrain_model(cfg, len(tokenizer))
    apply_freezing(model, cfg)
    model.to(device)
    checkpoint = torch.load(engine.latest_checkpoint(str(run_dir)), map_location=device, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    val_loader = pretrain.build_data(cfg, dist, tokenizer, model)[3]
    held_out = pretrain.make_evaluate(cfg, dist, val_loader, pretrain.make_prepare_batch(
        cfg, data.TokenizerInfo.from_tokenizer(tokenizer), device))
    scores = {}
    for dtype in ("float32", "bfloat16"):
        with torch.no_grad(), engine.autocast_context(device, dtype):
            scores[dtype] = held_out(model)
    for name in ("itm_acc", "mlm_acc"):
        if abs(scores["float32"][name] - scores["bfloat16"][name]) > 0.02:
            raise AssertionError(f"{name}: fp32 {scores['float32'][name]:.4f}, bf16 {scores['bfloat16'][name]:.4f}")
    retrieval = ctx["out"] / "retrieval"
    run([sys.executable, "finetune.py", "configs/synthetic_coco_retrieval.py", f"--init_from={run_dir}",
         f"--out_dir={retrieval}", f"--data_root={ctx['out'] / 'data'}", "--max_steps=20", "--device=cuda"],
        timeout=1200)
    ranks = {}
    for dtype in ("float32", "bfloat16"):
        copy = ctx["out"] / f"retrieval_{dtype}"
        shutil.copytree(retrieval, copy, ignore=shutil.ignore_patterns("eval"))
        run([sys.executable, "evaluate.py", str(copy), f"--dtype={dtype}", "--device=cuda"], timeout=1200)
        ranks[dtype] = {k: v for path in sorted((copy / "eval").glob("*_metrics.json"))
                        for k, v in json.loads(path.read_text())["metrics"].items()}
    differ = {k: (v, ranks["bfloat16"][k]) for k, v in ranks["float32"].items() if abs(v - ranks["bfloat16"][k]) > 0.01}
    if differ:
        raise AssertionError(f"retrieval metrics (fp32, bf16) differ: {differ}")
    return (f"itm_acc {scores['float32']['itm_acc']:.4f} / {scores['bfloat16']['itm_acc']:.4f}, mlm_acc "
            f"{scores['float32']['mlm_acc']:.4f} / {scores['bfloat16']['mlm_acc']:.4f} (fp32 / bf16); retrieval "
            f"{', '.join(f'{k} {v:.4f}' for k, v in ranks['float32'].items())} in both")


def check_bench_mfu(ctx):
    """bench.py on the paper's two-tower model in bf16: MFU against the datasheet peak (target ctx["mfu_target"]),
    and where the GPU time goes (bench.py --profile's buckets)."""
    path = ctx["out"] / "bench.json"
    run([sys.executable, "bench.py", "configs/freeze_none.py", "--random_init_towers=true", "--data=random",
         "--dtype=bfloat16", "--micro_batch_size=88", "--batch_size=88", "--steps=10", "--warmup=3",
         "--variants=none,none+shared,both,both+shared,none+compile_cross", "--profile=2", f"--json={path}"], timeout=1800)
    report = json.loads(path.read_text())
    rows = {row["variant"]: row for row in report["variants"]}
    figures = ", ".join(f"{name} {100 * row['mfu']:.1f}% ({row['samples_per_sec']:.0f} samples/s)"
                        for name, row in rows.items())
    where = ", ".join(f"{bucket} {100 * share:.0f}%" for bucket, share in rows["none"]["profile"]["share"].items())
    if rows["none"]["mfu"] < ctx["mfu_target"]:
        raise AssertionError(f"MFU below the {100 * ctx['mfu_target']:.0f}% target: {figures}; {report['peak_source']}; "
                             f"none's GPU time: {where}")
    return f"MFU {figures}; against the {report['peak_source']}; none's GPU time: {where}"


CHECKS = [("train_bfloat16", check_training("bfloat16")), ("train_float16", check_training("float16")),
          ("fused_adamw", check_fused_adamw), ("flash_attention", check_flash_attention),
          ("resume_across_devices", check_resume_across_devices), ("compile", check_compile),
          ("nccl_ddp", check_nccl_ddp), ("eval_parity", check_eval_parity), ("bench_mfu", check_bench_mfu)]


def main(argv):
    parser = argparse.ArgumentParser(prog="gpu_check.py", description="see the module docstring")
    parser.add_argument("--out", default="", help="where runs go (default: a temporary directory, removed after)")
    parser.add_argument("--only", default="", help="comma-separated check names (default: all)")
    parser.add_argument("--mfu_target", type=float, default=0.40)
    args = parser.parse_args(argv)
    names = [name for name, _ in CHECKS]
    only = [name for name in args.only.split(",") if name]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ConfigError(f"--only: unknown checks {unknown} (there are {', '.join(names)})")
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False, so there is nothing to check here")
        return 0
    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    print(f"{torch.cuda.get_device_name(device)} x {torch.cuda.device_count()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        context = {"device": device, "out": Path(args.out or tmp), "mfu_target": args.mfu_target}
        context["out"].mkdir(parents=True, exist_ok=True)
        results = run_checks([(n, c) for n, c in CHECKS if not only or n in only], context)
    failed = [name for status, name, _ in results if status == "FAIL"]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed or skipped" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main_guard(lambda: main(sys.argv[1:])))
