"""Run a study: pretrain every variant with every seed, fine-tune each result on every task, evaluate, and
aggregate into a results folder: every run's metrics (results.json), mean ± 95% confidence intervals over seeds
(results.md), paired comparisons of variants, training curves and bar charts (PNG, with matplotlib).

    python study.py studies/synthetic_freezing.py [--quick] [--out results/synthetic_freezing] [--towers DIR]
                    [--key=value ...]
    torchrun --standalone --nproc_per_node=2 study.py studies/synthetic_freezing.py

A study file is Python assignments, like a config file (names starting with "_" are its own helpers):

    towers = {"text": ("pretrain", "../configs/synthetic_text_tower.py", {})}   made first, each exported
        (export.py) to TOWERS/<name>: text_tower/, vision_tower/, tokenizer/ (TOWERS: --towers, or OUT/towers;
        studies that start from the same towers can share them)
    variants = {"none": ("../configs/quickstart.py", {"freeze_text": False}), ...}   what is pretrained; a list
        of such pairs is a chain of runs, each starting where the one before left off
    seeds = [0, 1, 2]
    tasks = {"nlvr2": ("../configs/synthetic_nlvr2.py", {"max_steps": 300}), ...}   fine-tuned from every
        variant and seed (init_from = its last pretraining run), then scored by evaluate.py
    downstream = {"retrieval": ("coco_retrieval", {"synthetic_task": True})}   zero-shot evaluations of the last
        pretraining run (evaluate.py --zero_shot=true), for models that are not fine-tuned (dual encoders)
    compare = [("vision", "none")]   paired differences over seeds, a minus b, per task metric
    headline = {"nlvr2": ["nlvr2_acc (dev)"]}   the metrics of results.md's main table (default: each
        evaluation's metrics on its first split)
    quick = {"text_hidden_size": 32}   extra overrides of the tower and pretraining runs under --quick

Config paths are relative to the study file. In override values "{towers}" is TOWERS, "{run}" the run's
own directory and "{previous}" the directory of the run before it in a chain. Command-line --key=value pairs
(--data_root=/data, --device=cuda) go to every run. Runs live under OUT/runs/<variant>/seed<k>/.

Resuming: a training run whose final checkpoint exists and an evaluation whose metrics files exist are never
redone; an interrupted training run continues from its newest checkpoint (resume=True). Killing the runner and
starting the same command again finishes the study. --quick runs one seed for a few steps on a tiny synthetic
world: the test suite's end-to-end check. Stages run in this process (pretrain.main, finetune.main, ...), so
under torchrun every process takes part in every run, as with the entry points themselves.
"""

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch.distributed as tdist

import data
import engine
import evaluate
import export
import finetune
import pretrain
import tasks as task_registry
from config import KEY_TYPES, Config, ConfigError, exec_assignments, load_config, main_guard
from model import apply_freezing, build_pretrain_model, parameter_summary

STUDY_KEYS = ("towers", "variants", "seeds", "tasks", "downstream", "compare", "headline", "quick")
TRAINING = {"pretrain": pretrain.main, "finetune": finetune.main}
# --quick: a few steps at batch 8 on a tiny synthetic world, for every run
QUICK = dict(max_steps=2, warmup_steps=1, batch_size=8, micro_batch_size=4, log_interval=1, eval_interval=2,
             eval_batches=1, ckpt_interval=2, num_workers=0, synthetic_images=40, synthetic_image_size=32,
             image_size=32, synthetic_text_lines=200, retrieval_negatives=3, eval_pairs_batch=256,
             data_root="data/quick_studies")  # a world of its own: the world's settings are part of it


# -----------------------------------------------------------------------------
# The study file


