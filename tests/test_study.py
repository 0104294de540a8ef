"""study.py: the t interval and the paired comparison against hand-computed numbers; every study file parses and
expands to the runs it means; a quick study runs end to end (towers, pretraining, fine-tuning, evaluation, results),
a second start redoes nothing, an interrupted run continues from its checkpoint; bad study files fail in one line."""

import json
import math
import sys
from pathlib import Path

import pytest

import config
import engine
import evaluate
import study
from tests import processes

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("synthetic_common.py", "paper_tasks.py")  # parts the study files include
STUDIES = [path for path in sorted((ROOT / "studies").glob("*.py")) if path.name not in SHARED]
pytestmark = pytest.mark.usefixtures("one_thread")

# A study small enough to run twice in a test: a 32-wide quickstart model from scratch, one task, one seed
TINY_STUDY = f"""
_small = dict(text_hidden_size=32, vision_hidden_size=32, cross_hidden=32, text_layers=1, vision_layers=1,
              cross_layers=1, image_size=32, synthetic_images=40, synthetic_image_size=32, batch_size=8,
              micro_batch_size=4, warmup_steps=1, log_interval=1, eval_interval=4, eval_batches=1, num_workers=0,
              synthetic_text_lines={study.QUICK["synthetic_text_lines"]})  # one text corpus for every test here
variants = {{"scratch": ("{ROOT}/configs/quickstart.py", dict(_small, max_steps=4, ckpt_interval=2))}}
seeds = [0]
tasks = {{"nlvr2": ("{ROOT}/configs/synthetic_nlvr2.py",
                    dict(_small, max_steps=2, ckpt_interval=2, eval_interval=2, eval_splits=["dev"]))}}
"""


# -----------------------------------------------------------------------------
# Statistics


def test_t_quantile_matches_the_tables():
    for df, expected in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert study.t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4), df
    assert study.t_quantile(0.95, 1) == pytest.approx(6.314, abs=5e-4)
    assert study.t_cdf(0.0, 3) == pytest.approx(0.5)
    assert study.t_cdf(-2.776, 4) == pytest.approx(0.025, abs=1e-4)


def test_mean_and_interval_by_hand():
    mean, half, n = study.mean_ci([0.5, 0.6, 0.7])  # sd 0.1: 4.303 * 0.1 / sqrt(3)
    assert (mean, n) == (pytest.approx(0.6), 3) and half == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-4)
    assert study.mean_ci([0.8]) == (0.8, None, 1)
    assert study.format_ci(0.6, 0.24842, 3) == "0.600 ± 0.248 (n=3)"


def fabricated_results():
    """Two variants, three seeds each (b lacks seed 2 on nlvr2), as study.collect builds them."""
    def entry(acc, params):
        return {"metrics": {"nlvr2": {"nlvr2_acc (dev)": acc}} if acc is not None else {}, "seconds": 10.0,
                "trainable_params": params, "total_params": 200, "curve": []}
    return {"variants": {"a": {"0": entry(0.70, 100), "1": entry(0.60, 100), "2": entry(0.65, 100)},
                         "b": {"0": entry(0.60, 200), "1": entry(0.55, 200), "2": entry(None, 200)}}}


def test_paired_comparison_by_hand():
    results = fabricated_results()
    a, b = (study.per_seed(results, v, "nlvr2", "nlvr2_acc (dev)") for v in ("a", "b"))
    mean, half, n = study.paired_difference(a, b)  # seeds 0 and 1 only: differences 0.10 and 0.05
    assert (mean, n) == (pytest.approx(0.075), 2)
    assert half == pytest.approx(12.7062 * 0.035355339 / math.sqrt(2), rel=1e-4)


def test_results_table_by_hand():
    spec = {"tasks": {"nlvr2": None}, "downstream": {}, "headline": {}, "compare": [("a", "b")]}
    table = study.results_markdown(spec, fabricated_results(), "s.py")
    half = 4.3027 * 0.05 / math.sqrt(3)
    assert f"| a | 100 | 50.00% | 10 | 0.650 ± {half:.3f} (n=3) |" in table
    assert "| b | 200 | 100.00% | 10 | 0.575 ± " in table
    assert "| a - b | nlvr2: nlvr2_acc (dev) | 0.075 ± 0.318 (n=2) |" in table


