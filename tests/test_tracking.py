"""Experiment tracking and progress bars: TensorBoard and W&B mirror log.jsonl when asked for and are refused
in one line at start-up when their package is missing; the tqdm progress bar shows only on a terminal and on
rank 0."""

import importlib.machinery
import importlib.util
import io
import json
import os
import sys
import types

import pytest

import engine
import files
import pretrain
import world
from config import ConfigError, load_config, main_guard

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

RUN = ["--corpora=synthetic", "--tokenizer=synthetic", "--synthetic_images=64", "--synthetic_image_size=32",
       "--image_size=32", "--text_tower=bert", "--vision_tower=vit", "--text_hidden_size=32", "--text_layers=1",
       "--text_heads=2", "--text_mlp_ratio=2", "--vision_hidden_size=32", "--vision_layers=1", "--vision_heads=2",
       "--vision_mlp_ratio=2", "--patch_size=8", "--cross_layers=1", "--cross_hidden=32", "--cross_heads=2",
       "--cross_mlp_ratio=2", "--max_text_len=16", "--batch_size=4", "--micro_batch_size=4", "--max_steps=3",
       "--warmup_steps=1", "--num_workers=0", "--log_interval=1", "--eval_interval=2", "--eval_batches=1",
       "--ckpt_interval=2", "--device=cpu"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def log_lines(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def test_tracked_scalars_split_train_and_evaluation_lines():
    assert engine.tracked_scalars({"step": 4, "loss": 2.5, "skipped_images": 1, "bad_images": ["a.jpg: gone"],
                                   "lr": 1e-3}) == {"train/loss": 2.5, "train/skipped_images": 1.0, "train/lr": 1e-3}
    assert engine.tracked_scalars({"step": 4, "split": "val", "itm_acc": 0.75}) == {"val/itm_acc": 0.75}


def test_missing_tracker_package_stops_at_start_up_in_one_line(tmp_path, data_root, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "wandb") else real_find_spec(name, *a))
    for tracker in ("tensorboard", "wandb"):
        out = tmp_path / tracker
        with pytest.raises(SystemExit) as exit_status:
            main_guard(lambda: pretrain.main(RUN + [f"--data_root={data_root}", f"--out_dir={out}",
                                                           f"--trackers={tracker}"]))
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_status.value.code == 2 and len(lines) == 1, lines
        assert f"needs the {tracker} package" in lines[0] and "pip install" in lines[0]
        assert not out.exists()  # refused before any work
    with pytest.raises(ConfigError, match="'mlflow' is not one of tensorboard, wandb"):
        load_config(["--trackers=mlflow"])
    assert load_config([]).trackers == []  # no tracker, no package needed


class FakeWandb(types.ModuleType):
    """Records what the trainer asks of the wandb package: init's arguments, logged rows, finish."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits, self.rows, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, row, step):
        self.rows.append((step, row))

    def finish(self):
        self.finished += 1


def test_wandb_gets_every_log_line_and_a_resumed_run_continues_its_run(tmp_path, data_root, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = str(tmp_path / "run")
    args = RUN + [f"--data_root={data_root}", f"--out_dir={out}", "--trackers=wandb", "--wandb_project=tiny"]
    pretrain.main(args)
    assert wandb.rows == [(r["step"], engine.tracked_scalars(r)) for r in log_lines(out)]
    assert {"train/loss", "train/mlm_loss", "train/lr"} <= set(wandb.rows[0][1])
    assert any("val/itm_acc" in row for _, row in wandb.rows)
    init = wandb.inits[0]
    assert init["project"] == "tiny" and init["config"]["max_steps"] == 3 and wandb.finished == 1
    pretrain.main(args + ["--max_steps=4"])  # resumes from the step-3 checkpoint
    assert wandb.inits[1]["id"] == init["id"] == open(os.path.join(out, "wandb_id")).read()
    assert wandb.rows[-1][0] == 4


def test_tensorboard_events_read_back(tmp_path, data_root):
    """Each scalar at its step, as in log.jsonl; a run resumed from an older checkpoint first purges the events
    logged after it (as log.jsonl drops those lines), so no step appears twice. tensorboard comes from
    requirements-extras.txt, which the README's test command installs: this test runs, never skips."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "run")
    args = RUN + [f"--data_root={data_root}", f"--out_dir={out}", "--trackers=tensorboard"]
    pretrain.main(args)
    os.remove(os.path.join(out, "ckpt_3.pt"))
    pretrain.main(args)  # resumes at step 2 and logs step 3 again
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    lines = log_lines(out)
    assert [r["step"] for r in lines if "split" not in r] == [1, 2, 3]
    for tag in ("train/loss", "train/itm_acc", "val/mlm_acc"):
        split, name = tag.split("/")
        expected = [(r["step"], r[name]) for r in lines if r.get("split", "train") == split]
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == [step for step, _ in expected], tag
        assert [e.value for e in scalars] == pytest.approx([value for _, value in expected], rel=1e-6), tag


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stderr, rank, enabled, shown", [
    (Terminal(), "0", True, True),
    (io.StringIO(), "0", True, False),  # a log file or a pipe: no carriage-return noise
    (Terminal(), "1", True, False),  # other ranks stay quiet
    (Terminal(), "0", False, False),
])
def test_progress_bar_only_on_a_terminal_on_rank_0(stderr, rank, enabled, shown, monkeypatch):
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setenv("RANK", rank)
    assert list(files.progress(iter(range(7)), 7, "synthetic world", enabled=enabled)) == list(range(7))
    assert ("synthetic world" in stderr.getvalue() and "7/7" in stderr.getvalue()) == shown
    if not shown:
        assert stderr.getvalue() == ""


def test_long_steps_show_the_progress_bar(tmp_path, monkeypatch):
    """Generating the synthetic world draws its bar (the feature cache and shard indexing call the same helper)."""
    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.delenv("RANK", raising=False)
    world.generate_synthetic_world(tmp_path / "world", 8, seed=0, image_size=32)
    assert "synthetic world" in stderr.getvalue() and "8/8" in stderr.getvalue()