def load_study(path):
    """The study file's assignments, checked: {key: value} over STUDY_KEYS, config paths made absolute (they
    are relative to the study file's folder)."""
    namespace = {}
    exec_assignments(str(path), namespace, lambda *_: None, kind="study file")
    study = {key: value for key, value in namespace.items() if not key.startswith("_") and key != "include"}
    for key in study:
        if key not in STUDY_KEYS:
            raise ConfigError(f"{path}: unknown study key '{key}' (known: {', '.join(STUDY_KEYS)})")
    study = {"towers": {}, "tasks": {}, "downstream": {}, "compare": [], "headline": {}, "quick": {}, **study,
             "path": str(path)}
    base = Path(path).resolve().parent

    def run_spec(key, name, spec, scripts=None):
        bad = ConfigError(f"{path}: {key}[{name!r}] must be {'(script, ' if scripts else '('}config path, "
                                 f"{{key: value}}), got {spec!r}")
        if not isinstance(spec, tuple) or len(spec) != (3 if scripts else 2) or not isinstance(spec[-1], dict):
            raise bad
        if scripts and spec[0] not in scripts:
            raise ConfigError(f"{path}: {key}[{name!r}] runs {spec[0]!r}, not one of {', '.join(scripts)}")
        config = (base / spec[-2]).resolve()
        if not config.is_file():
            raise ConfigError(f"{path}: {key}[{name!r}] names {spec[-2]}, which is not a file")
        return (*spec[:-2], str(config), spec[-1])

    for key in ("seeds", "variants"):
        if key not in study:
            raise ConfigError(f"{path}: the study sets no '{key}'")
    if not study["seeds"] or not all(type(seed) is int for seed in study["seeds"]):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers, got {study['seeds']!r}")
    study["towers"] = {name: run_spec("towers", name, spec, TRAINING) for name, spec in study["towers"].items()}
    study["variants"] = {name: [run_spec("variants", name, stage) for stage in
                                (spec if isinstance(spec, list) else [spec])]
                         for name, spec in study["variants"].items()}
    study["tasks"] = {name: run_spec("tasks", name, spec) for name, spec in study["tasks"].items()}
    for name, spec in study["downstream"].items():
        if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict)):
            raise ConfigError(f"{path}: downstream[{name!r}] must be (task, {{key: value}}), got {spec!r}")
    for pair in study["compare"]:
        unknown = [v for v in pair if v not in study["variants"]] if isinstance(pair, tuple) and len(pair) == 2 \
            else [pair]
        if unknown:
            raise ConfigError(f"{path}: compare names {unknown[0]!r}, not a pair of variants")
    if not study["tasks"] and not study["downstream"]:
        raise ConfigError(f"{path}: the study has neither tasks nor downstream evaluations")
    return study


# -----------------------------------------------------------------------------
# The run list


def overrides_argv(overrides, **places):
    """--key=value for each override, with {towers}, {run}, {previous} in strings replaced by the directories
    `places` gives."""
    def value(v):
        if isinstance(v, str):
            for name, directory in places.items():
                v = v.replace("{" + name + "}", str(directory))
            return v
        return repr(list(v)) if isinstance(v, tuple) else repr(v)
    return [f"--{key}={value(v)}" for key, v in overrides.items()]