# -----------------------------------------------------------------------------
# Study files


@pytest.mark.parametrize("path", STUDIES, ids=lambda path: path.stem)
def test_study_file_expands_to_its_runs(path, tmp_path):
    spec = study.load_study(path)
    runs = study.plan(spec, tmp_path)
    seeds = len(spec["seeds"])
    chains = sum(len(chain) for chain in spec["variants"].values())
    assert len(runs) == len(spec["towers"]) + seeds * (chains + len(spec["variants"]) * (
        len(spec["tasks"]) + len(spec["downstream"])))
    assert seeds == 3 and (spec["tasks"] or spec["downstream"])
    for run in runs:
        if run["kind"] == "finetune":  # each fine-tuning starts from its own variant and seed's last pretraining
            init_from = Path(run["config"].init_from)
            assert init_from.parent == tmp_path / "runs" / run["variant"] / f"seed{run['seed']}"
            assert init_from.name == ("pretrain" if len(spec["variants"][run["variant"]]) == 1 else
                                      f"pretrain{len(spec['variants'][run['variant']])}")
            assert run["config"].seed == run["seed"]
    if path.stem.endswith("freezing"):
        frozen = {run["variant"]: (run["config"].freeze_text, run["config"].freeze_vision) for run in runs
                  if run["kind"] == "pretrain"}
        assert frozen == {"none": (False, False), "text": (True, False), "vision": (False, True), "both": (True, True)}
    if path.stem.endswith("image_schedule"):  # the chained arm: the second run starts from the first one's text tower
        first, second = [run for run in runs if run["variant"] == "text_then_images" and run["seed"] == 0][:2]
        assert first["config"].save_text_tower == second["config"].text_tower == first["out_dir"] + "/text_tower"
    if path.stem.endswith("lilt"):
        assert {run["kind"] for run in runs} - {"tower"} == {"pretrain", "downstream"}
        shares = {run["variant"]: run["config"].text_align for run in runs if run["kind"] == "pretrain"}
        assert shares == {"full": [], "layernorm": ["layernorm"], "bias": ["bias"], "adapter": ["adapter"]}


