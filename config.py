"""The config: every key with its default and meaning (Config), config files (Python assignments, with
include("other.py")) and --key=value overrides read into one Config, validated before any work; main_guard, which
turns bad input into one line and exit status 2. `python config.py` prints the config reference table for the
README.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import os
import re
import sys
import traceback
import typing
from dataclasses import asdict, dataclass, field

from alignment import ALIGN_KINDS

# ----------------------------------------------------------------------------------------------------
# Config

@dataclass
class Config:
    # run
    out_dir: str = "out/run"  # run directory: config.json, run_info.json, log.jsonl, checkpoints
    seed: int = 1337  # base random seed; each process adds its rank
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK if available, else cpu), "cpu", "cuda" or "cuda:N"
    dtype: str = "float32"  # "float32", "bfloat16" or "float16" (autocast; float16 adds a gradient scaler)
    resume: bool = True  # continue from the newest checkpoint in out_dir when there is one
    compile: bool = False  # torch.compile the model in place, then wrap it in DDP (torch's advice); pretraining pads captions to max_text_len
    compile_scope: str = "model"  # with compile: "model" (the whole model) or "cross_modal" (each two-tower cross-modal layer alone: the towers stay eager, compiling takes a fraction of the time)
    matmul_precision: str = "high"  # CUDA float32 matmuls: "high" (TF32 tensor cores), "medium" (bf16) or "highest" (exact fp32); no effect on CPU
    # model
    model_type: str = "two_tower"  # "two_tower" (two towers + cross-modal layers), "one_tower" (one joint stack) or "dual_encoder" (two towers, no fusion, contrastive)
    text_tower: str = "google/electra-small-discriminator"  # hub name, directory, or family (bert, electra, roberta): random init
    text_pretrained: bool = True  # load the text tower's pretrained weights; False = random init of the same shape
    vision_tower: str = "facebook/deit-tiny-patch16-224"  # hub name, directory, or family (vit, deit, beit): random init
    vision_pretrained: bool = True  # load the vision tower's pretrained weights; False = random init of the same shape
    random_init_towers: bool = False  # build hub-named towers offline from random init at the hub models' exact sizes, vocabulary included (towers.HUB_TOWERS)
    tokenizer: str = ""  # "" = the text tower's tokenizer; a hub name or directory; or "synthetic" (grammar vocabulary)
    text_hidden_size: int = -1  # random init: text hidden size (-1 keeps the tower's own)
    text_layers: int = -1  # random init: text layers (-1 keeps the tower's own)
    text_heads: int = -1  # random init: text attention heads (-1 keeps the tower's own)
    text_mlp_ratio: float = -1.0  # random init: text MLP width / hidden size (-1 keeps the tower's own)
    text_embedding_size: int = -1  # random init: text embedding size, ELECTRA-style (-1 keeps the tower's own)
    text_dropout: float = -1.0  # text dropout rate (-1 keeps the tower's own)
    vision_hidden_size: int = -1  # random init: vision hidden size (-1 keeps the tower's own)
    vision_layers: int = -1  # random init: vision layers (-1 keeps the tower's own)
    vision_heads: int = -1  # random init: vision attention heads (-1 keeps the tower's own)
    vision_mlp_ratio: float = -1.0  # random init: vision MLP width / hidden size (-1 keeps the tower's own)
    vision_dropout: float = -1.0  # vision dropout rate (-1 keeps the tower's own)
    patch_size: int = -1  # image patch size in pixels (-1 keeps the tower's own)
    cross_layers: int = 6  # two-tower: cross-modal layers (each has a text and an image stream)
    cross_hidden: int = 256  # two-tower: cross-modal hidden size
    cross_heads: int = 4  # two-tower: cross-modal attention heads
    cross_mlp_ratio: float = 4.0  # two-tower: cross-modal MLP width / hidden size
    cross_dropout: float = 0.1  # two-tower: cross-modal dropout rate
    cross_layer_type: str = "meter"  # two-tower: "lxmert" (the paper's: cross-attention shared by both streams, then self-attention, FFN; post-LN) or "meter" (per-stream self-attention, cross-attention, FFN; pre-LN)
    onetower_stack: str = "text"  # one-tower: take the encoder stack from the "text" or the "vision" tower
    onetower_embeddings: str = "tower"  # one-tower: "tower" reuses the stack model's embeddings for its modality; "fresh" (the paper's) builds new random word and patch embeddings and reuses only the layers
    init_new_modules: str = "torch"  # modules added to the towers (projections, type embeddings, cross-modal layers, poolers, heads): "torch" (PyTorch's defaults) or "bert" (the original's: N(0, 0.02), zero biases, LayerNorm 1 and 0)
    pooling: str = "double"  # one-tower: "double" (text CLS + image CLS) or "single" (first CLS only)
    embed_dim: int = 256  # dual encoder and ITC: width of the shared image-text embedding space
    embed_pooling: str = "cls"  # dual encoder and ITC: each side's "cls" feature or the "mean" over its real positions
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # freezing
    freeze_text: bool = False  # freeze the whole text tower
    freeze_vision: bool = False  # freeze the whole vision tower
    freeze_cross: bool = False  # freeze the cross-modal layers
    freeze_modules: list[str] = field(default_factory=list)  # further modules to freeze, by dotted name
    text_trainable_top: int = -1  # train only the top k text layers (-1 = all)
    vision_trainable_top: int = -1  # train only the top k vision layers (-1 = all)
    frozen_dropout: bool = False  # keep dropout on in frozen modules during training (the original's behaviour; default: frozen modules run in eval mode)
    text_align: list[str] = field(default_factory=list)  # parameter-efficient alignment: these train in the text tower even where it is frozen: any of "layernorm", "bias", "adapter" (adds adapters)
    vision_align: list[str] = field(default_factory=list)  # the same for the vision tower (one-tower: the key of onetower_stack)
    adapter_reduction: int = 8  # adapters: bottleneck width = the tower's hidden size / this
    # data
    data_root: str = "data"  # root of the raw dataset folders
    corpora: list[str] = field(default_factory=lambda: ["coco", "vg"])  # any of coco, coco_official, vg, cc3m, sbu, synthetic
    coco_dir: str = ""  # COCO folder ("" = data_root/coco)
    vg_dir: str = ""  # Visual Genome folder ("" = data_root/vg)
    cc3m_dir: str = ""  # Conceptual Captions folder ("" = data_root/cc3m)
    sbu_dir: str = ""  # SBU folder ("" = data_root/sbu)
    synthetic_images: int = 2000  # pictures in the synthetic world
    synthetic_seed: int = 0  # seed of the synthetic world (separate from seed, so training seeds share one world)
    synthetic_image_size: int = 64  # side in pixels of the rendered synthetic pictures
    text_corpora: list[str] = field(default_factory=list)  # text-only corpora: .txt / .txt.gz files or folders of them (relative paths under data_root), or "synthetic"
    synthetic_text_lines: int = 10000  # lines of the synthetic text corpus (several clauses each, from the world's grammar)
    image_size: int = 224  # image side in pixels after the transform
    image_resize: str = "squash"  # "squash": resize to image_size x image_size; "crop" (the original's): shorter side to image_size, bicubic, then centre crop
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation mean
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation standard deviation
    augment: bool = False  # random resized crop of training images (no flip: it would falsify "left of" captions)
    max_text_len: int = 40  # longest caption in tokens, special tokens included
    num_workers: int = 2  # DataLoader worker processes per training process
    strict_images: bool = False  # stop at the first missing or unreadable image (default: skip it, count it, log it)
    # pretraining tasks
    mlm_prob: float = 0.15  # fraction of word pieces masked for MLM
    whole_word_mask: bool = False  # mask all pieces of a chosen word together
    itm_neg_prob: float = 0.5  # fraction of ITM pairs given a mismatched image
    mlm_weight: float = 1.0  # weight of the MLM loss in the total (0 turns MLM off)
    itm_weight: float = 1.0  # weight of the ITM loss in the total (0 turns ITM off)
    itc_weight: float = 0.0  # weight of the image-text contrastive loss, ITC (a dual encoder trains by it alone)
    itm_hard_negatives: bool = False  # ITM negatives drawn by ITC similarity over the global batch, not uniformly (needs itc_weight > 0)
    pretrain_pass: str = "separate"  # "separate": MLM and ITM each run the text tower and cross-modal layers (the paper's recipe); "shared": one pass serves both, MLM on matched pairs only (37% fewer FLOPs for the paper model)
    text_only_fraction: float = 0.0  # fraction of max_steps trained on text_corpora alone (MLM) before image-text data starts
    image_text_share: float = 1.0  # after that, the share of optimizer steps on image-text data; the rest are text-only
    save_text_tower: str = ""  # two-tower: at the end of the run, save the text tower and tokenizer here as a Hugging Face directory (a later text_tower)
    vision_feature_cache: str = ""  # directory for the frozen vision tower's output, computed once per picture (needs freeze_vision, augment=False, coco/vg/synthetic corpora); "" = off
    # optimisation
    batch_size: int = 704  # GLOBAL batch per optimizer step, over all processes and accumulation steps
    micro_batch_size: int = 32  # samples per process per forward pass
    max_steps: int = 100000  # optimizer steps in the run
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay on matrices (none on biases and norms)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 10000  # optimizer steps of linear warmup
    lr_decay: str = "linear"  # decay after warmup: "linear" or "cosine"
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of lr
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = no clipping)
    lr_mult_cross: float = 5.0  # learning-rate multiplier of the cross-modal layers (two-tower only: a one-tower run refuses it on the command line)
    lr_mult_heads: float = 5.0  # learning-rate multiplier of the task heads
    # logging and checkpoints
    log_interval: int = 10  # optimizer steps between training log lines
    eval_interval: int = 1000  # optimizer steps between evaluations
    eval_batches: int = 50  # validation batches per evaluation
    ckpt_interval: int = 1000  # optimizer steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept in out_dir
    trackers: list[str] = field(default_factory=list)  # also send the log lines to any of "tensorboard" (out_dir/tensorboard), "wandb"; log.jsonl is always written
    wandb_project: str = "vlenc"  # W&B project of the run (no network: WANDB_MODE=offline)
    # fine-tuning and evaluation
    task: str = ""  # finetune.py / evaluate.py task: nlvr2, snli_ve, refcoco(_plus, g), coco_retrieval, f30k_retrieval, vqa, a GLUE task, cifar10
    synthetic_task: bool = False  # read the task's synthetic version, generated in the official layout under data_root/synthetic
    init_from: str = ""  # pretraining checkpoint or run directory (its newest); the architecture keys come from it; "" = from scratch
    task_dir: str = ""  # the task's folder ("" = data_root/ nlvr2, snli_ve, refcoco, refcoco+, refcocog, vqa, glue_data, cifar-10-batches-py)
    f30k_dir: str = ""  # Flickr30k folder ("" = data_root/f30k): SNLI-VE images and Flickr30k retrieval
    train_splits: list[str] = field(default_factory=list)  # splits fine-tuned on ([] = the task's usual ones)
    val_split: str = ""  # split validated on during fine-tuning ("" = the task's: dev, val, val2014, ...)
    eval_splits: list[str] = field(default_factory=list)  # splits evaluate.py scores ([] = the task's evaluation splits)
    vqa_min_answer_count: int = 9  # VQA answer classes: normalised answers of at least this many questions of the vocabulary's splits
    vqa_answer_splits: list[str] = field(default_factory=list)  # VQA answer vocabulary counted over these whole splits ([] = the training splits, held-out images left out)
    vqa_heldout_fraction: float = 0.05  # VQA, when val_split is also trained on: fraction of its images held out for validation
    retrieval_negatives: int = 15  # retrieval fine-tuning: negative images per caption (at most micro_batch_size - 1)
    eval_pairs_batch: int = 1024  # retrieval evaluation: image-caption pairs per cross-encoder forward
    retrieval_rerank_k: int = 0  # zero-shot retrieval with ITC: rank all by ITC, re-score each query's top k with the ITM head (0 = ITM ranks all pairs)
    zero_shot: bool = False  # evaluate.py: score init_from (or the run) as pretrained, no fine-tuning: retrieval by embeddings, CIFAR-10 by class-name prompts
    zero_shot_prompts: list[str] = field(default_factory=list)  # zero-shot classification prompts, "{}" = class name ([] = built-in: photo prompts; synthetic: one per colour)


KEY_TYPES = typing.get_type_hints(Config)
CHOICES = {"dtype": ("float32", "bfloat16", "float16"), "lr_decay": ("linear", "cosine"),
           "matmul_precision": ("highest", "high", "medium"),
           "model_type": ("two_tower", "one_tower", "dual_encoder"), "onetower_stack": ("text", "vision"),
           "pooling": ("double", "single"), "pretrain_pass": ("separate", "shared"),
           "cross_layer_type": ("lxmert", "meter"), "onetower_embeddings": ("tower", "fresh"),
           "image_resize": ("squash", "crop"), "embed_pooling": ("cls", "mean"),
           "init_new_modules": ("torch", "bert"), "compile_scope": ("model", "cross_modal")}
AT_LEAST_ONE = ("batch_size", "micro_batch_size", "max_steps", "log_interval", "eval_interval", "eval_batches",
                "ckpt_interval", "keep_checkpoints", "embed_dim", "adapter_reduction")


class ConfigError(ValueError):
    """Bad user configuration: entry points print it as one line and exit with status 2."""


def _unknown_key(key, source):
    nearest = difflib.get_close_matches(key, KEY_TYPES, n=1, cutoff=0.0)
    return ConfigError(f"{source}: unknown config key '{key}' (did you mean '{nearest[0]}'?)")


def _check_value(key, value, expected, source):
    """`value` as the annotated type `expected` (int -> float, list <-> tuple elementwise), or ConfigError."""
    name = str(expected) if typing.get_origin(expected) else expected.__name__
    bad = ConfigError(f"{source}: config key '{key}' expects {name}, got {value!r}")
    origin = typing.get_origin(expected)
    if origin in (list, tuple):
        args = typing.get_args(expected)
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            raise bad
        item_types = args if origin is tuple else [args[0]] * len(value)
        try:
            return origin(_check_value(key, item, t, source) for item, t in zip(value, item_types))
        except ConfigError:
            raise bad from None
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected:  # exact: a bool is not an int here
        raise bad
    return value


def _parse_cli_value(raw, expected):
    """The Python value of a command-line string for a key of annotated type `expected` (not yet checked)."""
    if expected is str:
        return raw
    if expected is bool:
        return {"true": True, "1": True, "false": False, "0": False}.get(raw.lower(), raw)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        value = raw
    if typing.get_origin(expected) in (list, tuple) and not isinstance(value, (list, tuple)):
        item_type = typing.get_args(expected)[0]  # "coco,vg" or "0.9,0.98": comma-separated items
        return [_parse_cli_value(item.strip(), item_type) for item in raw.split(",")] if raw else []
    return value


def exec_assignments(path, namespace, check, including=(), kind="config file"):
    """Run a file of Python assignments (a config file, a study file) over `namespace`, then check(path, namespace);
    include("other.py") (relative to this file) runs another such file at that point, so a variant can be its base
    plus one line. Errors are ConfigErrors naming the file and line."""
    if os.path.abspath(path) in including:
        raise ConfigError(f"{path}: include cycle")
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {kind} {path}: {e.strerror}") from None
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise ConfigError(f"{path}, line {e.lineno}: syntax error: {e.msg}") from None
    outer_include = namespace.get("include")
    namespace["include"] = lambda other: exec_assignments(
        os.path.join(os.path.dirname(path), other), namespace, check, [*including, os.path.abspath(path)], kind)
    try:
        exec(code, namespace)
    except ConfigError:
        raise
    except Exception as e:
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path]
        raise ConfigError(f"{path}, line {lines[-1]}: {type(e).__name__}: {e}") from None
    finally:
        namespace["include"] = outer_include
    check(path, namespace)


def _check_config_keys(path, namespace):
    for name, value in list(namespace.items()):
        if name.startswith("_") or name == "include" or inspect.ismodule(value):
            continue
        if name not in KEY_TYPES:
            raise _unknown_key(name, path)
        namespace[name] = _check_value(name, value, KEY_TYPES[name], path)


def load_config(argv):
    """Config from `[CONFIG.py] [--key=value ...]` (defaults < config file < command line), validated for
    the WORLD_SIZE that torchrun set (1 without torchrun). Bad input raises ConfigError."""
    values = asdict(Config())
    if argv and not argv[0].startswith("--"):
        namespace = dict(values)
        exec_assignments(argv[0], namespace, _check_config_keys)
        values = {key: namespace[key] for key in values}
    values.update(command_line_overrides(argv))
    cfg = Config(**values)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    from engine import refuse_overwrite  # engine builds on this module: imported here, not above
    refuse_overwrite(cfg)
    return cfg


def command_line_overrides(argv):
    """{key: checked value} of the `--key=value` arguments of `[CONFIG.py] [--key=value ...]`."""
    overrides = {}
    for arg in argv[1:] if argv and not argv[0].startswith("--") else argv:
        match = re.fullmatch(r"--(\w+)=(.*)", arg, re.DOTALL)
        if match is None:
            raise ConfigError(f"command line: expected --key=value, got '{arg}'")
        key, raw = match.groups()
        if key not in KEY_TYPES:
            raise _unknown_key(key, "command line")
        overrides[key] = _check_value(key, _parse_cli_value(raw, KEY_TYPES[key]), KEY_TYPES[key], "command line")
    return overrides


def validate(cfg, world_size=1):
    """Reject impossible settings with a ConfigError naming the key."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in AT_LEAST_ONE:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be at least 1")
    if cfg.batch_size % (cfg.micro_batch_size * world_size):
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by micro_batch_size="
                          f"{cfg.micro_batch_size} x world_size={world_size}")
    for key in ("lr", "weight_decay", "warmup_steps", "grad_clip", "eps"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must not be negative")
    for key in ("mlm_weight", "itm_weight", "itc_weight", "retrieval_rerank_k"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must not be negative")
    if cfg.mlm_weight == 0 and cfg.itm_weight == 0 and cfg.itc_weight == 0:
        raise ConfigError("mlm_weight=0 and itm_weight=0 leave no pretraining loss without itc_weight > 0: make one "
                          "of them positive")
    if cfg.itm_hard_negatives and not (cfg.itc_weight > 0 and cfg.itm_weight > 0):
        raise ConfigError("itm_hard_negatives draws ITM negatives by ITC similarity: it needs itc_weight > 0 and "
                          "itm_weight > 0")
    for key in ("text_align", "vision_align"):
        unknown = [kind for kind in getattr(cfg, key) if kind not in ALIGN_KINDS]
        if unknown:
            raise ConfigError(f"{key}: {unknown} not among {', '.join(ALIGN_KINDS)}")
    if cfg.pretrain_pass == "shared" and not (cfg.mlm_weight > 0 and cfg.itm_weight > 0):
        raise ConfigError("pretrain_pass='shared' shares one pass between MLM and ITM: it needs mlm_weight > 0 "
                          "and itm_weight > 0")
    if cfg.vision_feature_cache and (cfg.model_type != "two_tower" or not cfg.freeze_vision or cfg.augment):
        raise ConfigError(f"vision_feature_cache needs model_type='two_tower', freeze_vision=True and augment=False "
                          f"(got {cfg.model_type!r}, {cfg.freeze_vision}, {cfg.augment})")
    if cfg.image_resize == "crop" and cfg.task.startswith("refcoco"):
        raise ConfigError(f"image_resize='crop' would cut off boxes of task={cfg.task!r}: use image_resize='squash'")
    if cfg.compile and cfg.compile_scope == "cross_modal" and cfg.model_type != "two_tower":
        raise ConfigError(f"compile_scope='cross_modal' compiles the cross-modal layers, which only "
                          f"model_type='two_tower' has (got {cfg.model_type!r}): use compile_scope='model'")
    check_trackers(cfg)
    fractions = {"min_lr_ratio": cfg.min_lr_ratio, "mlm_prob": cfg.mlm_prob, "itm_neg_prob": cfg.itm_neg_prob,
                 "betas[0]": cfg.betas[0], "betas[1]": cfg.betas[1], "text_only_fraction": cfg.text_only_fraction,
                 "image_text_share": cfg.image_text_share}
    for key, value in fractions.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}={value} must lie in [0, 1]")
    if cfg.text_only_fraction > 0 or cfg.image_text_share < 1:
        schedule = f"text_only_fraction={cfg.text_only_fraction} and image_text_share={cfg.image_text_share}"
        if not cfg.text_corpora:
            raise ConfigError(f"{schedule} ask for text-only steps, but text_corpora is empty")
        if cfg.mlm_weight == 0:
            raise ConfigError(f"{schedule} ask for text-only steps, which train MLM, but mlm_weight=0")
    if cfg.save_text_tower and cfg.model_type != "two_tower":
        raise ConfigError(f"save_text_tower needs model_type='two_tower' (got {cfg.model_type!r}): a one-tower "
                          "model has no text tower of its own")


# Experiment trackers: optional mirrors of log.jsonl, chosen by cfg.trackers, each opened on the master only.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package it needs


def check_trackers(cfg):
    """Unknown trackers and missing packages are refused at start-up, before any work (a ConfigError)."""
    for name in cfg.trackers:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"trackers: {name!r} is not one of {', '.join(TRACKER_PACKAGES)}")
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(f"trackers: {name!r} needs the {TRACKER_PACKAGES[name]} package, which is not "
                              f"installed (pip install {TRACKER_PACKAGES[name]}, or drop it from trackers)")


def main_guard(main):
    """Run an entry point's main(); bad user input (ConfigError, FileNotFoundError, ValueError) prints one
    line `error: ...` on stderr and exits with status 2, a numerical blow-up (FloatingPointError) likewise
    with status 3; neither prints a traceback."""
    try:
        return main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # ConfigError is a ValueError
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(3 if isinstance(e, FloatingPointError) else 2)


def config_reference():
    """The config keys as a markdown table (key, default, meaning), read from Config's source comments."""
    defaults = asdict(Config())
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for line in inspect.getsource(Config).splitlines()[1:]:
        if section := re.fullmatch(r"\s+# (.+)", line):
            rows.append(f"| **{section[1]}** | | |")
        elif key := re.fullmatch(r"\s+(\w+): .*?  # (.+)", line):
            comment = key[2].replace("|", "\\|")
            rows.append(f"| `{key[1]}` | `{defaults[key[1]]!r}` | {comment} |")
    return "\n".join(rows)




if __name__ == "__main__":
    print(config_reference())
