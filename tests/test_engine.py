"""config.py and engine.py: config loading, lr schedule, optimizer groups, checkpoints and the training loop, on a tiny
regression model with a fake resumable loader (CPU, float32)."""
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
import processes
from config import Config, ConfigError, KEY_TYPES, config_reference, load_config, validate

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Config

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_precedence_defaults_file_command_line(tmp_path):
    config = write(tmp_path / "run.py", "lr = 3e-4\nbatch_size = 64\nmicro_batch_size = 8\n")
    cfg = load_config([config, "--lr=1e-3"])
    assert (cfg.lr, cfg.batch_size, cfg.micro_batch_size) == (1e-3, 64, 8)
    assert cfg.seed == Config().seed
    assert load_config([]) == Config()


def test_include_chain_relative_to_including_file(tmp_path):
    write(tmp_path / "base.py", "import math\nlr = 2e-4\nmicro_batch_size = 8\nfreeze_text = True\n")
    write(tmp_path / "freeze" / "vision.py", 'include("../base.py")\nfreeze_vision = True\n')
    top = write(tmp_path / "freeze" / "both_fast.py", 'include("vision.py")\nlr = lr * 2\n')
    cfg = load_config([top])
    assert (cfg.lr, cfg.micro_batch_size, cfg.freeze_text, cfg.freeze_vision) == (4e-4, 8, True, True)


def test_include_cycle_is_an_error(tmp_path):
    a = write(tmp_path / "a.py", 'include("b.py")\n')
    write(tmp_path / "b.py", 'include("a.py")\n')
    with pytest.raises(ConfigError, match="include cycle"):
        load_config([a])


def test_command_line_values_are_parsed_by_type():
    cfg = load_config(["--corpora=coco,cc3m", "--betas=0.9,0.95", "--resume=false", "--compile=1",
                              "--max_steps=10", "--lr=1", "--out_dir=123", "--freeze_modules=", "--warmup_steps=0",
                              "--image_mean=(0.4, 0.5, 0.6)"])
    assert cfg.corpora == ["coco", "cc3m"] and cfg.betas == (0.9, 0.95)
    assert cfg.resume is False and cfg.compile is True
    assert cfg.max_steps == 10 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.out_dir == "123" and cfg.freeze_modules == [] and cfg.image_mean == (0.4, 0.5, 0.6)


def test_unknown_key_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"command line: unknown config key 'max_step' \(did you mean 'max_steps'\?\)"):
        load_config(["--max_step=5"])
    config = write(tmp_path / "typo.py", "lrr = 1e-4\n")
    with pytest.raises(ConfigError, match=r"typo.py: unknown config key 'lrr' \(did you mean 'lr'\?\)"):
        load_config([config])