def plan(study, out, quick=False, common=(), towers_dir=None):
    """Every run of the study, in order, as dicts: kind (tower, pretrain, finetune, downstream), name, variant,
    seed, script, argv, out_dir. Towers first (trained in towers_dir/runs, exported to towers_dir/<name>; default
    OUT/towers), then per variant and seed its pretraining chain, fine-tuning runs and zero-shot evaluations. Every
    argv is checked (load_config) before anything runs."""
    out = Path(out).resolve()
    towers_dir = Path(towers_dir).resolve() if towers_dir else out / "towers"
    quick_all = {**QUICK} if quick else {}
    quick_pretrain = {**quick_all, **study["quick"]} if quick else {}
    seeds = study["seeds"][:1] if quick else study["seeds"]
    runs = []
    for name, (script, config, overrides) in study["towers"].items():
        run_dir = towers_dir / "runs" / name
        argv = [config] + overrides_argv({**overrides, **quick_pretrain, "out_dir": "{run}"}, towers=towers_dir,
                                         run=run_dir)
        runs.append(dict(kind="tower", name=name, variant=None, seed=None, script=script, argv=argv + list(common),
                         out_dir=str(run_dir), export=str(towers_dir / name)))
    for variant, chain in study["variants"].items():
        for seed in seeds:
            seed_dir = out / "runs" / variant / f"seed{seed}"
            previous = None
            for i, (config, overrides) in enumerate(chain):
                run_dir = seed_dir / ("pretrain" if len(chain) == 1 else f"pretrain{i + 1}")
                argv = [config] + overrides_argv({**overrides, **quick_pretrain, "seed": seed, "out_dir": "{run}"},
                                                 towers=towers_dir, run=run_dir, previous=previous)
                runs.append(dict(kind="pretrain", name=run_dir.name, variant=variant, seed=seed, script="pretrain",
                                 argv=argv + list(common), out_dir=str(run_dir)))
                previous = run_dir
            for task, (config, overrides) in study["tasks"].items():
                run_dir = seed_dir / task
                argv = [config] + overrides_argv({**overrides, **quick_all, "seed": seed, "init_from": str(previous),
                                                  "out_dir": "{run}"}, towers=towers_dir, run=run_dir)
                runs.append(dict(kind="finetune", name=task, variant=variant, seed=seed, script="finetune",
                                 argv=argv + list(common), out_dir=str(run_dir)))
            for name, (task, overrides) in study["downstream"].items():
                argv = [str(previous)] + overrides_argv({**overrides, **quick_all, "zero_shot": True, "task": task},
                                                        towers=towers_dir)
                runs.append(dict(kind="downstream", name=name, variant=variant, seed=seed, script="evaluate",
                                 argv=argv + list(common), out_dir=str(previous), task=task))
    for run in runs:  # every config resolves before any work: a bad key fails now, in one line
        try:
            if run["kind"] == "downstream":
                load_config(run["argv"][1:])
            else:
                run["config"] = load_config(run["argv"])
        except ConfigError as e:
            where = f"tower {run['name']!r}" if run["kind"] == "tower" else f"variant {run['variant']!r}, {run['name']}"
            raise ConfigError(f"{study['path']}: {where}: {e}") from None
    return runs


# -----------------------------------------------------------------------------
# Running


def is_master():
    return int(os.environ.get("RANK", "0")) == 0


def final_checkpoint_done(run):
    """Whether a training run has reached its last step (its ckpt_<max_steps>.pt exists)."""
    return (Path(run["out_dir"]) / f"ckpt_{run['config'].max_steps}.pt").is_file()


def metric_files(run):
    """The metrics files evaluate.py writes for a fine-tuning run or a zero-shot evaluation, one per split."""
    if run["kind"] == "downstream":
        cfg, suffix = load_config(run["argv"][1:]), "_zero_shot_metrics.json"
    else:
        cfg, suffix = run["config"], "_metrics.json"
    task = task_registry.get_task(cfg.task)
    return [Path(run["out_dir"]) / "eval" / f"{task.name}_{split}{suffix}" for split in task.evaluation_splits(cfg)]


def timing_file(run):
    """Where a run's wall time is kept (in its directory, so that a resumed study keeps it)."""
    name = f"study_{run['name']}.json" if run["kind"] == "downstream" else "study.json"
    return Path(run["out_dir"]) / name


def timed(run, field, function, *args):
    """function(*args), adding its wall time to the run's timing file."""
    start = time.time()
    result = function(*args)
    path = timing_file(run)
    if is_master():
        saved = read_json(path)
        saved[field] = saved.get(field, 0.0) + time.time() - start
        path.write_text(json.dumps(saved))
    return result


def execute(run, log):
    """Do what is left of one run of the plan (train, export, evaluate); returns whether anything was left."""
    left = False
    if run["kind"] != "downstream" and not final_checkpoint_done(run):
        log(f"{run['script']}.py {' '.join(run['argv'])}")
        timed(run, "train_seconds", TRAINING[run["script"]], run["argv"])
        left = True
    if run["kind"] == "tower" and not Path(run["export"]).is_dir():
        log(f"export.py {run['out_dir']} --out {run['export']}")
        if is_master():
            export.export(run["out_dir"], run["export"])
        if tdist.is_initialized():  # the next run reads the towers on every process
            tdist.barrier()
        left = True
    if run["kind"] in ("finetune", "downstream") and not all(path.is_file() for path in metric_files(run)):
        log(f"evaluate.py {' '.join(run['argv'] if run['kind'] == 'downstream' else [run['out_dir']])}")
        timed(run, "eval_seconds", evaluate.main, run["argv"] if run["kind"] == "downstream" else [run["out_dir"]])
        left = True
    return left


