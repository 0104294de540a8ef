"""Training machinery shared by pretrain.py and finetune.py: torchrun set-up, mixed precision, the optimizer and
learning-rate schedule, atomic checkpoints, the run directory, logging (log.jsonl, optional TensorBoard and W&B
trackers) and the training loop (nanoGPT's train.py, factored once). The config itself is in config.py.
"""
from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import math
import os
import pickle
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from importlib import metadata

import numpy as np
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from alignment import adapter_changes
from config import ConfigError
from model import compile_model


# ----------------------------------------------------------------------------------------------------
# Processes, devices, precision

@dataclass
class Dist:
    rank: int  # global rank of this process
    local_rank: int  # rank on this machine (picks the GPU)
    world_size: int  # number of processes
    master: bool  # rank 0: the one that prints and writes files
    device: torch.device
    is_ddp: bool  # more than one process, so a process group exists


# setup_distributed calls not yet matched by cleanup_distributed. A runner that calls several entry points in one
# process (study.py) opens the group first, so they all share it: torch names every new default group alike, and a
# second group under torchrun would find the first one's keys in torchrun's store and hang connecting to them.
_group_users = 0


# glibc's malloc returns freed blocks above its mmap threshold (128 KB at first, rising to at most 32 MB as it sees
# such blocks freed) to the system, and trims free memory beyond 128 KB off the top of its heap. A training step
# allocates its activations and gradients afresh, so on the CPU each step faulted their pages in again: zeroing a
# 16 MB word-embedding gradient took 25 ms on a 2-core machine. With the threshold at 32 MB, no trimming and the heap
# grown 256 MB at a time, freed blocks are reused: the paper config's float32 step ran 8-9% faster with the same
# peak memory (README, Performance). Blocks above 32 MB are still mapped and returned.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameter numbers (malloc.h)
CPU_MALLOC_SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 256 << 20}


def tune_cpu_allocator():
    """Apply CPU_MALLOC_SETTINGS through glibc's mallopt; True where it took every one, False elsewhere
    (another C library or platform, which keeps its own behaviour)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return False
    return mallopt is not None and all([mallopt(key, value) == 1 for key, value in CPU_MALLOC_SETTINGS.items()])


def setup_distributed(cfg):
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE, pick the device, start the process group (nccl on
    CUDA, gloo on CPU) when there is more than one process and none is open yet, and seed python/numpy/torch with seed + rank."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={cfg.device!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r}: only cpu and cuda are supported")
    if device.type == "cpu":
        tune_cpu_allocator()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device!r} but no CUDA device is available")
        torch.cuda.set_device(device)
        # Without TF32, float32 matmuls (float32 runs, and the parts autocast keeps in float32) run on CUDA cores
        # at a fraction of the tensor cores' rate; a CPU matmul ignores the setting.
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    is_ddp = world_size > 1
    global _group_users
    if is_ddp and _group_users == 0:
        if rank == 0 and os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0" \
                and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one TCPStore across restarts; the restarted group can read the dead group's
            # addresses from it and fail to connect (seen with torch 2.14: connection refused, or a hang)
            print("warning: torchrun restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment, "
                  "or a restarted group may connect to the dead one's addresses", file=sys.stderr)
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    _group_users += is_ddp
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    return Dist(rank, local_rank, world_size, rank == 0, device, is_ddp)


def cleanup_distributed():
    """Destroy the process group once the last setup_distributed that uses it is done."""
    global _group_users
    _group_users = max(0, _group_users - 1)
    if _group_users == 0 and tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_mean(values):
    """Mean over processes of a tensor or of a {name: number} dict; unchanged without a process group."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return values
    if isinstance(values, torch.Tensor):
        total = values.detach().clone()
        tdist.all_reduce(total)
        return total / tdist.get_world_size()
    names = sorted(values)  # the same order on every rank
    device = "cuda" if tdist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
    tdist.all_reduce(total)
    return dict(zip(names, (total / tdist.get_world_size()).tolist()))