@pytest.mark.parametrize("arg, pattern", [
    ("--lr=abc", "'lr' expects float, got 'abc'"),
    ("--resume=yes", "'resume' expects bool, got 'yes'"),
    ("--max_steps=1.5", "'max_steps' expects int, got 1.5"),
    ("--image_mean=0.5,0.5", r"'image_mean' expects tuple\[float, float, float\]"),
])
def test_wrong_type_on_the_command_line_is_named(arg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config([arg])


def test_wrong_type_in_a_file_names_file_and_key(tmp_path):
    config = write(tmp_path / "bad.py", "resume = 'yes'\n")
    with pytest.raises(ConfigError, match=r"bad.py: config key 'resume' expects bool"):
        load_config([config])


def test_bad_config_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.py"):
        load_config([str(tmp_path / "missing.py")])
    syntax = write(tmp_path / "syntax.py", "lr = 1e-4\nbatch_size = = 3\n")
    with pytest.raises(ConfigError, match=r"syntax.py, line 2: syntax error"):
        load_config([syntax])
    raising = write(tmp_path / "raising.py", "lr = 1e-4\n\nseed = undefined_name\n")
    with pytest.raises(ConfigError, match=r"raising.py, line 3: NameError"):
        load_config([raising])
    with pytest.raises(ConfigError, match="expected --key=value, got 'lr'"):
        load_config(["--seed=1", "lr"])


def test_main_guard_prints_one_line_and_exits_2():
    script = "import sys; from config import load_config, main_guard; main_guard(lambda: load_config(sys.argv[1:]))"
    result = processes.run([sys.executable, "-c", script, "--lrr=1"], timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: command line: unknown config key 'lrr' (did you mean 'lr'?)"]


def test_validate_rejects_impossible_settings():
    with pytest.raises(ConfigError, match="batch_size=100 is not divisible by micro_batch_size=32 x world_size"):
        validate(Config(batch_size=100), world_size=1)
    validate(Config(batch_size=64, micro_batch_size=32), world_size=2)
    with pytest.raises(ConfigError, match="world_size=4"):
        validate(Config(batch_size=64, micro_batch_size=32), world_size=4)
    with pytest.raises(ConfigError, match="dtype='fp16' is not one of"):
        load_config(["--dtype=fp16"])
    with pytest.raises(ConfigError, match="lr_decay='step'"):
        load_config(["--lr_decay=step"])
    validate(Config(), world_size=2)  # the paper's 704 = 32 x 11 x 2


def test_config_reference_documents_every_key():
    table = config_reference()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(KEY_TYPES)
    assert all(row.rstrip(" |").split("|")[-1].strip() for row in rows)  # every key has a comment


# ----------------------------------------------------------------------------------------------------
# Learning rate and optimizer

def test_lr_schedule_warmup_then_linear_or_cosine_decay():
    cfg = Config(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert engine.lr_at(0, cfg) == pytest.approx(0.1)
    assert engine.lr_at(4, cfg) == pytest.approx(0.5)
    assert engine.lr_at(9, cfg) == pytest.approx(1.0)
    assert engine.lr_at(10, cfg) == pytest.approx(1.0)
    assert engine.lr_at(35, cfg) == pytest.approx(1.0 - 0.25 * 0.9)
    assert engine.lr_at(110, cfg) == pytest.approx(0.1)
    cfg.lr_decay = "cosine"
    assert engine.lr_at(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert engine.lr_at(60, cfg) == pytest.approx(0.55)
    assert engine.lr_at(110, cfg) == pytest.approx(0.1)


class Grouped(nn.Module):
    """Three module groups, one of them frozen; biases and a LayerNorm need no weight decay."""

    def __init__(self):
        super().__init__()
        self.tower = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.cross = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.tower.requires_grad_(False)

    def module_groups(self):
        return {"tower": self.tower, "cross": self.cross, "head": self.head}


def test_optimizer_groups_decay_frozen_and_lr_scale():
    model = Grouped()
    model.tower[1].requires_grad_(True)  # a trainable LayerNorm in an otherwise frozen group
    optimizer = engine.build_optimizer(model, Config(weight_decay=0.05), {"head": 5.0}, verbose=False)
    groups = [(g["name"], g["weight_decay"], g["lr_scale"], [tuple(p.shape) for p in g["params"]])
              for g in optimizer.param_groups]
    assert groups == [("tower", 0.0, 1.0, [(8,), (8,)]),
                      ("cross", 0.05, 1.0, [(8, 8)]), ("cross", 0.0, 1.0, [(8,)]),
                      ("head", 0.05, 5.0, [(2, 8)]), ("head", 0.0, 5.0, [(2,)])]
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    engine.set_lr(optimizer, 0.01)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.01, 0.01, 0.05, 0.05]


def test_fused_optimizer_on_cpu_steps_as_the_per_tensor_loop():
    """build_optimizer's fused AdamW (one kernel a tensor, on CPU too) moves every parameter as torch's plain
    per-tensor AdamW with the same groups, lr scales, weight decay and schedule does."""
    models = [Grouped(), Grouped()]
    models[1].load_state_dict(models[0].state_dict())
    cfg = Config(weight_decay=0.05, lr=1e-2)
    fused = engine.build_optimizer(models[0], cfg, {"head": 5.0}, verbose=False)
    assert fused.defaults["fused"]
    twin = dict(models[1].named_parameters())
    loop = torch.optim.AdamW([{"params": [twin[n] for n in names], "weight_decay": g["weight_decay"],
                               "lr_scale": g["lr_scale"]}
                              for g, names in zip(fused.param_groups, group_names(models[0], fused))],
                             lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    assert not loop.defaults["fused"]
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(3, 4, generator=g)
        for model, optimizer in zip(models, (fused, loop)):
            engine.set_lr(optimizer, cfg.lr * (step + 1) / 4)
            model.head(model.cross(model.tower(x))).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(models[0].head.weight, Grouped().head.weight)


def group_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def test_optimizer_refuses_ungrouped_shared_or_nothing_trainable():
    model = Grouped()
    model.module_groups = lambda: {"cross": model.cross}
    with pytest.raises(ValueError, match="in no module group: \\['head.weight', 'head.bias'\\]"):
        engine.build_optimizer(model, Config(), {}, verbose=False)
    model.module_groups = lambda: {"cross": model.cross, "head": model.head, "again": model.cross}
    with pytest.raises(ValueError, match="again.weight is also in group 'cross'"):
        engine.build_optimizer(model, Config(), {}, verbose=False)
    model = Grouped()
    with pytest.raises(ValueError, match="groups the model does not have: \\['heads'\\]"):
        engine.build_optimizer(model, Config(), {"heads": 5.0}, verbose=False)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        engine.build_optimizer(model, Config(), {}, verbose=False)


# ----------------------------------------------------------------------------------------------------
# Checkpoints and run directory

class TinyRegressor(nn.Module):
    """y = f(x) with a LayerNorm and optional dropout; returns a loss dict like the real models."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(dropout))
        self.head = nn.Linear(16, 1)

    def module_groups(self):
        return {"body": self.body, "head": self.head}

    def forward(self, batch):
        prediction = self.head(self.body(batch["x"])).squeeze(-1)  # (B,)
        mse = F.mse_loss(prediction, batch["y"])
        return {"loss": mse, "mse_loss": mse, "abs_err": (prediction - batch["y"]).abs().mean()}


class FakeLoader:
    """Stands in for batching.ResumableLoader: global micro-batch j is rows [j*m, (j+1)*m) of a fixed set
    (cycled); the process of rank r takes j = k * world + r, k = 0, 1, ..."""

    def __init__(self, micro_batch_size, rank=0, world_size=1, rows=48):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(rows, 4, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.5
        self.micro, self.rank, self.world = micro_batch_size, rank, world_size
        self.batches_done = 0

    def __iter__(self):
        while True:
            j = self.batches_done * self.world + self.rank
            index = torch.arange(j * self.micro, (j + 1) * self.micro) % len(self.x)
            self.batches_done += 1
            yield {"x": self.x[index], "y": self.y[index]}

    def state_dict(self):
        return {"batches_done": self.batches_done}

    def load_state_dict(self, state):
        self.batches_done = state["batches_done"]


def prepare_batch(raw, step, micro_index):
    """Input noise seeded by (step, global micro-batch index), as masking is: wrong indices change results."""
    generator = torch.Generator().manual_seed(1000 * step + micro_index)
    return {"x": raw["x"] + 0.05 * torch.randn(raw["x"].shape, generator=generator), "y": raw["y"]}


def tiny_config(out_dir, **overrides):
    return Config(**{**dict(out_dir=str(out_dir), device="cpu", batch_size=8, micro_batch_size=4,
                                   max_steps=8, lr=3e-2, warmup_steps=2, log_interval=2, eval_interval=4,
                                   ckpt_interval=4, weight_decay=0.0), **overrides})


def single_process():
    return engine.Dist(rank=0, local_rank=0, world_size=1, master=True, device=torch.device("cpu"), is_ddp=False)


def checkpoint_parts(cfg, model):
    optimizer = engine.build_optimizer(model, cfg, {}, verbose=False)
    return optimizer, torch.amp.GradScaler("cpu", enabled=False), FakeLoader(4)


def test_checkpoints_are_atomic_pruned_and_weights_only(tmp_path):
    cfg = tiny_config(tmp_path, keep_checkpoints=2)
    model = TinyRegressor()
    optimizer, scaler, loader = checkpoint_parts(cfg, model)
    for step in (3, 6, 9):
        engine.save_checkpoint(cfg, single_process(), step, model, optimizer, scaler, loader)
    (tmp_path / ".ckpt_12.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # a save cut short
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_6.pt", "ckpt_9.pt"]
    assert engine.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt_9.pt")
    ckpt = torch.load(tmp_path / "ckpt_9.pt", weights_only=True)
    assert ckpt["step"] == 9 and Config(**ckpt["config"]) == cfg
    assert set(ckpt) == {"model", "optimizer", "scaler", "step", "config", "rng", "loader"}
    assert engine.latest_checkpoint(str(tmp_path / "nowhere")) is None


def test_resume_keeps_this_runs_optimizer_settings_and_checks_groups(tmp_path):
    cfg = tiny_config(tmp_path)
    model = TinyRegressor()
    optimizer = engine.build_optimizer(model, cfg, {"head": 2.0}, verbose=False)
    scaler, loader = torch.amp.GradScaler("cpu", enabled=False), FakeLoader(4)
    loader.batches_done = 6
    path = engine.save_checkpoint(cfg, single_process(), 3, model, optimizer, scaler, loader)
    optimizer = engine.build_optimizer(model, Config(weight_decay=0.1), {"head": 3.0}, verbose=False)
    loader = FakeLoader(4)
    assert engine.load_checkpoint(path, model, optimizer, scaler, loader)["step"] == 3
    assert [(g["lr_scale"], g["weight_decay"]) for g in optimizer.param_groups] == [(1.0, 0.1), (1.0, 0.0),
                                                                                   (3.0, 0.1), (3.0, 0.0)]
    assert loader.batches_done == 6
    model.head.requires_grad_(False)
    optimizer = engine.build_optimizer(model, cfg, {}, verbose=False)
    with pytest.raises(ValueError, match=r"optimizer groups .* differ from this run's \['body', 'body'\]"):
        engine.load_checkpoint(path, model, optimizer, scaler, loader)


def test_checkpoint_with_nan_is_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    model = TinyRegressor()
    optimizer, scaler, loader = checkpoint_parts(cfg, model)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="refusing to save checkpoint at step 5: model.head.weight"):
        engine.save_checkpoint(cfg, single_process(), 5, model, optimizer, scaler, loader)
    assert os.listdir(tmp_path) == []


def test_run_dir_records_config_and_versions(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    engine.prepare_run_dir(cfg, single_process())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config == json.loads(json.dumps(dataclasses.asdict(cfg)))
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["torch"] == torch.__version__ and info["world_size"] == 1
    assert {"git_commit", "command", "world_size", "python", "transformers", "pillow", "time"} <= set(info)


# ----------------------------------------------------------------------------------------------------
# The training loop

def run_tiny(out_dir, world_size=1, rank=0, dropout=0.0, fail_at_step=None, **overrides):
    """Train TinyRegressor with the fake loader; returns the summary. fail_at_step simulates a crash."""
    cfg = tiny_config(out_dir, **overrides)
    dist = engine.setup_distributed(cfg) if world_size > 1 else single_process()
    torch.manual_seed(cfg.seed + dist.rank)
    model = TinyRegressor(dropout)
    loader = FakeLoader(cfg.micro_batch_size, dist.rank, dist.world_size)
    eval_batch = {"x": loader.x[:16], "y": loader.y[:16]}

    def prepare(raw, step, micro_index):
        if step == fail_at_step:
            raise KeyboardInterrupt
        return prepare_batch(raw, step, micro_index)

    def evaluate(model):
        return {"val_mse": model(eval_batch)["mse_loss"].item()}

    return engine.train(cfg, dist, model, loader, prepare, evaluate, lr_scales={"head": 2.0})


def read_log(out_dir, drop=("samples_per_sec",)):
    lines = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in drop} for line in lines]


def test_loop_lowers_the_loss_and_logs(tmp_path, capsys):
    summary = run_tiny(tmp_path, max_steps=30, log_interval=5, eval_interval=15, ckpt_interval=10)
    log = read_log(tmp_path, drop=())
    train_lines = [line for line in log if "split" not in line]
    assert [line["step"] for line in train_lines] == [5, 10, 15, 20, 25, 30]
    assert set(train_lines[0]) == {"step", "loss", "mse_loss", "abs_err", "grad_norm", "lr", "samples_per_sec"}
    assert train_lines[-1]["loss"] < 0.2 * train_lines[0]["loss"]
    assert [line for line in log if "split" in line][-1] == {"step": 30, "split": "val", **summary["val"]}
    assert summary["step"] == 30
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_20.pt", "ckpt_30.pt"]
    console = capsys.readouterr().out
    assert "accumulation 2 | global batch 8" in console and "head 6.00e-02" in console
    assert "step 30/30 | loss " in console and " samples/s | eta 0:00:00" in console


def test_resume_is_bit_identical(tmp_path):
    run_tiny(tmp_path / "straight", dropout=0.2)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path / "resumed", dropout=0.2, fail_at_step=5)  # dies after the step-4 checkpoint
    assert engine.latest_checkpoint(str(tmp_path / "resumed")).endswith("ckpt_4.pt")
    run_tiny(tmp_path / "resumed", dropout=0.2, seed=7)  # another init: the checkpoint must overwrite it
    straight = torch.load(tmp_path / "straight" / "ckpt_8.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "ckpt_8.pt", weights_only=True)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert read_log(tmp_path / "straight") == read_log(tmp_path / "resumed")


def test_resume_moves_between_cpu_and_gpu(tmp_path, monkeypatch):
    """A checkpoint written on a GPU (its RNG state has a CUDA entry) resumes exactly on a CPU, and one written on
    a CPU (no CUDA entry) restores on a GPU everything it has and leaves the CUDA generator alone; with a CUDA
    entry the GPU gets it back. (CUDA's set_rng_state is recorded, not run: there is no GPU here.)"""
    run_tiny(tmp_path / "straight", dropout=0.2)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path / "moved", dropout=0.2, fail_at_step=5)
    path = tmp_path / "moved" / "ckpt_4.pt"
    ckpt = torch.load(path, weights_only=True)
    cpu_written = ckpt["rng"][0]
    gpu_state = torch.arange(16, dtype=torch.uint8)
    ckpt["rng"][0] = {**cpu_written, "cuda": gpu_state}
    torch.save(ckpt, path)
    run_tiny(tmp_path / "moved", dropout=0.2)  # GPU -> CPU
    straight = torch.load(tmp_path / "straight" / "ckpt_8.pt", weights_only=True)
    moved = torch.load(tmp_path / "moved" / "ckpt_8.pt", weights_only=True)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, moved["model"][name]), name

    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    torch.manual_seed(123)
    engine._set_rng_state(cpu_written, torch.device("cuda:0"))  # CPU -> GPU
    assert torch.equal(torch.get_rng_state(), cpu_written["torch"]) and restored == []
    engine._set_rng_state(ckpt["rng"][0], torch.device("cuda:0"))  # GPU -> GPU
    assert len(restored) == 1 and torch.equal(restored[0][0], gpu_state) and restored[0][1] == torch.device("cuda:0")


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("device, precision, expected", [("cuda", "high", "high"), ("cuda", "highest", "highest"),
                                                         ("cpu", "high", "highest")])
def test_float32_matmul_precision_is_set_on_cuda_only(tmp_path, monkeypatch, matmul_precision, device, precision,
                                                      expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # stands in for a GPU machine
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    torch.set_float32_matmul_precision("highest")
    dist = engine.setup_distributed(tiny_config(tmp_path, device=device, matmul_precision=precision))
    assert dist.device.type == device and torch.get_float32_matmul_precision() == expected
    assert Config().matmul_precision == "high"


MALLINFO_SCRIPT = """
import ctypes, sys, torch, engine
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo = ctypes.CDLL(None).mallinfo2
mallinfo.restype = Info
if sys.argv[1] == "tuned":
    assert engine.tune_cpu_allocator()
before = mallinfo()
block = torch.ones(30 << 18)  # 30 MB
during = mallinfo()
del block
print(during.hblks - before.hblks, mallinfo().fordblks >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_cpu_allocator_keeps_freed_blocks(tmp_path, monkeypatch):
    """glibc maps a fresh 30 MB block on its own and unmaps it when freed (so the next one faults its pages in
    again); with engine.CPU_MALLOC_SETTINGS it comes from the heap and stays there, free for the next block. And
    setup_distributed applies the settings on the CPU."""
    script = write(tmp_path / "mallinfo.py", MALLINFO_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    found = {}
    for mode in ("default", "tuned"):
        result = processes.run([sys.executable, str(script), mode], timeout=120, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        found[mode] = [int(n) for n in result.stdout.split()[-2:]]  # (blocks mapped on their own, free MB kept)
    assert found["default"][0] == 1 and found["tuned"][0] == 0 and found["tuned"][1] >= 30, found
    calls = []
    monkeypatch.setattr(engine, "tune_cpu_allocator", lambda: calls.append(1))
    engine.setup_distributed(tiny_config(tmp_path, device="cpu"))
    assert calls == [1]


def test_refuses_to_restart_over_checkpoints_without_resume(tmp_path):
    run_tiny(tmp_path, max_steps=4)
    with pytest.raises(ConfigError, match="already holds checkpoints and resume=False"):
        run_tiny(tmp_path, max_steps=4, resume=False)


DDP_SCRIPT = """
import sys, test_engine
test_engine.run_tiny(sys.argv[1], world_size=2, micro_batch_size=4, batch_size=16)
"""


def test_accumulation_matches_two_processes(tmp_path):
    """1 process x 4 micro-steps == 2 gloo processes x 2 micro-steps (so no_sync is on the path too)."""
    run_tiny(tmp_path / "one", micro_batch_size=4, batch_size=16)
    script = write(tmp_path / "ddp.py", DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    result = processes.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            script, str(tmp_path / "two")], timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2 | micro batch 4 | accumulation 2 | global batch 16" in result.stdout
    one = torch.load(tmp_path / "one" / "ckpt_8.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "ckpt_8.pt", weights_only=True)
    for name, tensor in one["model"].items():
        torch.testing.assert_close(tensor, two["model"][name], rtol=1e-5, atol=1e-6)
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [line["step"] for line in log_one] == [line["step"] for line in log_two]
    for a, b in zip(log_one, log_two):
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] if isinstance(a[k], str) else a[k] == pytest.approx(b[k], rel=1e-5) for k in a)


def test_float16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="float16 needs a CUDA device"):
        run_tiny(tmp_path, dtype="float16")
    assert not (tmp_path / "log.jsonl").exists()


def test_non_finite_loss_stops_without_a_new_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, ckpt_interval=2)
    model, loader = TinyRegressor(), FakeLoader(cfg.micro_batch_size)

    def poisoned(raw, step, micro_index):
        batch = prepare_batch(raw, step, micro_index)
        if step == 2:  # the third optimizer step
            batch["y"] = batch["y"] * float("nan")
        return batch

    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 3: stopping without a new checkpoint"):
        engine.train(cfg, single_process(), model, loader, poisoned)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_2.pt"]
