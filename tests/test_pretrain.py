"""pretrain.py end to end on the synthetic world: run directory, exact resume, one process vs two, loss
weights and learning-rate multipliers, the schedule in optimizer steps, and clear failures offline."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import batching
import data
import engine
import pretrain
import processes
from config import ConfigError, load_config
from encoders import build_encoder
from model import PretrainModel, apply_freezing, build_pretrain_model
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
    cfg = load_config(TINY_RUN)
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


LOSSES = ("loss", "mlm_loss", "itm_loss", "mlm_acc", "itm_acc")
SAME_GLOBAL_BATCH = TINY_RUN + NO_DROPOUT + ["--eval_interval=100"]  # 6 steps of 8, checkpoints at 3 and 6


def assert_same_losses(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for r1, r2 in zip(a, b):
        for name in LOSSES:
            assert r2[name] == pytest.approx(r1[name], rel=1e-4, abs=1e-6), (r1["step"], name)


@pytest.fixture(scope="module")
def one_process_run(data_root, tmp_path_factory):
    """One process accumulating two micro-batches of 4 per step: the log the multi-process runs must match."""
    out = str(tmp_path_factory.mktemp("one"))
    subprocess.run([sys.executable, "pretrain.py", *SAME_GLOBAL_BATCH, f"--data_root={data_root}", f"--out_dir={out}"],
                   cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, capture_output=True, timeout=600)
    return read_log(out)[0]


def test_one_process_equals_two(tmp_path, data_root, one_process_run):
    """The same global batch of 8: one process accumulating two micro-batches of 4, or two torchrun processes
    (gloo) with one each, give the same losses."""
    two = str(tmp_path / "two")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "pretrain.py", *SAME_GLOBAL_BATCH, f"--data_root={data_root}", f"--out_dir={two}"], cwd=ROOT,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, capture_output=True, timeout=600)
    assert len(one_process_run) == 6
    assert_same_losses(one_process_run, read_log(two)[0])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_process_and_resume_on_one(tmp_path, data_root, one_process_run):
    """Two torchrun launchers as two "nodes" on localhost (c10d rendezvous, one process each, as README's
    two-node launch line) give the losses of one process with the same global batch; the two-node run's step-3
    checkpoint then resumes on one process and continues exactly as the run went on (the loader restarts at
    the first global micro-batch nobody has consumed)."""
    two_nodes = str(tmp_path / "two_nodes")
    port = free_port()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two_nodes",
         "pretrain.py", *SAME_GLOBAL_BATCH, f"--data_root={data_root}", f"--out_dir={two_nodes}"],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for node in (0, 1)]
    try:
        outputs = [launcher.communicate(timeout=600)[0].decode() for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs
    assert "world size 2" in "".join(outputs)
    assert_same_losses(one_process_run, read_log(two_nodes)[0])

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(Path(two_nodes) / "ckpt_3.pt", resumed)
    shutil.copy(Path(two_nodes) / "log.jsonl", resumed)
    done = subprocess.run([sys.executable, "pretrain.py", *SAME_GLOBAL_BATCH, f"--data_root={data_root}",
                           f"--out_dir={resumed}"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "checkpoint from 2 processes, now 1" in done.stdout
    assert_same_losses(one_process_run, read_log(resumed)[0])


def test_slurm_script_starts_one_launcher_per_node(tmp_path):
    """scripts/slurm_pretrain.sh run as SLURM would run it, with srun and scontrol stubbed: one task per node,
    each a torchrun launcher of the job's node count and GPUs, meeting on the first node, with pretrain.py's
    arguments passed through."""
    script = (ROOT / "scripts" / "slurm_pretrain.sh").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, re.M))
    assert sbatch["ntasks-per-node"] == "1" and int(sbatch["nodes"]) >= 2
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text('#!/bin/bash\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    (stubs / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path / "srun_args"}\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu[07-08]",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="4")
    subprocess.run(["bash", "scripts/slurm_pretrain.sh", "configs/freeze_vision.py", "--data_root=/data"], cwd=ROOT,
                   env=env, check=True, timeout=60)
    launched = (tmp_path / "srun_args").read_text().splitlines()
    assert launched == ["torchrun", "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
                        "--rdzv_endpoint=gpu07:29500", "--rdzv_id=4242", "pretrain.py", "configs/freeze_vision.py",
                        "--data_root=/data"]


def test_compiling_pads_captions_to_max_text_len():
    """With compile=True every batch has the same text length, so a compiled model sees one shape."""
    items = [{"caption": caption, "image": torch.zeros(3, 4, 4), "image_id": i}
             for i, caption in enumerate(["a red circle", "a small blue square left of a green triangle"])]
    tokenizer = data.synthetic_tokenizer()
    plain = batching.PretrainCollator(tokenizer, max_text_len=16)(items)
    fixed = batching.PretrainCollator(tokenizer, max_text_len=16, fixed_length=True)(items)
    assert plain["input_ids"].shape[1] < 16 and fixed["input_ids"].shape == (2, 16)
    assert torch.equal(fixed["input_ids"][:, :plain["input_ids"].shape[1]], plain["input_ids"])
    assert fixed["special_tokens_mask"][:, plain["input_ids"].shape[1]:].all()


@pytest.mark.parametrize("pretrain_pass", ["separate", "shared"])
def test_prepared_batches_carry_the_positions_their_pass_reads(pretrain_pass):
    """The MLM positions come with the batch, from the host: every labelled one, or those of matched pairs in the
    shared pass."""
    cfg = tiny_config(pretrain_pass=pretrain_pass, mlm_prob=0.5, itm_neg_prob=0.5)
    B, T = 8, 10
    special = torch.zeros(B, T, dtype=torch.bool)
    special[:, [0, -1]] = True
    raw = dict(input_ids=torch.randint(5, 60, (B, T)), attention_mask=torch.ones(B, T, dtype=torch.long),
               special_tokens_mask=special, word_ids=(torch.arange(T) - 1).expand(B, T).masked_fill(special, -1),
               image_ids=torch.arange(B), pixel_values=torch.zeros(B, 3, 4, 4, dtype=torch.uint8))
    info = data.TokenizerInfo(mask_token_id=4, vocab_size=60, special_ids=(0, 1, 2, 3, 4))
    batch = pretrain.make_prepare_batch(cfg, info, torch.device("cpu"))(raw, 0, 0)
    labelled = batch["mlm_labels"] != -100
    matched = batch["itm_labels"][:, None] == 1
    assert (labelled & ~matched).any() and (labelled & matched).any()  # both kinds of rows are there
    read = labelled & matched if pretrain_pass == "shared" else labelled
    assert batch["mlm_positions"].tolist() == read.flatten().nonzero().squeeze(1).tolist()


def test_loss_weights_are_applied():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_pretrain_model(cfg, 60)
    batch = dict(pixel_values=torch.randn(4, 3, 32, 32), input_ids=torch.randint(5, 60, (4, 6)),
                 attention_mask=torch.ones(4, 6, dtype=torch.long), mlm_input_ids=torch.randint(5, 60, (4, 6)),
                 mlm_labels=torch.full((4, 6), -100), itm_image_index=torch.tensor([1, 0, 2, 3]),
                 itm_labels=torch.tensor([0, 0, 1, 1]))
    batch["mlm_labels"][:, 3] = 9
    batch["mlm_positions"] = PretrainModel.mlm_positions(batch["mlm_labels"], batch["itm_labels"], "separate")
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


@pytest.mark.parametrize("stack", ["text", "vision"])
def test_one_tower_pretraining_runs_with_the_lr_multipliers_of_its_groups(stack, data_root, tmp_path):
    """A one-tower model has no cross-modal layers: lr_mult_cross from a config file (here freeze_none.py's 5.0,
    as every paper config inherits it) is left out, lr_mult_heads still applies."""
    config = tmp_path / "onetower.py"
    config.write_text(f'include("{ROOT / "configs" / "freeze_none.py"}")\nmodel_type = "one_tower"\n'
                      f'onetower_stack = "{stack}"\nlr_mult_heads = 3.0\n')
    out = tmp_path / "run"
    pretrain.main([str(config), *TINY_RUN, *NO_DROPOUT, f"--data_root={data_root}", f"--out_dir={out}",
                   "--max_steps=2", "--ckpt_interval=2", "--eval_interval=2", "--dtype=float32", "--num_workers=0"])
    train, val = read_log(out)
    assert [r["step"] for r in train] == [1, 2] and val
    groups = torch.load(out / "ckpt_2.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {(g["name"], g["lr_scale"]) for g in groups} == {("embeddings", 1.0), ("stack", 1.0), ("heads", 3.0)}


def test_lr_multiplier_of_a_missing_group_on_the_command_line_is_refused(data_root, tmp_path):
    model = build_pretrain_model(tiny_config(model_type="one_tower"), 50)
    assert engine.lr_scales(tiny_config(model_type="one_tower"), model) == {"heads": 5.0}
    two_tower = build_pretrain_model(tiny_config(lr_mult_cross=2.0), 50)
    assert engine.lr_scales(tiny_config(lr_mult_cross=2.0), two_tower, {"lr_mult_cross": 2.0}) == {
        "cross_modal": 2.0, "heads": 5.0}
    with pytest.raises(ConfigError, match="lr_mult_cross is set on the command line, but this one_tower "
                                                 "model has no 'cross_modal' group"):
        pretrain.main([*TINY_RUN, "--model_type=one_tower", "--lr_mult_cross=2", f"--data_root={data_root}",
                       f"--out_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()  # refused before any data work or output


PAPER_CONFIGS = ["freeze_none.py", "freeze_text.py", "freeze_vision.py", "freeze_both.py", "frozen_base.py",
                 "onetower_random.py", "onetower_bert.py", "onetower_vit.py"]


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_configs_fail_offline_with_one_line(config, tmp_path):
    """Offline, each paper config stops at the first thing it cannot load, naming it in one line."""
    with pytest.raises(ValueError) as err:
        pretrain.main([str(ROOT / "configs" / config), f"--data_root={tmp_path}", f"--out_dir={tmp_path / 'run'}",
                       "--max_steps=1"])  # were loading to succeed, one step, not the config's hundred thousand
    message = str(err.value)
    assert "\n" not in message and "could not load" in message
    assert any(name in message for name in ("electra", "bert-base-uncased", "vit-base"))
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_entry_point_exit_status_and_single_error_line(tmp_path):
    done = processes.run([sys.executable, "pretrain.py", "configs/freeze_vision.py", f"--data_root={tmp_path}",
                          "--micro_batch_sise=8", "--max_steps=1"], timeout=120, cwd=ROOT)
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
    # 96 held-out ITM pairs: at chance (0.5) the standard deviation is 0.051, so 0.65 is 2.9 of them above it. The
    # commonest caption word ("a") is 20% of the tokens. Seven training seeds (a CPU with other kernels follows
    # another trajectory, as a seed does) measured ITM 0.73-0.85 and MLM 0.55-0.71.
    _, val = read_log(out)
    assert val[-1]["itm_acc"] >= 0.65, val[-1]
    assert val[-1]["mlm_acc"] >= 0.45, val[-1]