def autocast_context(device, dtype):
    """The autocast context for forward passes: none for float32, torch.autocast for bfloat16/float16."""
    if dtype == "float32":
        return nullcontext()
    if dtype == "float16" and device.type == "cpu":
        raise ConfigError("dtype=float16 needs a CUDA device; use bfloat16 or float32 on cpu")
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


# ----------------------------------------------------------------------------------------------------
# Optimizer and learning rate

# Each lr_mult_* key and the module group (model.module_groups()) whose learning rate it multiplies.
LR_MULTIPLIERS = {"lr_mult_cross": "cross_modal", "lr_mult_heads": "heads"}


def lr_scales(cfg, model, command_line=()):
    """{module group: multiplier} from the lr_mult_* keys, for the groups `model` has. A key whose group the model
    lacks (a one-tower model has no cross-modal layers) is ignored when its value comes from the defaults or a
    config file, because one config often serves both model types (a task config takes the architecture from
    init_from); given on the command line (`command_line`: the keys set there), it is a ConfigError."""
    groups = model.module_groups()
    for key, group in LR_MULTIPLIERS.items():
        if group not in groups and key in command_line:
            raise ConfigError(f"{key} is set on the command line, but this {cfg.model_type} model has no "
                              f"'{group}' group (it has {', '.join(groups)})")
    return {group: getattr(cfg, key) for key, group in LR_MULTIPLIERS.items() if group in groups}


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_optimizer(model, cfg, lr_scales, verbose=True):
    """AdamW over the trainable parameters of `model.module_groups()`: per group one param group with weight
    decay (matrices) and one without (biases, norms, ndim < 2), each carrying its name and lr_scale."""
    groups = model.module_groups()
    unknown = set(lr_scales) - set(groups)
    if unknown:
        raise ValueError(f"lr_scales name groups the model does not have: {sorted(unknown)} (it has {list(groups)})")
    owner, param_groups, lines = {}, [], []
    for group_name, module in groups.items():
        decay, no_decay = [], []
        for param_name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in owner:
                raise ValueError(f"parameter {group_name}.{param_name} is also in group '{owner[id(p)]}'")
            owner[id(p)] = group_name
            (decay if p.ndim >= 2 else no_decay).append(p)
        scale = lr_scales.get(group_name, 1.0)
        for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            if params:
                param_groups.append({"params": params, "weight_decay": wd, "lr_scale": scale, "name": group_name})
        count = lambda ps: f"{len(ps)} tensors / {sum(p.numel() for p in ps):,} params"
        lines.append(f"  {group_name:<14} decayed {count(decay):<34} not decayed {count(no_decay)}")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        raise ValueError(f"trainable parameters in no module group: {missing[:5]}")
    require_trainable(model)
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        print("optimizer groups:\n" + "\n".join(lines) + f"\n  trainable {trainable:,} params, frozen {frozen:,}")
    # The fused kernel does a tensor's whole update in one pass on CPU as on CUDA: on the paper's model on two
    # CPU cores the default per-tensor loop (foreach is off by default on CPU) took about 4x as long (README,
    # Performance). Other devices keep torch's default.
    fused = param_groups[0]["params"][0].device.type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def require_trainable(model):
    """Refuse a model whose parameters are all frozen; entry points call it right after freezing, before
    they load any data."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("nothing to train: every parameter is frozen (freeze_text, freeze_vision, freeze_cross, "
                          "freeze_modules, *_trainable_top)")


def lr_at(step, cfg):
    """Learning rate for optimizer step `step` (0-based): linear warmup over warmup_steps, then linear or
    cosine decay to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.min_lr_ratio * cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.lr_decay == "cosine":
        return min_lr + (cfg.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (cfg.lr - min_lr) * (1.0 - progress)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


# ----------------------------------------------------------------------------------------------------
# Checkpoints and the run directory

CKPT_NAME = re.compile(r"ckpt_(\d+)\.pt")


def _checkpoints(out_dir):
    """Complete checkpoints in out_dir as sorted (step, path); temp files never match the name."""
    if not os.path.isdir(out_dir):
        return []
    return sorted((int(m[1]), os.path.join(out_dir, n)) for n in os.listdir(out_dir) if (m := CKPT_NAME.fullmatch(n)))


def latest_checkpoint(out_dir):
    found = _checkpoints(out_dir)
    return found[-1][1] if found else None


# The keys that decide the encoder's parameters and what its inputs mean: a fine-tuned model must have them as
# the pretrained one did. image_size is not among them (position embeddings are interpolated), nor is dropout.
ARCHITECTURE_KEYS = (
    "model_type", "text_tower", "text_pretrained", "vision_tower", "vision_pretrained", "tokenizer",
    "text_hidden_size", "text_layers", "text_heads", "text_mlp_ratio", "text_embedding_size",
    "vision_hidden_size", "vision_layers", "vision_heads", "vision_mlp_ratio", "patch_size",
    "cross_layers", "cross_hidden", "cross_heads", "cross_mlp_ratio", "cross_layer_type", "onetower_stack",
    "onetower_embeddings", "pooling", "embed_dim", "embed_pooling", "image_mean", "image_std")


def adopt_architecture(cfg, saved, source, verbose=True):
    """cfg with the architecture keys of a pretraining run's saved config (printing those that change)."""
    missing = [key for key in ARCHITECTURE_KEYS if key not in saved]
    if missing:
        raise ValueError(f"{source}: its saved config lacks architecture keys {missing}")
    changes = {key: saved[key] for key in ARCHITECTURE_KEYS if saved[key] != getattr(cfg, key)}
    changes.update(adapter_changes(cfg, saved))
    if changes and verbose:
        print(f"architecture from {source}: " + ", ".join(f"{k}={v!r}" for k, v in changes.items()))
    return replace(cfg, **changes)


def resolve_checkpoint(path, key):
    """The checkpoint file `path` names: the file itself, or the newest ckpt_<step>.pt of a run directory.
    `key` (e.g. "init_from") names the setting in the one-line error when there is none."""
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{key}={path!r}: no ckpt_<step>.pt in that directory")
        return found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}={path!r}: no such checkpoint file or run directory")
    return path


