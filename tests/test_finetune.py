"""finetune.py and evaluate.py end to end on the synthetic versions of the tasks (CPU, tiny models): fine-tuning
learns each vision-language task, weights load from a pretraining checkpoint at another image size with the
new head checked, freezing holds, unimodal tasks run through either model type, and evaluate.py writes
predictions and metrics files (the same on two processes as on one) and the results table."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BeitConfig, BeitModel

import batching
import data
import engine
import evaluate
import finetune
import processes
import tasks
from config import load_config
from model import build_pretrain_model, resize_position_embeddings
from tasks.common import unused_modules
from tasks.vqa import vqa_score
from tiny import TINY, tiny_config

ROOT = Path(__file__).resolve().parent.parent
WORLD = {"synthetic_task": True, "synthetic_images": 300, "synthetic_image_size": 32, "num_workers": 0}
TRAIN = {"batch_size": 32, "micro_batch_size": 32, "lr": 1e-3, "warmup_steps": 20, "lr_mult_cross": 1.0,
         "lr_mult_heads": 1.0, "log_interval": 10, "eval_batches": 1000, "keep_checkpoints": 1}


def args(**values):
    """--key=value arguments for finetune.main / evaluate.main from the tiny model, the test world and values; a
    value of None leaves its key off the command line."""
    merged = {**TINY, **WORLD, **TRAIN, **values}
    return [f"--{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in merged.items()
            if v is not None]


def run(data_root, out_dir, task, steps, **values):
    finetune.main(args(data_root=data_root, out_dir=out_dir, task=task, max_steps=steps, eval_interval=steps,
                       ckpt_interval=steps, **values))
    return read_log(out_dir)


def read_log(out_dir):
    lines = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return [r for r in lines if "split" not in r], [r for r in lines if "split" in r]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


# -----------------------------------------------------------------------------
# Learning: each vision-language task ends clearly above chance after a short run from scratch


def refcoco_chance(data_root):
    """Expected accuracy of picking a box at random, over the val sentences."""
    val = tasks.TASKS["refcoco"].eval_dataset(tiny_config(data_root=data_root, **WORLD), "val", lambda image: image)
    counts = np.diff(val.box_offsets)[val.item_image]  # (N,) boxes in each sentence's image
    return float(np.mean(1 / counts))


def vqa_majority(data_root, out_dir):
    """VQA score of answering every val question with the most frequent training answer."""
    cfg = tiny_config(data_root=data_root, **WORLD, vqa_min_answer_count=9)
    vocab = json.load(open(os.path.join(out_dir, "labels.json")))
    val = tasks.TASKS["vqa"].eval_dataset(cfg, "val2014", lambda image: image, vocab)
    return vqa_score([vocab[0]] * len(val), [val.human_answers(i) for i in range(len(val))])


def pretraining_checkpoint_from(run_dir, path):
    """A fine-tuned retrieval run saved as a pretraining checkpoint: its encoder, and its match head as the ITM
    head (mismatch logit 0). Pretraining by ranking captions against pictures, in effect."""
    ckpt = torch.load(engine.latest_checkpoint(run_dir), weights_only=True)
    state = {k: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    weight, bias = ckpt["model"]["head.weight"], ckpt["model"]["head.bias"]
    state["itm_head.weight"] = torch.cat([torch.zeros_like(weight), weight])
    state["itm_head.bias"] = torch.cat([torch.zeros_like(bias), bias])
    torch.save({"model": state, "config": ckpt["config"], "step": ckpt["step"]}, path)
    return path


@pytest.fixture(scope="module")
def learned(data_root, tmp_path_factory):
    """Fine-tune the five vision-language tasks once; {task: (run directory, final validation record)}.
    Retrieval learns from scratch. NLVR2 does not in a short run, here as in the literature (its labels depend
    on text and pictures together only), so it and the others start from the retrieval run's encoder, saved as
    a pretraining checkpoint, with the new head at 10x the learning rate, as fine-tuning usually runs (NLVR2's at 3x:
    at 10x its pair head collapsed to one answer on one of the seeds tried)."""
    runs = {}

    def fine_tune(task, steps, **values):
        out = str(tmp_path_factory.mktemp(task))
        runs[task] = (out, run(data_root, out, task, steps, **values)[1][-1])

    fine_tune("coco_retrieval", 300, retrieval_negatives=7)
    ranked = pretraining_checkpoint_from(runs["coco_retrieval"][0], tmp_path_factory.mktemp("ranked") / "ckpt_1.pt")
    for task, steps in (("refcoco", 150), ("snli_ve", 100), ("vqa", 200)):
        fine_tune(task, steps, init_from=ranked, lr=5e-4, lr_mult_heads=10.0)
    fine_tune("nlvr2", 200, init_from=ranked, lr=3e-4, lr_mult_heads=3.0)
    runs["ranked"] = ranked
    return runs


def test_refcoco_learns(learned, data_root):
    # 258 val sentences: at chance (~0.28) the standard deviation is 0.028, so the bar is over 4 of them above it.
    # Eight training seeds measured 0.47-0.64 (a CPU with other kernels follows another trajectory, as a seed does).
    chance = refcoco_chance(data_root)
    assert learned["refcoco"][1]["refcoco_acc"] >= chance + 0.12, chance


def test_retrieval_learns(learned):
    # 15 val images, 75 captions. Image retrieval ranks the 15 images for each caption: chance 1/15 at R@1 and 1/3
    # at R@5, standard deviations 0.029 and 0.054 over 75 captions, so the bars are 2.9 and 4.9 of them above
    # chance; eight training seeds measured R@1 0.20-0.39 and R@5 0.71-0.89 after 300 steps. Text retrieval has
    # only 15 queries, too few to tell a short run from chance reliably (R@5 0.53-0.80 over the same seeds).
    val = learned["coco_retrieval"][1]
    assert val["coco_ir_r1"] >= 0.15 and val["coco_ir_r5"] >= 0.6, val


def test_vqa_learns(learned, data_root):
    majority = vqa_majority(data_root, learned["vqa"][0])  # 0.16; eight training seeds measured 0.32-0.39
    assert learned["vqa"][1]["vqa_score"] >= majority + 0.12, majority


def test_snli_ve_learns(learned):
    assert learned["snli_ve"][1]["snli_ve_acc"] >= 0.55  # chance 1/3; eight training seeds measured 0.61-0.72


def test_nlvr2_learns(learned):
    # chance 1/2 (each statement is true for half its pairs), with a standard deviation of 0.023 on 480 statements,
    # so the bar is 2.6 of them above chance. Half the sets are near misses about shapes, counts and relations that
    # a 200-step run barely learns; the colour sets it learns first. Over eight training seeds accuracy was 0.59-0.70;
    # at the other tasks' settings (lr 5e-4, head 10x) the default seed collapsed to one answer (0.50).
    assert learned["nlvr2"][1]["nlvr2_acc"] >= 0.56


# -----------------------------------------------------------------------------
# evaluate.py


def test_evaluate_writes_predictions_metrics_and_the_results_table(learned, capsys):
    runs = {task: learned[task][0] for task in ("refcoco", "coco_retrieval", "nlvr2", "snli_ve", "vqa")}
    records = evaluate.main(list(runs.values()))
    table = capsys.readouterr().out.strip().splitlines()[-4:]  # a row per pretrained model, as in the paper
    header = [cell.strip() for cell in table[0].split("|")[1:-1]]
    assert header[:4] == ["model", "refcoco_acc (val)", "refcoco_acc (testA)", "refcoco_acc (testB)"]
    assert header[-1] == "vqa_score (val2014)" and "nlvr2_consistency (test1)" in header
    assert table[1].startswith("|---|")
    rows = {}
    for line in table[2:]:
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        rows[cells[0]] = dict(zip(header, cells))
    assert set(rows) == {"(from scratch)", str(learned["ranked"])}  # retrieval from scratch, the others not
    for model, row in rows.items():
        for column, value in row.items():
            if column != "model":
                assert (value == "-") == (column.startswith("coco_") != (model == "(from scratch)")), (model, column)
    by_split = {(r["task"], r["split"]): r for r in records}
    retrieval_test = by_split[("coco_retrieval", "test")]["metrics"]
    assert rows["(from scratch)"]["coco_ir_r1 (test)"] == f"{retrieval_test['coco_ir_r1']:.3f}"
    assert set(by_split) == {(t, s) for t in runs for s in tasks.TASKS[t].eval_splits}
    for task, out in runs.items():  # validation scored the whole split: the same numbers
        val = learned[task][1]
        split = tasks.TASKS[task].val_split
        if split in tasks.TASKS[task].eval_splits:  # retrieval validates on val, reports test
            metrics = by_split[(task, split)]["metrics"]
            assert metrics == pytest.approx({k: v for k, v in val.items() if k not in ("step", "split")})
            assert json.load(open(Path(out) / "eval" / f"{task}_{split}_metrics.json"))["metrics"] == metrics

    nlvr2 = (Path(runs["nlvr2"]) / "eval/nlvr2_dev_predictions.csv").read_text().splitlines()
    assert len(nlvr2) == 480 and all(line.split(",")[1] in ("True", "False") for line in nlvr2)
    assert nlvr2[0].startswith("dev-0-0-0,")
    vqa = json.load(open(Path(runs["vqa"]) / "eval/vqa_val2014_predictions.json"))
    vocab = json.load(open(Path(runs["vqa"]) / "labels.json"))
    assert set(vqa[0]) == {"question_id", "answer"} and all(r["answer"] in vocab for r in vqa)
    retrieval = json.load(open(Path(runs["coco_retrieval"]) / "eval/coco_retrieval_test_predictions.json"))
    assert len(retrieval["text_retrieval"]) == 15 and len(retrieval["image_retrieval"]) == 75
    assert all(len(best) == 10 for best in retrieval["text_retrieval"])
    refcoco = json.load(open(Path(runs["refcoco"]) / "eval/refcoco_val_predictions.json"))
    assert set(refcoco[0]) == {"ref_id", "sent_id", "ann_id", "bbox", "correct"}
    eval_lines = [r for r in read_log(runs["refcoco"])[1] if r["split"] in ("testA", "testB")]
    assert [r["split"] for r in eval_lines] == ["testA", "testB"] and "refcoco_acc" in eval_lines[0]

    metrics_file = Path(runs["refcoco"]) / "eval/refcoco_val_metrics.json"
    written = metrics_file.stat().st_mtime_ns
    again = evaluate.main([runs["refcoco"]])  # already evaluated for this checkpoint: read back, not redone
    assert metrics_file.stat().st_mtime_ns == written and again[0]["metrics"] == by_split[("refcoco", "val")]["metrics"]


def test_evaluate_on_two_processes_matches_one(learned, tmp_path):
    """Sharded predictions and score rows gathered from two processes give what one process gives."""
    batches = ["--eval_pairs_batch=64", "--micro_batch_size=16"]
    copies = {}
    for world in (1, 2):
        for task in ("refcoco", "coco_retrieval"):
            copies[world, task] = tmp_path / f"{task}_{world}"
            shutil.copytree(learned[task][0], copies[world, task], ignore=shutil.ignore_patterns("eval"))
    evaluate.main([str(copies[1, "refcoco"]), str(copies[1, "coco_retrieval"]), *batches])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = processes.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "evaluate.py"), str(copies[2, "refcoco"]), str(copies[2, "coco_retrieval"]),
                          *batches], timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for task in ("refcoco", "coco_retrieval"):
        one, two = copies[1, task] / "eval", copies[2, task] / "eval"
        assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
        for path in one.glob("*_metrics.json"):
            assert json.load(open(two / path.name))["metrics"] == pytest.approx(json.load(open(path))["metrics"])
        for path in one.glob("refcoco_*_predictions.json"):
            assert (two / path.name).read_text() == path.read_text()
# -----------------------------------------------------------------------------
# Starting from a pretraining checkpoint


def save_pretraining_checkpoint(out_dir, **overrides):
    """A PretrainModel checkpoint in pretrain.py's format (model state and resolved config), untrained."""
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, len(data.synthetic_tokenizer()))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ckpt_7.pt")
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "step": 7}, path)
    return model.state_dict(), path


