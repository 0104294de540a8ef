"""pretrain.py end to end on the synthetic world: run directory, exact resume, one process vs two, loss
weights and learning-rate multipliers, the schedule in optimizer steps, and clear failures offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
import pretrain
from model import PretrainModel, apply_freezing, build_encoder, build_pretrain_model
from tiny import tiny_config

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = [
    "--corpora=synthetic", "--tokenizer=synthetic", "--synthetic_images=64", "--synthetic_image_size=32",
    "--image_size=32", "--text_tower=bert", "--vision_tower=vit", "--text_hidden_size=32", "--text_layers=2",
    "--text_heads=2", "--text_mlp_ratio=2", "--vision_hidden_size=32", "--vision_layers=2", "--vision_heads=2",
    "--vision_mlp_ratio=2", "--patch_size=8", "--cross_layers=2", "--cross_hidden=32", "--cross_heads=2",
    "--cross_mlp_ratio=2", "--max_text_len=16", "--batch_size=8", "--micro_batch_size=4", "--max_steps=6",
    "--warmup_steps=2", "--lr=1e-3", "--num_workers=0", "--log_interval=1", "--eval_interval=3",
    "--eval_batches=2", "--ckpt_interval=3", "--device=cpu",
]
NO_DROPOUT = ["--text_dropout=0", "--vision_dropout=0", "--cross_dropout=0"]
WITH_DROPOUT = ["--text_dropout=0.1", "--vision_dropout=0.1", "--cross_dropout=0.1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def read_log(out_dir):
    lines = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return [r for r in lines if "split" not in r], [r for r in lines if r.get("split") == "val"]


def final_weights(out_dir, step):
    return torch.load(os.path.join(out_dir, f"ckpt_{step}.pt"), weights_only=True)["model"]


def test_run_directory_and_log(tmp_path, data_root):
    out = str(tmp_path / "run")
    pretrain.main(TINY_RUN + WITH_DROPOUT + [f"--data_root={data_root}", f"--out_dir={out}"])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["max_steps"] == 6 and config["corpora"] == ["synthetic"]
    info = json.load(open(os.path.join(out, "run_info.json")))
    assert info["torch"] == torch.__version__ and "transformers" in info and "git_commit" in info
    train, val = read_log(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        assert {"loss", "mlm_loss", "itm_loss", "lr", "samples_per_sec"} <= set(r)
        # the weights are applied: with both at 1 the total is their sum
        assert r["loss"] == pytest.approx(r["mlm_loss"] + r["itm_loss"], rel=1e-5)
    assert [r["step"] for r in val] == [3, 6]
    assert all({"mlm_acc", "itm_acc"} <= set(r) for r in val)
    # the schedule counts optimizer steps (two micro-batches each here), not micro-batches
    cfg = engine.load_config(TINY_RUN)
    assert [r["lr"] for r in train] == pytest.approx([engine.lr_at(s - 1, cfg) for s in range(1, 7)])
    assert sorted(p.name for p in Path(out).glob("ckpt_*.pt")) == ["ckpt_3.pt", "ckpt_6.pt"]


def crash_then_resume(args, crash_at, monkeypatch):
    """pretrain.main(args) crashing right after its step-`crash_at` checkpoint, then the same command again."""
    save = engine.save_checkpoint

    def save_then_crash(cfg, dist, step, *rest):
        path = save(cfg, dist, step, *rest)
        if step == crash_at:
            raise KeyboardInterrupt(f"simulated crash after the step-{crash_at} checkpoint")
        return path

    monkeypatch.setattr(engine, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(args)
    monkeypatch.setattr(engine, "save_checkpoint", save)
    pretrain.main(args)


def test_resume_is_exact(tmp_path, data_root, monkeypatch):
    """6 steps in one go == 3 steps, a crash, the same command again: same losses and weights, bit for bit
    (dropout on, so the restored RNG streams matter)."""
    args = TINY_RUN + WITH_DROPOUT + [f"--data_root={data_root}"]
    straight = str(tmp_path / "straight")
    pretrain.main(args + [f"--out_dir={straight}"])

    interrupted = str(tmp_path / "interrupted")
    crash_then_resume(args + [f"--out_dir={interrupted}"], 3, monkeypatch)

    a_train, a_val = read_log(straight)
    b_train, b_val = read_log(interrupted)
    key = lambda r: {k: v for k, v in r.items() if k != "samples_per_sec"}
    assert [key(r) for r in b_train] == [key(r) for r in a_train]
    assert b_val == a_val
    a, b = final_weights(straight, 6), final_weights(interrupted, 6)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_process_equals_two(tmp_path, data_root):
    """The same global batch of 8: one process accumulating two micro-batches of 4, or two torchrun processes
    (gloo) with one each, give the same losses."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = TINY_RUN + NO_DROPOUT + [f"--data_root={data_root}", "--max_steps=3", "--eval_interval=100"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, "pretrain.py", *args, f"--out_dir={one}"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "pretrain.py", *args, f"--out_dir={two}"], cwd=ROOT, env=env, check=True, capture_output=True)
    a, _ = read_log(one)
    b, _ = read_log(two)
    assert len(a) == len(b) == 3
    for r1, r2 in zip(a, b):
        for name in ("loss", "mlm_loss", "itm_loss", "mlm_acc", "itm_acc"):
            assert r2[name] == pytest.approx(r1[name], rel=1e-4, abs=1e-6), (r1["step"], name)