def _rng_state(device):
    """This process's RNG states in types torch.load(weights_only=True) accepts."""
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    """Restore what _rng_state saved. A run may move between machines: a checkpoint written on a CPU has no CUDA
    state (this device's CUDA generator keeps its seed from setup_distributed), and one written on a GPU resumes
    on a CPU without its CUDA state. Python, numpy and torch's CPU generator are always restored."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _named_tensors(tree, prefix):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _named_tensors(value, f"{prefix}.{key}")


def _atomic_save(obj, path):
    """torch.save into a temp file beside `path`, fsync, then rename: a crash never leaves a partial ckpt.
    (A process killed mid-save leaves its temp file, which _remove_partial_saves clears on the next start.)"""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600); a checkpoint is shared like any output
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable, not only the bytes
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


PARTIAL_SAVE = re.compile(r"\.ckpt_\d+\.pt\..*\.tmp")


def _remove_partial_saves(out_dir):
    """Delete the temp files of saves cut short by a crash; returns their names."""
    names = [n for n in os.listdir(out_dir) if PARTIAL_SAVE.fullmatch(n)] if os.path.isdir(out_dir) else []
    for name in names:
        os.remove(os.path.join(out_dir, name))
    return names


def _truncate_log(path, step):
    """Keep the log lines of steps up to `step` (the checkpoint resumed from): the steps a crashed run did
    after it are done again, so the log ends up as an uninterrupted run's. A line torn by the crash goes too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= step:
                kept.append(line)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def save_checkpoint(cfg, dist, step, model, optimizer, scaler, loader):
    """Write out_dir/ckpt_<step>.pt (model = the unwrapped module) and keep the newest keep_checkpoints. Beside
    the weights it records the towers' Hugging Face configs (tower_configs), so that a resumed run, finetune.py,
    evaluate.py and export.py rebuild the model without the towers' hub name or directory. Every rank calls it
    (each contributes its RNG state); the master writes; the others wait."""
    rng = [_rng_state(dist.device)]
    if dist.is_ddp:
        rng = [None] * dist.world_size
        tdist.all_gather_object(rng, _rng_state(dist.device))
    path = os.path.join(cfg.out_dir, f"ckpt_{step}.pt")
    if dist.master:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "config": asdict(cfg), "rng": rng, "loader": loader.state_dict()}
        if hasattr(model, "tower_configs"):  # model.FreezableModel: rebuild the towers without their source
            state["tower_configs"] = model.tower_configs()
        tensors = [*_named_tensors(state["model"], "model"), *_named_tensors(state["optimizer"]["state"], "optimizer")]
        for name, tensor in tensors:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise RuntimeError(f"refusing to save checkpoint at step {step}: {name} has non-finite values")
        _atomic_save(state, path)
        for _, old in _checkpoints(cfg.out_dir)[:-cfg.keep_checkpoints]:
            os.remove(old)
    if dist.is_ddp:
        tdist.barrier()
    return path