def test_unknown_study_key_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "typo.py"
    path.write_text(TINY_STUDY + "variant = {}\n")
    with pytest.raises(SystemExit) as exit_info:
        config.main_guard(lambda: study.main([str(path), "--out", str(tmp_path / "out")]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: unknown study key 'variant' (known: towers, variants, " \
                                              f"seeds, tasks, downstream, compare, headline, quick)"
    path.write_text(TINY_STUDY.replace("max_steps=4", "max_step=4"))
    with pytest.raises(config.ConfigError, match=rf"{path}: variant 'scratch', pretrain: .*unknown config key "
                                                 r"'max_step'"):
        study.main([str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing half-made


# -----------------------------------------------------------------------------
# Running


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def freezing(tmp_path_factory, data_root):
    """studies/synthetic_freezing.py --quick, run once: its output folder."""
    out = tmp_path_factory.mktemp("freezing")
    study.main([str(ROOT / "studies" / "synthetic_freezing.py"), "--quick", "--out", str(out),
                f"--data_root={data_root}"])
    return out


def test_quick_freezing_study_end_to_end(freezing):
    results = json.loads((freezing / "results.json").read_text())
    assert list(results["variants"]) == ["none", "text", "vision", "both"]
    params = {}
    for variant, seeds in results["variants"].items():
        assert list(seeds) == ["0"]
        entry = seeds["0"]
        assert set(entry["metrics"]) == {"nlvr2", "snli_ve", "refcoco", "retrieval"}
        assert all(math.isfinite(v) for metrics in entry["metrics"].values() for v in metrics.values())
        assert entry["seconds"] > 0 and [step for step, _ in entry["curve"]] == [1, 2]
        assert entry["configs"]["pretrain"]["freeze_vision"] == (variant in ("vision", "both"))
        params[variant] = entry["trainable_params"], entry["total_params"]
    assert len({total for _, total in params.values()}) == 1  # one architecture, frozen differently
    assert params["both"][0] < min(params["text"][0], params["vision"][0]) <= params["none"][0] == params["none"][1]
    table = (freezing / "results.md").read_text()
    assert "| variant | trainable params | trainable share | wall time (s) | nlvr2: nlvr2_acc (dev) |" in table
    assert f"| both | {params['both'][0]:,} |" in table and "| vision - none | nlvr2: nlvr2_acc (dev) |" in table
    assert (freezing / "towers" / "text" / "text_tower" / "config.json").is_file()


def all_files(folder):
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def count_calls(monkeypatch):
    """Count the entry points study.py calls (training, export, evaluation)."""
    calls = []
    for name, function in list(study.TRAINING.items()):
        monkeypatch.setitem(study.TRAINING, name, lambda argv, f=function, n=name: calls.append(n) or f(argv))
    monkeypatch.setattr(study.export, "export", lambda *a, f=study.export.export: calls.append("export") or f(*a))
    monkeypatch.setattr(study.evaluate, "main", lambda argv, f=evaluate.main: calls.append("evaluate") or f(argv))
    return calls


def test_a_second_start_redoes_nothing_finished(freezing, data_root, monkeypatch):
    runs = freezing / "runs"
    before = all_files(runs)
    calls = count_calls(monkeypatch)
    argv = [str(ROOT / "studies" / "synthetic_freezing.py"), "--quick", "--out", str(freezing),
            f"--data_root={data_root}"]
    study.main(argv)
    assert calls == [] and all_files(runs) == before
    lost = runs / "vision" / "seed0" / "snli_ve" / "eval" / "snli_ve_dev_metrics.json"
    lost.unlink()
    study.main(argv)  # only the missing evaluation is done again
    assert calls == ["evaluate"] and lost.is_file()


def test_an_interrupted_study_finishes_from_its_checkpoints(tmp_path, data_root, monkeypatch):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_STUDY)
    argv = [str(path), "--out", str(tmp_path / "out"), f"--data_root={data_root}"]
    steps = []
    original_step = engine.optimizer_step

    def interrupted_at_step_3(*args):
        steps.append(args[-1] + 1)
        if len(steps) == 3:  # after the checkpoint at step 2
            raise KeyboardInterrupt
        return original_step(*args)

    monkeypatch.setattr(engine, "optimizer_step", interrupted_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        study.main(argv)
    pretrain_dir = tmp_path / "out" / "runs" / "scratch" / "seed0" / "pretrain"
    assert [p.name for p in pretrain_dir.glob("ckpt_*.pt")] == ["ckpt_2.pt"]
    steps.clear()
    monkeypatch.setattr(engine, "optimizer_step", lambda *args: steps.append(args[-1] + 1) or original_step(*args))
    study.main(argv)
    assert steps == [3, 4, 1, 2]  # pretraining from its step 2, then fine-tuning
    log = [json.loads(line) for line in (pretrain_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "split" not in r] == [1, 2, 3, 4]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "nlvr2_acc (dev)" in results["variants"]["scratch"]["0"]["metrics"]["nlvr2"]


def test_a_chained_variant_starts_from_the_text_tower_of_the_run_before(tmp_path, data_root):
    path = tmp_path / "chain.py"
    scratch = f'"scratch": ("{ROOT}/configs/quickstart.py", dict(_small, max_steps=4, ckpt_interval=2))'
    path.write_text(TINY_STUDY.replace(scratch, f"""
    "text_then_images": [
        ("{ROOT}/configs/synthetic_schedule_text_only.py",
         dict(_small, max_steps=2, ckpt_interval=2, save_text_tower="{{run}}/text_tower")),
        ("{ROOT}/configs/synthetic_schedule_text_then_images.py",
         dict(_small, max_steps=2, ckpt_interval=2, text_tower="{{previous}}/text_tower",
              text_layers=-1, text_hidden_size=-1))]"""))
    study.main([str(path), "--out", str(tmp_path / "out"), f"--data_root={data_root}"])
    seed_dir = tmp_path / "out" / "runs" / "text_then_images" / "seed0"
    second = json.loads((seed_dir / "pretrain2" / "config.json").read_text())
    assert second["text_tower"] == str(seed_dir / "pretrain1" / "text_tower")
    assert json.loads((seed_dir / "nlvr2" / "config.json").read_text())["init_from"] == str(seed_dir / "pretrain2")
    results = json.loads((tmp_path / "out" / "results.json").read_text())["variants"]["text_then_images"]["0"]
    assert [step for step, _ in results["curve"]] == [1, 2, 3, 4]  # the two runs' curves, one after the other


def test_under_torchrun_every_run_shares_one_process_group(tmp_path, data_root):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_STUDY)
    out = tmp_path / "out"
    done = processes.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "study.py"), str(path), "--out", str(out), f"--data_root={data_root}"],
                         timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert "nlvr2_acc (dev)" in results["variants"]["scratch"]["0"]["metrics"]["nlvr2"]


def test_quick_lilt_study_reports_zero_shot_retrieval_from_shared_towers(freezing, tmp_path, data_root):
    towers = all_files(freezing / "towers")
    study.main([str(ROOT / "studies" / "synthetic_lilt.py"), "--quick", "--out", str(tmp_path),
                f"--towers={freezing / 'towers'}", f"--data_root={data_root}"])
    assert all_files(freezing / "towers") == towers and not (tmp_path / "towers").exists()  # made once, shared
    results = json.loads((tmp_path / "results.json").read_text())
    shares = {variant: seeds["0"]["trainable_params"] / seeds["0"]["total_params"]
              for variant, seeds in results["variants"].items()}
    assert shares["full"] == 1.0 and all(shares[v] < 0.5 for v in ("layernorm", "bias", "adapter"))
    for seeds in results["variants"].values():
        assert set(seeds["0"]["metrics"]["retrieval"]) >= {"coco_tr_r1 (test)", "coco_ir_r1 (test)"}
    assert "| layernorm - full | retrieval: coco_tr_r1 (test) |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("name", ["synthetic_onetower_init", "synthetic_image_schedule"])
def test_quick_study_runs_every_variant(name, freezing, tmp_path, data_root):
    spec = study.load_study(ROOT / "studies" / f"{name}.py")
    study.main([str(ROOT / "studies" / f"{name}.py"), "--quick", "--out", str(tmp_path),
                f"--towers={freezing / 'towers'}", f"--data_root={data_root}"])
    results = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert list(results) == list(spec["variants"])
    assert all(set(seeds["0"]["metrics"]) == set(spec["tasks"]) for seeds in results.values())


# -----------------------------------------------------------------------------
# Plots


def test_without_matplotlib_the_tables_are_still_written(freezing, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    spec = study.load_study(ROOT / "studies" / "synthetic_freezing.py")
    out = tmp_path / "results"
    out.mkdir()
    study.write_results(spec, study.plan(spec, freezing, quick=True), out, "synthetic_freezing.py")
    assert "matplotlib is not installed: tables written, plots skipped" in capsys.readouterr().out
    assert (out / "results.md").is_file() and (out / "results.json").is_file() and not list(out.glob("*.png"))


def test_plots_with_matplotlib(freezing, tmp_path):
    pytest.importorskip("matplotlib")
    spec = study.load_study(ROOT / "studies" / "synthetic_freezing.py")
    out = tmp_path / "results"
    out.mkdir()
    study.write_results(spec, study.plan(spec, freezing, quick=True), out, "synthetic_freezing.py")
    assert {p.name for p in out.glob("*.png")} == {"training_curves.png", "nlvr2_nlvr2_acc.png",
                                                   "snli_ve_snli_ve_acc.png", "refcoco_refcoco_acc.png",
                                                   "retrieval_coco_tr_r1.png", "retrieval_coco_ir_r1.png",
                                                   "trainable_share.png"}