# -----------------------------------------------------------------------------
# Statistics: Student's t without scipy


def _incomplete_beta_fraction(a, b, x):
    """The continued fraction of the regularized incomplete beta function (modified Lentz's method)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_beta(a, b, x):
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):  # the fraction converges fast here; otherwise use I_x(a, b) = 1 - I_{1-x}(b, a)
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p, df):
    """The t with P(T <= t) = p (0.5 <= p < 1), by bisection on t_cdf."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def mean_ci(values):
    """(mean, half-width of the 95% confidence interval from the t distribution, n); half-width None for n < 2."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, None, n
    return mean, t_quantile(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n), n


def format_ci(mean, half, n):
    return f"{mean:.3f} ± {half:.3f} (n={n})" if half is not None else f"{mean:.3f} (n={n})"


# -----------------------------------------------------------------------------
# Collecting and aggregating


def parameter_counts(run_dir):
    """(trainable, total) parameters of a pretraining run, as its own start-up counted them: the model rebuilt from
    the final checkpoint's config and tower configs, with its freezing applied."""
    checkpoint = engine.read_checkpoint(engine.latest_checkpoint(run_dir), mmap=True)
    cfg = Config(**{k: v for k, v in checkpoint["config"].items() if k in KEY_TYPES})
    model = build_pretrain_model(cfg, len(data.build_tokenizer(cfg)), checkpoint.get("tower_configs"))
    apply_freezing(model, cfg)
    _, trainable, total = parameter_summary(model)[-1]
    return trainable, total


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def training_curve(run_dirs):
    """[(step, loss)] of a chain of runs' training log lines, later runs' steps counted on from the earlier ones'."""
    curve, offset = [], 0
    for run_dir in run_dirs:
        lines = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line]
        train = [line for line in lines if "split" not in line and "loss" in line]
        curve += [(offset + line["step"], line["loss"]) for line in train]
        offset += train[-1]["step"] if train else 0
    return curve


def collect(study, runs):
    """results.json's content: per variant and seed its pretraining runs' parameters, wall time and training curve,
    and every evaluation's metrics as "<metric> (<split>)"."""
    results = {"variants": {}}
    for run in runs:
        if run["kind"] == "tower":
            continue
        seeds = results["variants"].setdefault(run["variant"], {})
        entry = seeds.setdefault(str(run["seed"]), {"pretrain_runs": [], "metrics": {}, "seconds": 0.0,
                                                     "configs": {}})
        entry["seconds"] += sum(read_json(timing_file(run)).values())
        if run["kind"] == "pretrain":
            entry["pretrain_runs"].append(run["out_dir"])
            entry["configs"][run["name"]] = read_json(Path(run["out_dir"]) / "config.json")
            continue
        if run["kind"] == "finetune":
            entry["configs"][run["name"]] = read_json(Path(run["out_dir"]) / "config.json")
        for path in metric_files(run):
            record = json.loads(path.read_text())
            entry["metrics"][run["name"]] = {**entry["metrics"].get(run["name"], {}),
                                             **{f"{k} ({record['split']})": v for k, v in record["metrics"].items()}}
    for variant, seeds in results["variants"].items():
        for entry in seeds.values():
            entry["trainable_params"], entry["total_params"] = parameter_counts(entry["pretrain_runs"][-1])
            entry["curve"] = training_curve(entry["pretrain_runs"])
    return results