def read_checkpoint(path, mmap=False):
    """The checkpoint's contents, read by the weights-only loader, which never runs code stored in the file: a file
    holding anything but tensors and plain containers is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "not a checkpoint")
        raise ValueError(f"{path}: refused by the weights-only loader: {detail}") from None


def load_checkpoint(path, model, optimizer, scaler, loader):
    """Restore model, optimizer, scaler and loader from `path`; return the checkpoint (step, config, rng).
    This run's optimizer settings (lr_scale, weight decay, betas) win over the saved ones. A file holding
    anything but tensors and plain containers, or weights of another architecture, is refused in one line."""
    ckpt = read_checkpoint(path)
    check_same_architecture(path, model.state_dict(), ckpt["model"])
    model.load_state_dict(ckpt["model"])
    saved = [g["name"] for g in ckpt["optimizer"]["param_groups"]]
    current = [g["name"] for g in optimizer.param_groups]
    if saved != current:
        raise ValueError(f"{path}: optimizer groups {saved} differ from this run's {current} (freezing changed?)")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)
    scaler.load_state_dict(ckpt["scaler"])
    loader.load_state_dict(ckpt["loader"])
    return ckpt


def check_same_architecture(path, own, saved):
    """Raise a one-line ValueError listing the keys that differ between the model's state dict `own` and the
    checkpoint's `saved` (missing, unexpected, or of another shape): resuming must load every weight."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    reshaped = [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}" for k in own
                if k in saved and saved[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        shown = lambda keys: f"{keys[:10]}{f' and {len(keys) - 10} more' if len(keys) > 10 else ''}"
        raise ValueError(f"{path} is from a different architecture: missing {shown(missing)}, unexpected "
                         f"{shown(unexpected)}, other shape (checkpoint vs model) {shown(reshaped)}")


def prepare_run_dir(cfg, dist):
    """Create out_dir and write config.json (the resolved config) and run_info.json (what produced the run)."""
    if not dist.master:
        return
    os.makedirs(cfg.out_dir, exist_ok=True)
    code_dir = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            done = subprocess.run(["git", "-C", code_dir, *args], capture_output=True, text=True, check=True)
            return done.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    info = {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": [sys.executable, *sys.argv], "world_size": dist.world_size,
            "python": platform.python_version(),
            **{pkg: metadata.version(pkg) for pkg in ("torchvision", "transformers", "numpy", "pillow")},
            "torch": torch.__version__, "cuda": torch.version.cuda,  # the build tag says which CUDA wheel
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}
    for name, content in (("config.json", asdict(cfg)), ("run_info.json", info)):
        with open(os.path.join(cfg.out_dir, name), "w") as f:
            json.dump(content, f, indent=2)


class JsonlLogger:
    """Appends one JSON object per line to `path` (opened per line, so every line is on disk at once), then
    hands the record to each tracker (TensorBoard, W&B: open_trackers). log.jsonl is the source of truth."""

    def __init__(self, path, enabled=True, trackers=()):
        self.path, self.enabled, self.trackers = path, enabled, list(trackers) if enabled else []

    def log(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)

    def close(self):
        for tracker in self.trackers:
            tracker.close()


def tracked_scalars(record):
    """A log record's numbers as {"<split>/<name>": value}: train lines under train/, evaluation lines under
    their split (val/, test/, ...); lists and strings (bad_images, split) stay in log.jsonl only."""
    split = record.get("split", "train")
    return {f"{split}/{key}": float(value) for key, value in record.items()
            if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardTracker:
    """Scalars in out_dir/tensorboard. A run resumed at step s first drops the events logged after s (purge_step:
    those at s + 1 and later), as _truncate_log drops those lines of log.jsonl."""

    def __init__(self, cfg, step):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=step + 1 if step else None)

    def log(self, record):
        for tag, value in tracked_scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()  # on disk at once, like log.jsonl

    def close(self):
        self.writer.close()


class WandbTracker:
    """One W&B run per run directory: its id is kept in out_dir/wandb_id, so a resumed run continues the same
    W&B run. Offline (no network) with the environment variable WANDB_MODE=offline; `wandb sync` uploads later."""

    def __init__(self, cfg, step):
        import wandb
        id_path = os.path.join(cfg.out_dir, "wandb_id")
        if not os.path.exists(id_path):
            with open(id_path, "w") as f:
                f.write(uuid.uuid4().hex[:16])
        with open(id_path) as f:
            run_id = f.read().strip()
        self.run = wandb.init(project=cfg.wandb_project, id=run_id, resume="allow", dir=cfg.out_dir,
                              name=os.path.basename(os.path.abspath(cfg.out_dir)), config=asdict(cfg))

    def log(self, record):
        self.run.log(tracked_scalars(record), step=record["step"])

    def close(self):
        self.run.finish()


def open_trackers(cfg, step):
    """The trackers cfg.trackers names, opened for a run that starts (or resumes) at optimizer step `step`."""
    kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
    return [kinds[name](cfg, step) for name in dict.fromkeys(cfg.trackers)]


# ----------------------------------------------------------------------------------------------------
# The training loop

def _console_line(record, max_steps, eta=None):
    """`step 120/1000 | loss 2.345 | ... | lr 1.20e-04 | 45.3 samples/s | eta 0:12:34` from a log record."""
    fields = [f"step {record['step']}/{max_steps}"]
    for key, value in record.items():
        if key == "lr":
            fields.append(f"lr {value:.2e}")
        elif key == "samples_per_sec":
            fields.append(f"{value:.1f} samples/s")
        elif key == "split":
            fields.append(value)
        elif key != "step":
            fields.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(fields + ([f"eta {eta}"] if eta is not None else []))


def refuse_overwrite(cfg):
    """resume=False over a run directory with checkpoints is refused (load_config does it before any work)."""
    if not cfg.resume and latest_checkpoint(cfg.out_dir):
        raise ConfigError(f"out_dir={cfg.out_dir} already holds checkpoints and resume=False: pick a new out_dir")


def optimizer_step(optimizer, scaler, params, grad_clip, step_loss, step):
    """Unscale, clip, check and apply the accumulated gradients of optimizer step `step` (0-based); returns
    (gradient norm, whether the update was skipped). With float16's gradient scaler a non-finite gradient
    makes the scaler skip the update and lower its scale; otherwise a non-finite loss or gradient raises
    FloatingPointError before anything changes, so the last checkpoint stays the newest."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    grad_norm, loss = torch.stack([grad_norm.float(), step_loss]).tolist()  # the one host sync per step
    skipped = not math.isfinite(grad_norm)
    if not scaler.is_enabled() and (skipped or not math.isfinite(loss)):
        raise FloatingPointError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step + 1}: "
                                 f"stopping without a new checkpoint (lower lr, or check the data)")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def _skipped_images(loader, dist):
    """Log fields for the items the loader dropped for a bad image since the last log line, over all
    processes: their number and the first few distinct messages (path: reason). Empty when there were none."""
    count, examples = loader.pop_skipped()
    if dist.is_ddp:
        gathered = [None] * dist.world_size
        tdist.all_gather_object(gathered, (count, examples))
        count, examples = sum(c for c, _ in gathered), list(dict.fromkeys(m for _, ms in gathered for m in ms))
    return {"skipped_images": count, "bad_images": examples[:5]} if count else {}


def batch_generator(seed, *key):
    """A generator seeded by (seed, *key): a batch's draws (pretraining's masking, retrieval's negatives) depend
    only on where it sits in the run, so a resumed run draws exactly as an uninterrupted one, and one process or
    two draw alike for the same global micro-batch.
    blake2b, not hash(): Python salts the hash of a string ("eval") differently in every process."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % (2 ** 63))


def train(cfg, dist, model, loader, prepare_batch, evaluate=None, extra_log=None, lr_scales=None,
          find_unused_parameters=False):
    """Train `model` (forward(batch) -> {"loss": ..., other 0-dim tensors}) for cfg.max_steps optimizer steps.

    loader: iterable forever with state_dict()/load_state_dict(); when it drops items whose image is bad
    (batching.ResumableLoader), pop_skipped() feeds their count and paths to the log. prepare_batch(raw, step, micro_index)
    masks (seeded from step and the global micro-batch index) and moves to the device. evaluate(model)
    runs on every rank (in eval mode, no_grad, autocast) and returns reduced metrics. extra_log() returns
    extra fields for each training log line. lr_scales: {module group: lr multiplier}. find_unused_parameters:
    passed to DDP, for models whose steps do not all use the same parameters (the outputs a step returns may then
    differ too: each is averaged over the micro-batches that returned it).
    Freezing and gradient checkpointing are the caller's, before this call. Writes config.json and run_info.json
    once any checkpoint has loaded. Returns the last step and logs.
    """
    autocast = autocast_context(dist.device, cfg.dtype)
    accum = cfg.batch_size // (cfg.micro_batch_size * dist.world_size)
    refuse_overwrite(cfg)
    if dist.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    raw_model = model
    if cfg.compile:
        # In place, then the DDP wrap, as torch's docs advise ("Where to apply torch.compile?"): the compiled
        # forward runs inside DDP's forward, where dynamo's DDPOptimizer splits the graph at DDP's gradient-bucket
        # boundaries, so each bucket's all-reduce still overlaps the rest of backward. Compiling the DDP wrapper
        # itself is what those docs advise against. In place, the state dict keeps its keys.
        compile_model(model, cfg.compile_scope)
    eval_model = model  # not the DDP wrapper: its forward would sync buffers, so every rank would need the same batches
    if dist.is_ddp:
        model = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                    find_unused_parameters=find_unused_parameters)
    optimizer = build_optimizer(raw_model, cfg, lr_scales or {}, verbose=dist.master)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.dtype == "float16")
    ckpt_path = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    ckpt = load_checkpoint(ckpt_path, raw_model, optimizer, scaler, loader) if ckpt_path else None
    prepare_run_dir(cfg, dist)  # only now: a refused checkpoint leaves the run directory as it was
    step = ckpt["step"] if ckpt else 0
    loader_iter = iter(loader)
    if ckpt:  # after iter(): starting an iterator may draw from the global RNG
        if len(ckpt["rng"]) == dist.world_size:
            _set_rng_state(ckpt["rng"][dist.rank], dist.device)
        elif dist.master:
            print(f"note: checkpoint from {len(ckpt['rng'])} processes, now {dist.world_size}: RNG streams restart")
    if dist.master:
        for name in _remove_partial_saves(cfg.out_dir):
            print(f"removed {name}: a checkpoint save cut short by a crash")
        _truncate_log(os.path.join(cfg.out_dir, "log.jsonl"), step)
    logger = JsonlLogger(os.path.join(cfg.out_dir, "log.jsonl"), enabled=dist.master,
                         trackers=open_trackers(cfg, step) if dist.master else ())
    if dist.master:
        group_lrs = {g["name"]: cfg.lr * g["lr_scale"] for g in optimizer.param_groups}
        print(f"world size {dist.world_size} | micro batch {cfg.micro_batch_size} | accumulation {accum} | "
              f"global batch {cfg.batch_size} | peak lr {cfg.lr:.2e}")
        print("peak lr per group: " + ", ".join(f"{name} {lr:.2e}" for name, lr in group_lrs.items()))
        if ckpt:
            print(f"resumed from {ckpt_path} at step {step}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums, counts, grad_norm_sum, skipped_steps, interval_start, t0 = {}, {}, 0.0, 0, step, time.time()
    summary = {"step": step, "train": None, "val": None}
    model.train()
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        set_lr(optimizer, lr)
        step_loss = torch.zeros((), device=dist.device)
        for micro in range(accum):
            batch = prepare_batch(next(loader_iter), step, micro * dist.world_size + dist.rank)
            last_micro = micro == accum - 1
            with model.no_sync() if dist.is_ddp and not last_micro else nullcontext():  # all-reduce once per step
                with autocast:
                    out = model(batch)
                scaler.scale(out["loss"] / accum).backward()
            for name, value in out.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
                counts[name] = counts.get(name, 0) + 1
            step_loss += out["loss"].detach().float() / accum
        grad_norm, skipped = optimizer_step(optimizer, scaler, params, cfg.grad_clip, step_loss, step)
        skipped_steps += skipped
        grad_norm_sum += 0.0 if skipped else grad_norm
        step += 1
        last = step == cfg.max_steps
        log_now = step % cfg.log_interval == 0 or last
        summary["step"] = step

        if log_now:
            steps, seconds = step - interval_start, time.time() - t0
            means = {name: (total / counts[name]).item() for name, total in sums.items()}
            means["grad_norm"] = grad_norm_sum / max(1, steps - skipped_steps)
            record = {"step": step, **all_reduce_mean(means), "lr": lr,
                      "samples_per_sec": steps * cfg.batch_size / seconds}
            if scaler.is_enabled():
                record["skipped_steps"] = skipped_steps
            if hasattr(loader, "pop_skipped"):  # batching.ResumableLoader drops items whose image is bad
                record.update(_skipped_images(loader, dist))
            record.update(extra_log() if extra_log else {})
            if dist.master:
                eta = datetime.timedelta(seconds=round(seconds / steps * (cfg.max_steps - step)))
                print(_console_line(record, cfg.max_steps, eta))
            logger.log(record)
            summary["train"] = record
        if evaluate is not None and (step % cfg.eval_interval == 0 or last):
            model.eval()
            with torch.no_grad(), autocast:
                metrics = {name: float(value) for name, value in evaluate(eval_model).items()}
            model.train()
            record = {"step": step, "split": "val", **metrics}
            if dist.master:
                print(_console_line(record, cfg.max_steps))
            logger.log(record)
            summary["val"] = metrics
        if step % cfg.ckpt_interval == 0 or last:  # after evaluation, so a resumed run continues its RNG streams
            save_checkpoint(cfg, dist, step, raw_model, optimizer, scaler, loader)
        if log_now:  # the next interval's clock starts after evaluation and saving
            sums, counts, grad_norm_sum, skipped_steps, interval_start, t0 = {}, {}, 0.0, 0, step, time.time()
    logger.close()
    return summary