def final_weights(out_dir):
    return torch.load(engine.latest_checkpoint(out_dir), weights_only=True)["model"]


def test_init_from_pretraining_at_another_image_size(data_root, tmp_path, capsys):
    """A checkpoint pretrained at 16 pixels fine-tunes at 32: its position table is interpolated, every other
    encoder weight arrives unchanged (lr 0), its architecture wins over the config's, and the retrieval head
    starts from the ITM head."""
    pretrained, _ = save_pretraining_checkpoint(tmp_path / "pre", image_size=16)
    out = str(tmp_path / "ft")
    run(data_root, out, "coco_retrieval", 1, init_from=tmp_path / "pre", lr=0.0, warmup_steps=0,
        retrieval_negatives=3, text_layers=1, eval_batches=1)
    printed = capsys.readouterr().out
    assert "architecture from" in printed and "text_layers=2" in printed and "loaded" in printed
    assert json.load(open(os.path.join(out, "config.json")))["text_layers"] == 2
    weights = final_weights(out)
    position = "encoder.vision_tower.embeddings.position_embeddings"
    assert pretrained[position].shape == (1, 1 + 2 * 2, 32) and weights[position].shape == (1, 1 + 4 * 4, 32)
    for key, value in pretrained.items():
        if key.startswith("encoder.") and key != position:
            torch.testing.assert_close(weights[key], value, msg=key)
    itm = pretrained["itm_head.weight"]
    torch.testing.assert_close(weights["head.weight"][0], itm[1] - itm[0])
    assert not any(k.startswith(("mlm_head.", "itm_head.")) for k in weights)