def test_loss_weights_are_applied():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_pretrain_model(cfg, 60)
    batch = dict(pixel_values=torch.randn(4, 3, 32, 32), input_ids=torch.randint(5, 60, (4, 6)),
                 attention_mask=torch.ones(4, 6, dtype=torch.long), mlm_input_ids=torch.randint(5, 60, (4, 6)),
                 mlm_labels=torch.full((4, 6), -100), itm_image_index=torch.tensor([1, 0, 2, 3]),
                 itm_labels=torch.tensor([0, 0, 1, 1]))
    batch["mlm_labels"][:, 3] = 9
    model.mlm_weight, model.itm_weight = 2.0, 0.5
    out = model(batch)
    assert out["loss"].item() == pytest.approx(2.0 * out["mlm_loss"].item() + 0.5 * out["itm_loss"].item())
    itm_only = PretrainModel(build_encoder(cfg, 60), 60, mlm_weight=0.0, itm_weight=1.0)
    out = itm_only(batch)
    assert "mlm_loss" not in out and itm_only.mlm_head is None
    out["loss"].backward()  # every parameter of the ITM-only model is used
    assert all(p.grad is not None for p in itm_only.parameters())


def test_learning_rate_multipliers_reach_the_optimizer():
    cfg = tiny_config(lr=1e-3, lr_mult_cross=5.0, lr_mult_heads=3.0, freeze_vision=True)
    model = build_pretrain_model(cfg, 60)
    apply_freezing(model, cfg)
    opt = engine.build_optimizer(model, cfg, {"cross_modal": cfg.lr_mult_cross, "heads": cfg.lr_mult_heads},
                                 verbose=False)
    engine.set_lr(opt, 1e-3)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"text_tower": 1e-3, "cross_modal": 5e-3, "heads": 3e-3})  # frozen vision: no group
    decay = {(g["name"], g["weight_decay"] > 0) for g in opt.param_groups}
    assert ("cross_modal", True) in decay and ("cross_modal", False) in decay


PAPER_CONFIGS = ["freeze_none.py", "freeze_text.py", "freeze_vision.py", "freeze_both.py", "frozen_base.py",
                 "onetower_random.py", "onetower_bert.py", "onetower_vit.py"]


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_configs_fail_offline_with_one_line(config, tmp_path):
    """Offline, each paper config stops at the first thing it cannot load, naming it in one line."""
    with pytest.raises(ValueError) as err:
        pretrain.main([str(ROOT / "configs" / config), f"--data_root={tmp_path}", f"--out_dir={tmp_path / 'run'}"])
    message = str(err.value)
    assert "\n" not in message and "could not load" in message
    assert any(name in message for name in ("electra", "bert-base-uncased", "vit-base"))
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_entry_point_exit_status_and_single_error_line(tmp_path):
    done = subprocess.run([sys.executable, "pretrain.py", "configs/freeze_vision.py", f"--data_root={tmp_path}",
                           "--micro_batch_sise=8"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "micro_batch_sise" in lines[0] and "micro_batch_size" in lines[0]


def test_short_pretraining_run_learns(tmp_path):
    """About a minute of CPU pretraining on the synthetic world: held-out ITM accuracy well above chance (0.5)
    and MLM accuracy far above picking the commonest word."""
    out = str(tmp_path / "run")
    pretrain.main([
        "--corpora=synthetic", "--tokenizer=synthetic", f"--data_root={tmp_path / 'data'}", f"--out_dir={out}",
        "--synthetic_images=400", "--synthetic_image_size=32", "--image_size=32", "--patch_size=8",
        "--text_tower=bert", "--text_hidden_size=64", "--text_layers=2", "--text_heads=2", "--text_mlp_ratio=2",
        "--vision_tower=vit", "--vision_hidden_size=64", "--vision_layers=2", "--vision_heads=2",
        "--vision_mlp_ratio=2", "--cross_layers=2", "--cross_hidden=64", "--cross_heads=2", "--cross_mlp_ratio=2",
        "--text_dropout=0", "--vision_dropout=0", "--cross_dropout=0", "--max_text_len=20",
        "--batch_size=32", "--micro_batch_size=32", "--max_steps=700", "--warmup_steps=50", "--lr=1e-3",
        "--lr_mult_cross=1", "--lr_mult_heads=1", "--num_workers=0", "--log_interval=100", "--eval_interval=700",
        "--eval_batches=4", "--ckpt_interval=700", "--device=cpu"])
    _, val = read_log(out)
    assert val[-1]["itm_acc"] >= 0.7, val[-1]
    assert val[-1]["mlm_acc"] >= 0.5, val[-1]
