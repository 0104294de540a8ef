"""Faults, end to end through pretrain.py: a run killed with SIGKILL at any moment (during a step, during a
checkpoint write) and started again with the same command ends bit-identical to an uninterrupted one; a rank
dying under torchrun --max-restarts=1 makes the group restart and finish; bad images are skipped and reported
(or stop the run with strict_images); bad annotations and impossible configs fail in one line before any work;
a numerical blow-up stops without a new checkpoint (float16 skips and counts); checkpoints load weights-only
and only into the architecture that wrote them.

The runs share one corrupted synthetic corpus (a missing image, a truncated JPEG, a file that is no image) and
run on one thread: the two cores are shared with other subprocesses, and one thread in every process keeps
in-process and subprocess runs bit-comparable."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

import batching
import data
import engine
import pretrain
import processes
import world
from config import Config, main_guard
from test_engine import FakeLoader, TinyRegressor, prepare_batch, single_process, tiny_config

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--corpora=synthetic", "--tokenizer=synthetic", "--synthetic_images=16", "--synthetic_image_size=32",
    "--image_size=32", "--text_tower=bert", "--vision_tower=vit", "--text_hidden_size=32", "--text_layers=2",
    "--text_heads=2", "--text_mlp_ratio=2", "--vision_hidden_size=32", "--vision_layers=2", "--vision_heads=2",
    "--vision_mlp_ratio=2", "--patch_size=8", "--cross_layers=2", "--cross_hidden=32", "--cross_heads=2",
    "--cross_mlp_ratio=2", "--max_text_len=16", "--batch_size=8", "--micro_batch_size=4", "--warmup_steps=2",
    "--lr=1e-3", "--eval_batches=1", "--device=cpu",
    "--text_dropout=0.1", "--vision_dropout=0.1", "--cross_dropout=0.1",  # dropout on: resume must restore RNGs
]
# Runs that must be refused before any work get a few steps, not the default hundred thousand: were the refusal
# to stop working, the test fails in seconds instead of training for hours
REFUSED_RUN = ["--max_steps=2", "--num_workers=0"]
# 16 steps, a checkpoint every 4 (the newest 2 kept): the run the SIGKILL test interrupts
KILL_RUN = ["--max_steps=16", "--ckpt_interval=4", "--log_interval=2", "--eval_interval=8", "--keep_checkpoints=2",
            "--num_workers=0"]
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

# pretrain.py with faults injected, run as `python faulty_pretrain.py ARGS` in place of `python pretrain.py ARGS`
FAULTY_PRETRAIN = f"""
import io, os, signal, sys, time
sys.path.insert(0, {str(REPO)!r})
import torch
import pretrain
from config import main_guard