def test_init_from_refuses_checkpoints_that_do_not_fit(data_root, tmp_path):
    pretrained, path = save_pretraining_checkpoint(tmp_path / "pre")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"]["encoder.text_proj.weight"]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"init_from .*ckpt_7\.pt: checkpoint does not fit.*encoder\.text_proj"):
        run(data_root, str(tmp_path / "a"), "snli_ve", 1, init_from=path)
    ckpt["model"]["encoder.text_proj.weight"] = pretrained["encoder.text_proj.weight"]
    ckpt["model"]["head.net.0.weight"] = torch.zeros(1)  # a fine-tuned model, not a pretraining checkpoint
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="checkpoint does not fit"):
        run(data_root, str(tmp_path / "b"), "snli_ve", 1, init_from=path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ckpt_<step>.pt in that directory"):
        run(data_root, str(tmp_path / "c"), "snli_ve", 1, init_from=tmp_path / "empty")
    assert not os.path.exists(tmp_path / "a")  # bad input leaves no run directory behind


def test_freezing_during_fine_tuning(data_root, tmp_path):
    pretrained, path = save_pretraining_checkpoint(tmp_path / "pre")
    out = str(tmp_path / "ft")
    run(data_root, out, "snli_ve", 3, init_from=path, freeze_vision=True, text_trainable_top=1, eval_batches=1)
    weights = final_weights(out)
    changed = {k for k, v in pretrained.items() if k in weights and not torch.equal(weights[k], v)}
    assert not any(k.startswith("encoder.vision_tower.") for k in changed)
    assert not any(k.startswith(("encoder.text_tower.embeddings.", "encoder.text_tower.encoder.layer.0."))
                   for k in changed)
    assert any(k.startswith("encoder.text_tower.encoder.layer.1.") for k in changed)
    assert any(k.startswith("encoder.cross_layers.") for k in changed)


def test_resize_position_embeddings_keeps_prefix_tokens_and_constant_tables():
    small = tiny_config(image_size=16, vision_tower="deit", model_type="two_tower")
    large = dataclasses.replace(small, image_size=32)
    state = build_pretrain_model(small, 40).state_dict()
    model = build_pretrain_model(large, 40)
    key = "encoder.vision_tower.embeddings.position_embeddings"
    state[key] = torch.cat([torch.full((1, 2, 32), 5.0), torch.full((1, 4, 32), 3.0)], dim=1)  # CLS, distillation
    resized = resize_position_embeddings(state, model)
    assert resized[key].shape == (1, 2 + 16, 32)
    assert (resized[key][:, :2] == 5.0).all() and torch.allclose(resized[key][:, 2:], torch.tensor(3.0))
    model.load_state_dict({k: v for k, v in resized.items()}, strict=False)  # every shape now fits

    one_tower = tiny_config(image_size=16, model_type="one_tower")
    state = build_pretrain_model(one_tower, 40).state_dict()
    model = build_pretrain_model(dataclasses.replace(one_tower, image_size=32), 40)
    resized = resize_position_embeddings(state, model)
    assert resized["encoder.image_embeddings.position"].shape == (1, 17, 32)
    words = "encoder.text_embeddings.word_embeddings.weight"
    assert resized[words] is state[words]  # what fits is passed through

    def beit(image_size):  # BEiT as pretrained on the hub: relative position bias per layer
        return BeitModel(BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=image_size, patch_size=8, use_relative_position_bias=True),
                         add_pooling_layer=False)
    state, model = beit(16).state_dict(), beit(32)
    table = next(k for k in state if k.endswith("relative_position_bias_table"))
    resized = resize_position_embeddings(state, model)
    assert state[table].shape[0] == 3 * 3 + 3 and resized[table].shape == model.state_dict()[table].shape
    torch.testing.assert_close(resized[table][-3:], state[table][-3:])  # the CLS rows are kept


