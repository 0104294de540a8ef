"""Evaluate fine-tuned runs: predictions and metrics for each split, and a results table across runs.

    python evaluate.py out/nlvr2 [--eval_splits=dev,test1] [--key=value ...]
    python evaluate.py configs/nlvr2.py                     (a config file stands for the run in its out_dir)
    torchrun --standalone --nproc_per_node=2 evaluate.py out/coco_retrieval
    python evaluate.py out/nlvr2_* out/snli_ve_* out/refcoco_*   (several runs: one table)

Each run is rebuilt from its config.json (command-line keys override it) and its newest checkpoint, whose
recorded tower configs stand in for the towers' hub names or directories. For each
split of eval_splits it writes out_dir/eval/<task>_<split>_predictions.<csv|json|tsv> (the evaluation
server's format where one exists: VQA results, GLUE TSV, NLVR2 CSV) and <task>_<split>_metrics.json, and
appends an evaluation line to log.jsonl; a split whose metrics file already comes from the newest checkpoint
is not evaluated again. Finally it prints a markdown table like the paper's: one row per pretrained model the
runs started from (init_from), one column per metric and split.

Zero-shot (zeroshot.py): with --zero_shot=true a pretraining run is scored as it is, with no fine-tuning, on
cifar10 (class-name prompts) or coco/f30k retrieval (embedding similarity, or two-stage with ITC):

    python evaluate.py out/synthetic_dual_full --zero_shot=true --task=cifar10 --synthetic_task=true
    python evaluate.py ZERO_SHOT_CONFIG.py    (a config with zero_shot = True, init_from = the pretraining run)
"""

import json
import os
import sys
from pathlib import Path

import torch

import data
import engine
import tasks
import zeroshot
from config import KEY_TYPES, command_line_overrides, load_config, main_guard
from encoders import build_encoder
from tasks.common import format_malformed_rows, malformed_rows


def run_config(run_dir, overrides):
    """A run's config: its config.json, then `--key=value` overrides, validated as any config is. out_dir is
    the directory given (runs may move), and batch_size fits this process count, since evaluation takes no
    optimizer steps and the training batch must not stop it from running on more or fewer processes."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.json)")
    saved = json.loads(path.read_text())
    args = [f"--{key}={value}" if isinstance(value, str) else f"--{key}={value!r}" for key, value in saved.items()
            if key in KEY_TYPES]  # a key that this version no longer has is skipped
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    micro_batch_size = command_line_overrides(overrides).get("micro_batch_size", saved["micro_batch_size"])
    fixed = [f"--out_dir={run_dir}", f"--batch_size={micro_batch_size * world_size}"]
    return load_config(args + list(overrides) + fixed)


def target_config(target, overrides):
    """The config of a run directory, or of the run a config file's out_dir names; a zero-shot config file stands
    for itself (it scores its init_from, so no run of its own exists yet)."""
    if target.endswith(".py"):
        cfg = load_config([target] + overrides)
        return cfg if cfg.zero_shot else run_config(cfg.out_dir, overrides)
    return run_config(target, overrides)


def model_name(cfg):
    """The pretrained model a run started from, as a table row label."""
    return cfg.init_from.rstrip("/") or "(from scratch)"


def evaluate_run(cfg, dist):
    """Evaluate one run on its eval_splits; returns one record per split (task, split, step, metrics...)."""
    task = tasks.get_task(cfg.task)
    checkpoint = engine.latest_checkpoint(cfg.out_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{cfg.out_dir}: no ckpt_<step>.pt to evaluate")
    eval_dir = Path(cfg.out_dir) / "eval"
    records, pending = [], []
    for split in task.evaluation_splits(cfg):
        metrics_path = eval_dir / f"{task.name}_{split}_metrics.json"
        saved = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        if saved is not None and saved["checkpoint"] == os.path.basename(checkpoint):
            records.append(saved)
        else:
            pending.append(split)
    if not pending:
        return records

    label_names = json.loads((Path(cfg.out_dir) / "labels.json").read_text())
    tokenizer = data.build_tokenizer(cfg)
    state = engine.read_checkpoint(checkpoint, mmap=True)
    model = task.build_model(build_encoder(cfg, len(tokenizer), state.get("tower_configs")), label_names)
    model.load_state_dict(state["model"])
    model.to(dist.device).eval()
    transform = data.build_transform(cfg, train=False)
    logger = engine.JsonlLogger(os.path.join(cfg.out_dir, "log.jsonl"), enabled=dist.master)
    for split in pending:
        dataset = task.eval_dataset(cfg, split, transform, label_names)
        with torch.no_grad(), engine.autocast_context(dist.device, cfg.dtype):
            metrics, preds = task.evaluate(model, dataset, split, tokenizer, cfg, dist, desc=f"{task.name} {split}")
        record = {"task": task.name, "split": split, "step": state["step"],
                  "checkpoint": os.path.basename(checkpoint), "model": model_name(cfg), "items": len(preds),
                  "metrics": metrics}
        malformed = malformed_rows(dataset)  # rows the reader skipped: not scored, so said
        if malformed:
            record["malformed_rows"] = malformed
        if dist.master:
            eval_dir.mkdir(exist_ok=True)
            stem = eval_dir / f"{task.name}_{split}_predictions"
            predictions = task.write_predictions(preds, dataset, label_names, stem)
            (eval_dir / f"{task.name}_{split}_metrics.json").write_text(json.dumps(record, indent=2))
            logger.log({"step": state["step"], "split": split, **metrics})
            scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no labels: predictions only"
            print(f"{cfg.out_dir} {split}: {scores} -> {predictions}")
            for line in format_malformed_rows(malformed):
                print(line)
        records.append(record)
    return records


def results_table(records):
    """Markdown table: a row per model (the init_from the runs started from), a column per metric and split; a
    line saying so instead when only splits without labels (test sets) were scored."""
    rows, columns, source = {}, [], {}
    for record in records:
        rows.setdefault(record["model"], {})
        for metric, value in record["metrics"].items():
            column = f"{metric} ({record['split']})"
            if column not in columns:
                columns.append(column)
            cell = (record["model"], column)
            if cell in source:
                raise ValueError(f"runs {source[cell]} and {record['run']} both report {column} for {record['model']}")
            source[cell] = record["run"]
            rows.setdefault(record["model"], {})[column] = value
    if not columns:
        return "no metrics to tabulate: the splits scored have no labels (predictions are in each run's eval/)"
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.3f}" if c in values else "-" for c in columns) + " |")
    return "\n".join(lines)


def main(argv):
    targets = [arg for arg in argv if not arg.startswith("--")]
    overrides = [arg for arg in argv if arg.startswith("--")]
    if not targets:
        raise ValueError("usage: evaluate.py RUN_DIR|CONFIG.py [RUN_DIR ...] [--key=value ...]")
    configs = [target_config(target, overrides) for target in targets]
    dist = engine.setup_distributed(configs[0])
    records = []
    for cfg in configs:
        evaluate = zeroshot.evaluate_zero_shot if cfg.zero_shot else evaluate_run
        records += [{**record, "run": cfg.out_dir} for record in evaluate(cfg, dist)]
    if dist.master:
        print(results_table(records))
    engine.cleanup_distributed()
    return records


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