if os.environ.get("SLOW_SAVE"):  # write each checkpoint in two halves with a pause, so a kill can land mid-write
    real_save = torch.save

    def slow_save(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        payload = buffer.getvalue()
        f.write(payload[:len(payload) // 2])
        f.flush()
        time.sleep(0.2)
        f.write(payload[len(payload) // 2:])

    torch.save = slow_save

if os.environ.get("RANK") == os.environ.get("KILL_RANK") and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    make_prepare_batch = pretrain.make_prepare_batch

    def make_dying(*args):  # on torchrun's first attempt this rank SIGKILLs itself as it starts step KILL_AT_STEP
        prepare = make_prepare_batch(*args)

        def prepare_or_die(batch, step, micro_index):
            if step == int(os.environ["KILL_AT_STEP"]):
                print(f"rank {{os.environ['RANK']}} SIGKILLs itself at {{time.time():.3f}}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return prepare(batch, step, micro_index)

        return prepare_or_die

    pretrain.make_prepare_batch = make_dying

main_guard(lambda: pretrain.main(sys.argv[1:]))
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def world_config(data_root):
    return Config(data_root=str(data_root), corpora=["synthetic"], synthetic_images=16,
                         synthetic_image_size=32, image_size=32)


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    world.ensure_synthetic_world(world_config(root))
    return root


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory, clean_root):
    """The synthetic world with three broken training images; returns (data_root, their paths)."""
    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(clean_root / "synthetic", root / "synthetic")
    world = root / "synthetic"
    missing = world / "coco/train2014/COCO_train2014_000000000002.jpg"
    missing.unlink()
    truncated = world / "vg/images/VG_100K/5.jpg"
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
    not_an_image = world / "coco/train2014/COCO_train2014_000000000009.jpg"
    not_an_image.write_text("<html>404 Not Found</html>")
    return root, {str(missing), str(truncated), str(not_an_image)}


def training_set(data_root):
    cfg = world_config(data_root)
    return data.build_pretrain_datasets(cfg, data.build_transform(cfg))[0]


def bad_items(data_root, indices=None):
    """Messages of the training items of data_root whose image is bad (all, or those at `indices`)."""
    train = training_set(data_root)
    items = (data.load_or_mark(train.__getitem__, i) for i in (range(len(train)) if indices is None else indices))
    return [item[data.BAD_IMAGE] for item in items if data.BAD_IMAGE in item]


def read_log(out_dir, drop=("samples_per_sec",)):
    lines = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in drop} for line in lines]


def checkpoints(out_dir):
    return sorted((p.name for p in Path(out_dir).glob("ckpt_*.pt")), key=lambda name: int(name[5:-3]))


def assert_complete_and_finite(out_dir):
    """Every checkpoint a reader can see loads weights-only, whole, with finite weights."""
    for name in checkpoints(out_dir):
        ckpt = torch.load(Path(out_dir) / name, weights_only=True)
        assert ckpt["step"] == int(name[5:-3])
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point()), name


def guarded_main(args):
    """pretrain.py's main as the command line runs it, expected to fail: its exit status."""
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: pretrain.main(args))
    return exit_info.value.code


def wait_for(condition, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"run ended (status {process.returncode}) before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)


def logged_steps(out_dir):
    path = Path(out_dir) / "log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line being written right now
            pass
    return steps


# ----------------------------------------------------------------------------------------------------
# Killed at any moment

@pytest.fixture(scope="module")
def killed_and_straight(tmp_path_factory, bad_root):
    """The same run once straight through (in this process), and once as `python faulty_pretrain.py ...` killed
    with SIGKILL three times (during a checkpoint write, during a random step, at a random moment) and started
    again with the same command each time until it finishes. Returns (straight out_dir, killed out_dir,
    [(kill point, checkpoints left)])."""
    data_root, _ = bad_root
    tmp = tmp_path_factory.mktemp("kill")
    script = tmp / "faulty_pretrain.py"
    script.write_text(FAULTY_PRETRAIN)
    straight, killed = tmp / "straight", tmp / "killed"
    common = TINY + KILL_RUN + [f"--data_root={data_root}"]
    rng = random.Random(6)
    kills, started = [], []

    def start(command, output, **env):
        with open(tmp / output, "w") as out:
            started.append(subprocess.Popen(command, cwd=REPO, env=dict(SUBPROCESS_ENV, **env), stdout=out,
                                              stderr=subprocess.STDOUT))
        return started[-1]

    def start_killed():
        return start([sys.executable, str(script), *common, f"--out_dir={killed}"], f"killed_{len(kills)}.txt",
                     SLOW_SAVE="1")

    def resumed():
        return "resumed from" in (tmp / f"killed_{len(kills)}.txt").read_text()

    def temp_files():
        return [n for n in os.listdir(killed) if n.endswith(".tmp")] if killed.exists() else []

    def kill(process, point):
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        kills.append((point, checkpoints(killed)))
        assert_complete_and_finite(killed)  # readers only ever see complete checkpoints

    pretrain.main(common + [f"--out_dir={straight}"])
    try:
        # 1. while ckpt_8.pt is being written: its temp file exists, half full; the name does not
        process = start_killed()
        wait_for(lambda: any(n.startswith(".ckpt_8.pt.") for n in temp_files()), process)
        kill(process, "writing ckpt_8.pt")
        assert checkpoints(killed) == ["ckpt_4.pt"]
        # 2. during a random step after the resume, a random few milliseconds after the line before it
        process = start_killed()
        step = rng.randint(5, 10)
        wait_for(lambda: resumed() and max(logged_steps(killed), default=0) >= step, process)
        time.sleep(rng.uniform(0.0, 0.05))
        kill(process, f"{step} steps in")
        # 3. at a random moment of the resumed run: in a step, an evaluation or a save (8 steps at least remain)
        process = start_killed()
        wait_for(resumed, process)
        time.sleep(rng.uniform(0.0, 0.5))
        assert process.poll() is None, "the run ended before the random kill"
        kill(process, "at random")
        # 4. the same command once more runs to the end
        assert start_killed().wait(timeout=240) == 0, (tmp / f"killed_{len(kills)}.txt").read_text()[-3000:]
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=60)
    return straight, killed, kills


def test_sigkill_at_any_moment_resumes_bit_identical(killed_and_straight):
    """Also the reproducibility check: four processes and this one, same config and seed, same bits."""
    straight, killed, kills = killed_and_straight
    assert len(kills) == 3
    assert checkpoints(killed) == checkpoints(straight) == ["ckpt_12.pt", "ckpt_16.pt"]  # keep_checkpoints=2
    assert not [n for n in os.listdir(killed) if n.endswith(".tmp")]  # the cut-short save was cleared
    umask = os.umask(0)
    os.umask(umask)
    assert (killed / "ckpt_16.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # readable like the run's other files
    a = torch.load(straight / "ckpt_16.pt", weights_only=True)
    b = torch.load(killed / "ckpt_16.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the log reads as one uninterrupted run: the steps redone after each resume replaced, not repeated
    assert read_log(killed) == read_log(straight)
    assert [r["step"] for r in read_log(killed) if "split" not in r] == list(range(2, 17, 2))


def test_the_run_records_versions_and_commit(killed_and_straight):
    _, killed, _ = killed_and_straight
    info = json.loads((killed / "run_info.json").read_text())
    assert info["torch"] == torch.__version__
    assert all(info[p] == metadata.version(p) for p in ("transformers", "torchvision", "numpy", "pillow"))
    head = processes.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], timeout=60)
    assert info["git_commit"] == head.stdout.strip() and info["git_commit"]


# ----------------------------------------------------------------------------------------------------
# Rank failure

def test_a_dying_rank_makes_torchrun_restart_the_group_from_the_last_checkpoint(tmp_path, bad_root):
    data_root, _ = bad_root
    script = tmp_path / "faulty_pretrain.py"
    script.write_text(FAULTY_PRETRAIN)
    # micro-batches of 2: each process needs one of the 5 held-out samples
    args = TINY + [f"--data_root={data_root}", f"--out_dir={tmp_path / 'run'}", "--max_steps=10", "--batch_size=4",
                   "--micro_batch_size=2", "--ckpt_interval=2", "--log_interval=2", "--eval_interval=100",
                   "--num_workers=0"]
    # rank 1 dies as step 6 starts, after ckpt_4. Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, torch 2.14's
    # torchrun hands the restarted group the store of the dead one, and its gloo connect fails or hangs
    env = dict(SUBPROCESS_ENV, KILL_RANK="1", KILL_AT_STEP="5", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    torchrun = processes.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "--max-restarts=1", str(script), *args], timeout=240, cwd=REPO, env=env)
    stdout, stderr = torchrun.stdout, torchrun.stderr
    assert torchrun.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "rank 1 SIGKILLs itself" in stdout and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in stderr
    assert f"resumed from {tmp_path / 'run' / 'ckpt_4.pt'} at step 4" in stdout
    assert checkpoints(tmp_path / "run") == ["ckpt_8.pt", "ckpt_10.pt"]
    assert_complete_and_finite(tmp_path / "run")
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log if "split" not in r] == [2, 4, 6, 8, 10]
    # the skipped images of both ranks reach the log: 10 steps x 4 samples, the first 20 global micro-batches
    sampler = batching.MicroBatchSampler(len(training_set(data_root)), 2, rank=0, world_size=1, seed=Config().seed)
    first_samples = [i for batch in list(sampler)[:20] for i in batch]
    expected = bad_items(data_root, first_samples)
    assert sum(r.get("skipped_images", 0) for r in log) == len(expected) > 0  # met by rank 0 and by rank 1
    assert {m for r in log for m in r.get("bad_images", [])} == set(expected)