# -----------------------------------------------------------------------------
# Text-only and image-only tasks through either model type


@pytest.mark.parametrize("task, model_type", [("stsb", "two_tower"), ("mnli", "one_tower"),
                                              ("cifar10", "two_tower"), ("cifar10", "one_tower")])
def test_unimodal_tasks_through_either_model_type(data_root, tmp_path, task, model_type, capsys):
    """GLUE through the text side and CIFAR-10 through the vision side of a pretrained model: the parts the task
    never runs are not trained (so DDP needs no unused-parameter search); evaluate.py scores every dev split."""
    pretrained, path = save_pretraining_checkpoint(tmp_path / "pre", model_type=model_type)
    out = str(tmp_path / task)
    # a one-tower model has no cross-modal layers, and refuses their lr multiplier on the command line
    no_cross = {"lr_mult_cross": None} if model_type == "one_tower" else {}
    _, val = run(data_root, out, task, 2, init_from=path, eval_batches=2, **no_cross)
    assert set(val[-1]) == {"step", "split", tasks.TASKS[task].metrics[0]} | (
        {"stsb_spearman"} if task == "stsb" else set())
    unused = unused_modules(tasks.TASKS[task].build_model(build_pretrain_model(
        tiny_config(model_type=model_type), 40).encoder, ["a", "b"]), tasks.TASKS[task].inputs)
    assert unused and f"so not trained: {', '.join(unused)}" in capsys.readouterr().out
    weights = final_weights(out)
    for key, value in pretrained.items():
        if key.startswith(tuple(unused)):
            assert torch.equal(weights[key], value), key
    assert not all(torch.equal(weights[k], v) for k, v in pretrained.items() if k in weights)

    records = evaluate.main([out, "--eval_batches=2"])
    assert [r["split"] for r in records] == list(tasks.TASKS[task].eval_splits)
    assert set().union(*(r["metrics"] for r in records)) == set(tasks.TASKS[task].metrics)
    predictions = sorted(p.name for p in (Path(out) / "eval").glob("*_predictions.*"))
    assert predictions == [f"{task}_{split}_predictions.{'json' if task == 'cifar10' else 'tsv'}"
                           for split in tasks.TASKS[task].eval_splits]


