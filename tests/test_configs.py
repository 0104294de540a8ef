"""Every file in configs/ runs for two optimizer steps, offline, so a config cannot ship broken.

The list comes from a glob of configs/. A config whose header gives its own launch line is run: one without a task
(the `task` key) through pretrain.py on the synthetic corpus, one with a task through finetune.py on the task's
synthetic version and then evaluate.py. A config without a launch line of its own is a shared base and must be
included by another config, which exercises it. Every run keeps its config's model type, one-tower stack, freezing,
pooling, task and loss settings; what is reduced for CI is set on the command line, as a user would: the towers are
built offline with random_init_towers at hidden size 32, the synthetic tokenizer, a small synthetic world, 32-pixel
images, batch 4 on the CPU in float32.
"""

import json
import math
import re
from pathlib import Path

import pytest

import evaluate
import finetune
import pretrain
from config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.py"))
# What ships, by name: the glob above runs whatever is in configs/, and this list makes a config that disappears
# (or one added without a look at what it runs) fail test_every_config_is_run_or_included_by_one_that_is.
SHIPPED = (
    "cifar10", "coco_retrieval", "dual_full", "dual_lilt", "dual_lit", "f30k_retrieval", "finetune_base",
    "freeze_both", "freeze_none", "freeze_text", "freeze_vision", "frozen_base", "glue", "glue_cola", "glue_mnli",
    "glue_mrpc", "glue_qnli", "glue_qqp", "glue_rte", "glue_sst2", "glue_stsb", "glue_wnli", "nlvr2", "onetower_bert",
    "onetower_random", "onetower_vit", "quickstart", "refcoco", "schedule_images_at_80", "schedule_images_from_start",
    "schedule_text_only", "schedule_text_then_images", "snli_ve", "synthetic_cifar10", "synthetic_coco_retrieval",
    "synthetic_dual_full", "synthetic_dual_lilt", "synthetic_dual_lit", "synthetic_f30k_retrieval",
    "synthetic_finetune", "synthetic_glue", "synthetic_nlvr2", "synthetic_refcoco", "synthetic_schedule_images_at_80",
    "synthetic_schedule_images_from_start", "synthetic_schedule_text_only", "synthetic_schedule_text_then_images",
    "synthetic_snli_ve", "synthetic_text_tower", "synthetic_twotower_itc", "synthetic_vision_tower", "synthetic_vqa",
    "twotower_itc", "vqa",
)

SMALL = dict(
    random_init_towers=True, tokenizer="synthetic", device="cpu", dtype="float32", num_workers=0,
    text_hidden_size=32, text_layers=2, text_heads=2, text_mlp_ratio=2.0, text_embedding_size=32,
    vision_hidden_size=32, vision_layers=2, vision_heads=2, vision_mlp_ratio=2.0,
    cross_layers=1, cross_hidden=32, cross_heads=2, cross_mlp_ratio=2.0,
    image_size=32, patch_size=8, max_text_len=16, synthetic_images=40, synthetic_image_size=32,
    batch_size=4, micro_batch_size=4, max_steps=2, warmup_steps=1, log_interval=1, eval_interval=2, eval_batches=1,
    ckpt_interval=2, retrieval_negatives=3, eval_pairs_batch=256,
)


def launch_entry_point(path):
    """The entry point (pretrain.py, finetune.py) of the launch line in the config's header that names this file,
    or None for a shared base."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    found = re.search(rf"(\w+\.py) configs/{re.escape(path.name)}\b", "\n".join(header))
    return found[1] if found else None


RUNNABLE = [path for path in CONFIGS if launch_entry_point(path)]


def resolved(path):
    return load_config([str(path), "--out_dir=/nonexistent/run"])


def config_task(path):
    return resolved(path).task


# A config that starts from the text tower another config saves (save_text_tower) runs after that one, from a tower
# it saved here; its own text sizes are the saved tower's.
SAVED_BY = {resolved(path).save_text_tower: path for path in RUNNABLE if resolved(path).save_text_tower}
TOWER_SIZES = dict(text_hidden_size=-1, text_layers=-1, text_heads=-1, text_mlp_ratio=-1.0, text_embedding_size=-1)


def overrides(**values):
    return [f"--{key}={value}" for key, value in {**SMALL, **values}.items()]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One synthetic world (and the tasks' synthetic versions) shared by every run."""
    return str(tmp_path_factory.mktemp("data"))


def test_every_config_is_run_or_included_by_one_that_is():
    assert [path.stem for path in CONFIGS] == sorted(SHIPPED)
    assert len(RUNNABLE) >= 30
    for path in CONFIGS:
        entry = launch_entry_point(path)
        if entry is None:  # a shared base: exercised through the configs that include it
            includers = [other.name for other in CONFIGS if f'include("{path.name}")' in other.read_text()]
            assert includers, f"{path.name} has no launch line and no config includes it: it would never run"
        else:  # the launch line names the entry point that the config's task key calls for
            assert entry == ("finetune.py" if config_task(path) else "pretrain.py"), path.name


@pytest.mark.parametrize("config", RUNNABLE, ids=lambda path: path.stem)
def test_config_runs_two_steps(config, data_root, tmp_path):
    out = tmp_path / "run"
    common = overrides(data_root=data_root, out_dir=out)
    if config_task(config):
        finetune.main([str(config), *common, "--synthetic_task=true"])
        records = evaluate.main([str(out), "--micro_batch_size=64"])  # whole splits, in fewer forwards
        assert records and all(record["items"] > 0 for record in records)
        assert all(math.isfinite(value) for record in records for value in record["metrics"].values())
    else:
        cfg = resolved(config)
        corpora = ["--corpora=synthetic"] + (["--text_corpora=synthetic"] if cfg.text_corpora else [])
        if cfg.text_tower in SAVED_BY:  # first the run that saves the tower this one starts from
            tower = tmp_path / "text_tower"
            pretrain.main([str(SAVED_BY[cfg.text_tower]), *overrides(data_root=data_root, out_dir=tmp_path / "saver"),
                           *corpora, f"--save_text_tower={tower}"])
            common = overrides(data_root=data_root, out_dir=out, text_tower=tower, **TOWER_SIZES)
        pretrain.main([str(config), *common, *corpora])
    assert json.loads((out / "config.json").read_text())["random_init_towers"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [record for record in log if "split" not in record]
    assert [record["step"] for record in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    # a run validates on image-text pairs when it has image-text steps (a schedule's two steps may draw none)
    if any(record.get("image_text_batches", 1) for record in train):
        assert any(record.get("split") == "val" for record in log)
    assert (out / "ckpt_2.pt").is_file()