# ----------------------------------------------------------------------------------------------------
# Bad images

def test_bad_images_are_skipped_counted_and_named(tmp_path, bad_root, capsys):
    data_root, bad_paths = bad_root
    expected = bad_items(data_root)
    assert {m.split(": ")[0] for m in expected} == bad_paths
    # about one epoch: its micro-batches of 4 (the tail that fills none is left out), two a step, each bad item met
    # as often as the sampler draws it; a DataLoader worker opens the images, the main process counts
    sampler = batching.MicroBatchSampler(len(training_set(data_root)), 4, rank=0, world_size=1, seed=Config().seed)
    steps = sampler.batches_per_epoch // 2
    met = bad_items(data_root, [i for batch in list(sampler)[:2 * steps] for i in batch])
    pretrain.main(TINY + [f"--data_root={data_root}", f"--out_dir={tmp_path}", f"--max_steps={steps}",
                          f"--log_interval={steps}", "--eval_interval=100", "--ckpt_interval=100", "--num_workers=1"])
    log = read_log(tmp_path)
    assert log[-1]["step"] == steps and checkpoints(tmp_path) == [f"ckpt_{steps}.pt"]  # trained to the end
    assert sum(r.get("skipped_images", 0) for r in log) == len(met)
    reported = {m for r in log for m in r.get("bad_images", [])}
    assert reported <= set(met) and {m.split(": ")[0] for m in reported} == bad_paths
    why = {Path(path).name: reason for path, reason in (m.split(": ", 1) for m in reported)}
    assert why["COCO_train2014_000000000002.jpg"] == "image file not found"
    assert why["COCO_train2014_000000000009.jpg"] == "not an image (no known format)"
    assert why["5.jpg"].startswith("unreadable image (") and "runcated" in why["5.jpg"]  # PIL's words vary
    console = capsys.readouterr().out
    assert "skipped_images" in console and any(path in console for path in bad_paths)