def test_fine_tuning_on_two_processes(data_root, tmp_path):
    """torchrun, two processes: a two-tower model on an image-only task keeps its text side and cross-modal
    layers out of training, so DDP needs no unused-parameter search; the synthetic set is generated once."""
    out = tmp_path / "ddp"
    command = args(data_root=tmp_path / "data", out_dir=out, task="cifar10", max_steps=2, eval_interval=2,
                   ckpt_interval=2, micro_batch_size=8, eval_batches=2, synthetic_images=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = processes.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "finetune.py"), *command], timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2 | micro batch 8 | accumulation 2" in done.stdout
    train, val = read_log(out)
    assert [r["step"] for r in train] == [2] and "cifar10_acc" in val[-1]


TASK_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py") if "\ntask = " in p.read_text())


@pytest.mark.parametrize("config", TASK_CONFIGS)
def test_task_configs_load_and_name_a_task(config):
    cfg = load_config([str(ROOT / "configs" / config)])  # the config runs, every key it sets exists
    task = tasks.get_task(cfg.task)
    assert cfg.out_dir.startswith("out/") and not cfg.init_from
    assert cfg.synthetic_task == config.startswith("synthetic_")
    if task.name.endswith("_retrieval"):
        assert cfg.retrieval_negatives < cfg.micro_batch_size


# -----------------------------------------------------------------------------
# Bad images: a bad training image is skipped, counted and logged; a missing evaluation image stops the start


def snli_ve_world(data_root):
    """The SNLI-VE train and dev sets of a private 40-picture world, and the image folder they share."""
    cfg = tiny_config(data_root=str(data_root), **{**WORLD, "synthetic_images": 40})
    task = tasks.TASKS["snli_ve"]
    train, dev = (task.eval_dataset(cfg, split, lambda image: image) for split in ("train", "dev"))
    return train, dev, train.image_dir