def headline_metrics(study, results):
    """[(evaluation, metric)]: the study's headline, or every metric of each evaluation's first split."""
    chosen = []
    for name in [*study["tasks"], *study["downstream"]]:
        found = [metric for seeds in results["variants"].values() for entry in seeds.values()
                 for metric in entry["metrics"].get(name, {})]
        names = study["headline"].get(name)
        if names is None:
            first_split = found[0].split(" (")[1] if found else ""
            names = [m for m in dict.fromkeys(found) if m.endswith(" (" + first_split)]
        chosen += [(name, metric) for metric in names]
    return chosen


def per_seed(results, variant, name, metric):
    """{seed: value} of one metric of one evaluation for one variant."""
    seeds = results["variants"].get(variant, {})
    return {seed: entry["metrics"][name][metric] for seed, entry in seeds.items()
            if metric in entry["metrics"].get(name, {})}


def paired_difference(a, b):
    """mean_ci of a[seed] - b[seed] over the seeds both have."""
    common = sorted(set(a) & set(b))
    return mean_ci([a[seed] - b[seed] for seed in common]) if common else None


def results_markdown(study, results, study_path):
    """The results tables: per variant its parameters, wall time and headline metrics (mean ± 95% CI half-width
    over seeds), then the paired comparisons, then every metric."""
    variants = list(results["variants"])
    headline = headline_metrics(study, results)
    lines = [f"# Results of {study_path}", "",
             "Mean ± half-width of the 95% confidence interval (Student's t over seeds), n = seeds. Trainable "
             "parameters: of the (last) pretraining run. Wall time: pretraining, fine-tuning and evaluation of one "
             "seed, mean over seeds.", ""]
    columns = ["variant", "trainable params", "trainable share", "wall time (s)"] + \
              [f"{name}: {metric}" for name, metric in headline]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for variant in variants:
        entries = list(results["variants"][variant].values())
        trainable, total = entries[0]["trainable_params"], entries[0]["total_params"]
        cells = [variant, f"{trainable:,}", f"{trainable / total:.2%}",
                 f"{statistics.fmean(e['seconds'] for e in entries):.0f}"]
        for name, metric in headline:
            values = list(per_seed(results, variant, name, metric).values())
            cells.append(format_ci(*mean_ci(values)) if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if study["compare"]:
        lines += ["", "## Paired comparisons", "",
                  "Per seed, variant a minus variant b; mean ± 95% CI half-width over seeds.", "",
                  "| a - b | metric | difference |", "|---|---|---|"]
        for a, b in study["compare"]:
            for name, metric in headline:
                difference = paired_difference(per_seed(results, a, name, metric), per_seed(results, b, name, metric))
                if difference:
                    lines.append(f"| {a} - {b} | {name}: {metric} | {format_ci(*difference)} |")
    lines += ["", "## Every metric", "", "| evaluation | metric | " + " | ".join(variants) + " |",
              "|---|---|" + "---|" * len(variants)]
    every = dict.fromkeys((name, metric) for seeds in results["variants"].values() for entry in seeds.values()
                          for name, metrics in entry["metrics"].items() for metric in metrics)
    for name, metric in every:
        cells = [format_ci(*mean_ci(list(values.values()))) if (values := per_seed(results, v, name, metric))
                 else "-" for v in variants]
        lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plots(study, results, out):
    """training_curves.png (pretraining loss per variant: mean over seeds, band from lowest to highest), one bar chart
    per headline metric with 95% CI whiskers and, when the variants train different shares of their parameters,
    trainable_share.png (the share against each headline metric); returns the files written, or None without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axes = plt.subplots(figsize=(7, 4))
    for variant, seeds in results["variants"].items():
        curves = [dict(entry["curve"]) for entry in seeds.values()]
        steps = sorted(set.intersection(*(set(curve) for curve in curves)))
        values = [[curve[step] for curve in curves] for step in steps]
        axes.plot(steps, [statistics.fmean(v) for v in values], label=variant)
        axes.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.25)
    axes.set(xlabel="optimizer step", ylabel="training loss", title="pretraining (band: lowest to highest seed)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "training_curves.png", dpi=100)
    plt.close(figure)
    written.append(out / "training_curves.png")
    variants = list(results["variants"])
    shares = [next(iter(seeds.values())) for seeds in results["variants"].values()]
    shares = [entry["trainable_params"] / entry["total_params"] for entry in shares]
    if len(set(shares)) > 1:  # variants that train different shares: the share against each headline metric
        share_figure, share_axes = plt.subplots(figsize=(7, 4))
    for name, metric in headline_metrics(study, results):
        stats = [mean_ci(list(per_seed(results, v, name, metric).values())) for v in variants]
        figure, axes = plt.subplots(figsize=(1.2 * len(variants) + 2, 3.5))
        axes.bar(variants, [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats], capsize=6, color="tab:blue")
        axes.set(ylabel=metric, title=f"{name}: mean and 95% CI over {max(s[2] for s in stats)} seeds")
        figure.tight_layout()
        path = out / f"{name}_{metric.split(' ')[0]}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
        if len(set(shares)) > 1:
            share_axes.errorbar(shares, [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats], fmt="o", capsize=4,
                                label=f"{name}: {metric}")
    if len(set(shares)) > 1:
        for variant, share in zip(variants, shares):
            share_axes.annotate(variant, (share, share_axes.get_ylim()[0]), rotation=90, fontsize=8, va="bottom")
        share_axes.set(xscale="log", xlabel="trainable share of parameters (pretraining)", ylabel="mean, 95% CI",
                       title="trainable share against the headline metrics")
        share_axes.legend(fontsize=8)
        share_figure.tight_layout()
        share_figure.savefig(out / "trainable_share.png", dpi=100)
        plt.close(share_figure)
        written.append(out / "trainable_share.png")
    return written


def write_results(study, runs, out, study_path):
    """results.json, results.md and the plots in `out`; prints the tables and the paired comparisons."""
    results = collect(study, runs)
    results["study"] = study_path
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = results_markdown(study, results, study_path)
    (out / "results.md").write_text(table)
    print(table)
    plots = write_plots(study, results, out)
    print(f"plots: {', '.join(p.name for p in plots)}" if plots is not None else
          "matplotlib is not installed: tables written, plots skipped (pip install matplotlib)")
    return results


# -----------------------------------------------------------------------------


USAGE = "usage: study.py STUDY.py [--quick] [--out DIR] [--towers DIR] [--key=value ...]"


def parse_args(argv):
    """(study file, {"out": DIR, "towers": DIR} as given, quick, --key=value overrides for every run)."""
    args, study_path, folders, quick, common = list(argv), None, {}, False, []
    while args:
        arg = args.pop(0)
        name = arg.removeprefix("--").split("=")[0]
        if arg == "--quick":
            quick = True
        elif arg in ("--out", "--towers") and args:
            folders[name] = args.pop(0)
        elif name in ("out", "towers") and "=" in arg:
            folders[name] = arg.split("=", 1)[1]
        elif arg.startswith("--") and "=" in arg:
            common.append(arg)
        elif not arg.startswith("--") and study_path is None:
            study_path = arg
        else:
            raise ValueError(f"unexpected argument {arg!r}; {USAGE}")
    if study_path is None:
        raise ValueError(USAGE)
    return study_path, folders, quick, common


def main(argv):
    study_path, folders, quick, common = parse_args(argv)
    study = load_study(study_path)
    out = Path(folders.get("out") or Path("results") / (Path(study_path).stem + ("_quick" if quick else ""))).resolve()
    runs = plan(study, out, quick, common, folders.get("towers"))
    master = is_master()
    log = (lambda line: print(f"[study] {line}", flush=True)) if master else (lambda line: None)
    log(f"{len(runs)} runs in {out}")
    start = time.time()
    # one process group for every run (engine.setup_distributed: the runs' own calls share it)
    engine.setup_distributed(next(run["config"] for run in runs if "config" in run))
    ran = sum(execute(run, log) for run in runs)
    engine.cleanup_distributed()
    log(f"{ran} runs done this session, {len(runs) - ran} already done; {time.time() - start:.0f} s")
    if master:
        write_results(study, runs, out, study_path)


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