def test_strict_images_stops_at_the_first_bad_image_with_its_path(tmp_path, bad_root, capsys):
    data_root, bad_paths = bad_root
    status = guarded_main(TINY + [f"--data_root={data_root}", f"--out_dir={tmp_path}", "--max_steps=18",
                                  "--num_workers=1", "--strict_images=true"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1
    assert error[0].startswith("error: ") and "strict_images=True" in error[0]
    assert any(error[0].startswith(f"error: {path}: ") for path in bad_paths)
    assert checkpoints(tmp_path) == []


# ----------------------------------------------------------------------------------------------------
# Bad annotations and bad configs: one line, status 2, nothing written

def break_karpathy(world, how):
    path = world / "coco/karpathy/dataset_coco.json"
    annotation = json.loads(path.read_text())
    if how == "malformed":  # a colon lost on one line of a pretty-printed file
        lines = json.dumps(annotation, indent=1).splitlines()
        broken = [i for i, line in enumerate(lines) if '"split": ' in line][3]
        lines[broken] = lines[broken].replace('"split": ', '"split" ')
        path.write_text("\n".join(lines))
        return rf"dataset_coco\.json: malformed JSON at line {broken + 1} column \d+"
    if how == "missing field":
        del annotation["images"][2]["sentences"][1]["raw"]
        pattern = r"dataset_coco\.json: images\[2\]\.sentences\[1\] has no field 'raw'"
    else:  # a split outside the label set
        annotation["images"][5]["split"] = "trian"
        pattern = r"dataset_coco\.json: images\[5\]\.split is 'trian', expected one of"
    path.write_text(json.dumps(annotation))
    return pattern


@pytest.mark.parametrize("how", ["malformed", "missing field", "unknown split"])
def test_bad_annotations_name_file_line_and_field(tmp_path, clean_root, capsys, how):
    shutil.copytree(clean_root / "synthetic", tmp_path / "data" / "synthetic")
    pattern = break_karpathy(tmp_path / "data" / "synthetic", how)
    status = guarded_main(TINY + REFUSED_RUN + [f"--data_root={tmp_path / 'data'}", f"--out_dir={tmp_path / 'run'}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1
    assert re.search(pattern, error[0]), error[0]
    assert not (tmp_path / "run").exists()  # no training on a partial dataset


@pytest.mark.parametrize("args, message", [
    (["--max_step=3"], "unknown config key 'max_step' (did you mean 'max_steps'?)"),
    (["--lr=fast"], "config key 'lr' expects float, got 'fast'"),
    (["--batch_size=10"], "batch_size=10 is not divisible by micro_batch_size=4 x world_size=1"),
    (["--mlm_weight=0", "--itm_weight=0"], "mlm_weight=0 and itm_weight=0 leave no pretraining loss"),
    (["--freeze_text=true", "--freeze_vision=true", "--freeze_cross=true", "--freeze_modules=mlm_head,itm_head"],
     "nothing to train: every parameter is frozen"),
])
def test_impossible_configs_are_refused_before_any_work(tmp_path, capsys, args, message):
    status = guarded_main(TINY + REFUSED_RUN + [f"--data_root={tmp_path / 'data'}", f"--out_dir={tmp_path / 'run'}",
                                                *args])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1 and message in error[0], error
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()  # no world generated, no run dir


def test_resume_false_over_an_existing_run_is_refused_untouched(killed_and_straight, bad_root, capsys):
    straight, *_ = killed_and_straight
    before = {p.name: p.read_bytes() for p in straight.iterdir()}
    status = guarded_main(TINY + KILL_RUN + [f"--data_root={bad_root[0]}", f"--out_dir={straight}", "--resume=false"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and error == [f"error: out_dir={straight} already holds checkpoints and resume=False: "
                                     "pick a new out_dir"]
    assert {p.name: p.read_bytes() for p in straight.iterdir()} == before


# ----------------------------------------------------------------------------------------------------
# Numerical blow-up

def test_blow_up_stops_with_one_line_and_saves_nothing_new(tmp_path, clean_root, capsys):
    status = guarded_main(TINY + [f"--data_root={clean_root}", f"--out_dir={tmp_path}", "--lr=1e6", "--max_steps=6",
                                  "--ckpt_interval=1", "--log_interval=1", "--num_workers=0"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 3 and len(error) == 1
    assert error[0].startswith("error: non-finite loss") and "at step 2: stopping without a new checkpoint" in error[0]
    assert checkpoints(tmp_path) == ["ckpt_1.pt"]
    assert_complete_and_finite(tmp_path)


def test_float16_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    """The float16 path on CPU: the real loop with a real (CPU) GradScaler; only the autocast context, which
    CPU float16 lacks, is left out. Step 3's gradient is NaN: the scaler skips it, the log counts it."""
    monkeypatch.setattr(engine, "autocast_context", lambda device, dtype: torch.autocast("cpu", enabled=False))
    cfg = tiny_config(tmp_path, dtype="float16", ckpt_interval=2, log_interval=4)
    model = TinyRegressor()

    def poisoned(raw, step, micro_index):
        batch = prepare_batch(raw, step, micro_index)
        if step == 2:
            batch["y"] = batch["y"] * float("nan")
        return batch

    engine.train(cfg, single_process(), model, FakeLoader(cfg.micro_batch_size), poisoned)
    log = read_log(tmp_path)
    assert [(r["step"], r["skipped_steps"]) for r in log] == [(4, 1), (8, 0)]
    assert checkpoints(tmp_path) == ["ckpt_6.pt", "ckpt_8.pt"]
    assert_complete_and_finite(tmp_path)
    scaler = torch.load(tmp_path / "ckpt_8.pt", weights_only=True)["scaler"]
    assert scaler["scale"] == 2.0 ** 16 / 2  # lowered once, for the skipped step


def test_optimizer_step_skips_or_stops_before_changing_anything():
    model = TinyRegressor()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    for scaler in (torch.amp.GradScaler("cpu", enabled=True), torch.amp.GradScaler("cpu", enabled=False)):
        optimizer = torch.optim.AdamW(params, lr=0.1)
        loss = model({"x": torch.randn(4, 4), "y": torch.full((4,), float("inf"))})["loss"]
        scaler.scale(loss).backward()
        if scaler.is_enabled():
            assert engine.optimizer_step(optimizer, scaler, params, 1.0, loss.detach(), step=0)[1] is True
        else:
            with pytest.raises(FloatingPointError, match="at step 1: stopping without a new checkpoint"):
                engine.optimizer_step(optimizer, scaler, params, 1.0, loss.detach(), step=0)
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------
# Loading checkpoints safely

def test_a_checkpoint_of_another_architecture_is_refused_listing_keys(killed_and_straight, bad_root, tmp_path,
                                                                     capsys):
    straight, *_ = killed_and_straight
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    status = guarded_main(TINY + KILL_RUN + [f"--data_root={bad_root[0]}", f"--out_dir={run}", "--cross_layers=1",
                                             "--cross_hidden=16", "--max_steps=20"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1
    assert error[0].startswith(f"error: {run / 'ckpt_16.pt'} is from a different architecture: missing [], "
                               "unexpected ['encoder.cross_layers.1.")
    assert "other shape (checkpoint vs model) ['encoder.text_proj.weight (32, 32) vs (16, 32)'" in error[0]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # config.json of the run untouched


class CodeInPickle:
    """Unpickling this runs os.makedirs(path): what a tampered checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_a_checkpoint_that_would_run_code_is_refused(killed_and_straight, bad_root, tmp_path, capsys):
    straight, *_ = killed_and_straight
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    tampered = torch.load(run / "ckpt_16.pt", weights_only=True)
    tampered["step"] = 17
    tampered["payload"] = CodeInPickle(str(tmp_path / "code_ran"))
    torch.save(tampered, run / "ckpt_17.pt")
    status = guarded_main(TINY + KILL_RUN + [f"--data_root={bad_root[0]}", f"--out_dir={run}", "--max_steps=20"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1
    assert error[0].startswith(f"error: {run / 'ckpt_17.pt'}: refused by the weights-only loader: ")
    assert "os.makedirs" in error[0]
    assert not (tmp_path / "code_ran").exists()