def test_fine_tuning_skips_counts_and_logs_bad_training_images(tmp_path):
    train, dev, image_dir = snli_ve_world(tmp_path / "data")
    train_only = [i for i in dict.fromkeys(train.image_ids.tolist()) if i not in set(dev.image_ids.tolist())]
    missing, corrupt = train_only[:2]
    (image_dir / f"{missing}.jpg").unlink()
    (image_dir / f"{corrupt}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    micro = 16
    sampler = batching.MicroBatchSampler(len(train), micro, 0, 1, 0)  # the run's first epoch, seed 0
    sampler.set_epoch(0)
    seen = [i for batch in sampler for i in batch]
    expected = sum(int(train.image_ids[i]) in (missing, corrupt) for i in seen)
    assert expected > 0
    out = tmp_path / "run"
    train_log, val_log = run(tmp_path / "data", out, "snli_ve", sampler.batches_per_epoch, synthetic_images=40,
                             batch_size=micro, micro_batch_size=micro, log_interval=1, seed=0)
    assert train_log[-1]["step"] == sampler.batches_per_epoch and "snli_ve_acc" in val_log[-1]  # the run finished
    assert sum(r.get("skipped_images", 0) for r in train_log) == expected
    messages = " ".join(m for r in train_log for m in r.get("bad_images", []))
    assert f"{missing}.jpg: image not found (named by " in messages
    assert f"{corrupt}.jpg: not a readable image (named by " in messages and "snli_ve_train.jsonl:" in messages


def test_fine_tuning_refuses_to_start_with_a_missing_validation_image(tmp_path):
    train, dev, image_dir = snli_ve_world(tmp_path / "data")
    dev_only = [i for i in dict.fromkeys(dev.image_ids.tolist()) if i not in set(train.image_ids.tolist())]
    (image_dir / f"{dev_only[0]}.jpg").unlink()
    out = tmp_path / "run"
    command = args(data_root=tmp_path / "data", out_dir=out, task="snli_ve", max_steps=2, synthetic_images=40,
                   micro_batch_size=8, batch_size=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *command], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    n_images = len(set(dev.image_ids.tolist()))
    assert done.stderr.startswith(f"error: snli_ve split 'dev': 1 of its {n_images} image files not found: "
                                  f"{image_dir / f'{dev_only[0]}.jpg'} (the first named by "), done.stderr
    assert not out.exists()  # refused before anything was written


# -----------------------------------------------------------------------------
# What the run output says


def test_glue_malformed_rows_are_reported_at_start_and_in_the_log(data_root, tmp_path, capsys):
    cfg = tiny_config(data_root=data_root, **WORLD)
    train = tasks.TASKS["qqp"].train_dataset(cfg, None)  # the synthetic QQP train.tsv has one malformed row
    (line,) = train.malformed_lines
    out = tmp_path / "qqp"
    train_log, _ = run(data_root, out, "qqp", 2, log_interval=1, micro_batch_size=8, batch_size=8, eval_batches=1)
    assert f"{train.path}: 1 malformed rows skipped (lines {line})" in capsys.readouterr().out
    assert train_log[0]["malformed_rows"] == {str(train.path): {"count": 1, "first_lines": [line]}}
    assert "malformed_rows" not in train_log[1]  # reported once, not on every line


def test_results_table_of_unlabelled_splits_only():
    unlabelled = [{"model": "out/a", "split": "test-dev2015", "metrics": {}, "run": "out/vqa"}]
    assert evaluate.results_table(unlabelled) == ("no metrics to tabulate: the splits scored have no labels "
                                                  "(predictions are in each run's eval/)")
    labelled = {"model": "out/b", "split": "dev", "metrics": {"nlvr2_acc": 0.5}, "run": "out/nlvr2"}
    table = evaluate.results_table(unlabelled + [labelled]).splitlines()
    assert table == ["| model | nlvr2_acc (dev) |", "|---|---|", "| out/a | - |", "| out/b | 0.500 |"]
    assert len({line.count("|") for line in table}) == 1  # every line has the header's cells


def test_nlvr2_second_image_type_starts_as_the_pretrained_first():
    task = tasks.TASKS["nlvr2"]
    cfg = tiny_config(tokenizer="synthetic")
    model = task.build_model(finetune.build_encoder(cfg, len(data.synthetic_tokenizer())), task.label_names(cfg))
    types = model.encoder.modality_type.weight
    assert torch.equal(types[2], types[1]) and not torch.equal(types[1], types[0])  # from scratch too
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(finetune.NEW_HEAD)}
    pretrained = state["encoder.modality_type.weight"]
    pretrained[1].fill_(0.25)  # trained by pretraining
    pretrained[2].normal_()  # never trained: still its random start
    message = finetune.load_pretrained(model, task, state, "ckpt_1.pt")
    assert torch.equal(types[1], pretrained[1]) and torch.equal(types[2], pretrained[1])
    assert torch.equal(types[0], pretrained[0]) and "copied from the first" in message
