"""Text-only corpora and the image-introduction schedule: the plain-text reader (plain, gzip, folders, WikiText
headings, the split across ranks and workers), the synthetic text corpus, which kind of batch each step trains on,
text-only MLM's gradients, exact resume across the switch, DDP with a mixed schedule, saving the text tower, and the
study's configs."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import batching
import data
import engine
import pretrain
import world
from config import ConfigError, load_config, validate
from encoders import build_encoder
from model import PretrainModel, build_pretrain_model
from test_pretrain import NO_DROPOUT, TINY_RUN, WITH_DROPOUT, crash_then_resume, final_weights, read_log
from tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent

# The opening of WikiText-103's wiki.train.raw, as distributed: headings and blank lines between paragraphs.
WIKITEXT = (" \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ "
            "playing video game . \n The game began development in 2010 . \n \n = = Gameplay = = \n \n As with "
            "previous Valkyira Chronicles games , the game is a tactical role @-@ playing game . \n \n")
WIKITEXT_KEPT = ["Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game .",
                 "The game began development in 2010 .",
                 "As with previous Valkyira Chronicles games , the game is a tactical role @-@ playing game ."]
TINY_TEXT = ["--text_corpora=['synthetic']", "--synthetic_text_lines=200"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def texts(source, part=0, parts=1, seed=0, epoch=0):
    return [load()["text"] for load in source.records(part, parts, seed, epoch)]


# -----------------------------------------------------------------------------
# Text corpora

def test_text_corpus_plain_gzip_and_folder_skip_blank_and_heading_lines(tmp_path):
    raw = tmp_path / "wikitext-103-raw" / "wiki.train.raw"
    raw.parent.mkdir()
    raw.write_text(WIKITEXT, encoding="utf-8")
    plain = data.TextLines(raw)  # a file is read whatever its name
    assert len(plain) == 3 and sorted(texts(plain)) == sorted(WIKITEXT_KEPT)
    gz = tmp_path / "wiki.txt.gz"
    gz.write_bytes(gzip.compress(WIKITEXT.encode("utf-8")))
    assert sorted(texts(data.TextLines(gz))) == sorted(WIKITEXT_KEPT)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("one\r\ntwo\n")
    (folder / "b.txt.gz").write_bytes(gzip.compress(b"three\n\n   \nfour"))
    (folder / "notes.md").write_text("not a corpus file\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.txt").write_text("in a sub-folder: not read\n")
    corpus = data.TextLines(folder)
    assert [p.name for p in corpus.files] == ["a.txt", "b.txt.gz"] and len(corpus) == 4
    assert sorted(texts(corpus)) == ["four", "one", "three", "two"]
    # build_text_corpora reads paths under data_root
    cfg = tiny_config(data_root=str(tmp_path), text_corpora=["folder", "wiki.txt.gz"])
    assert len(data.build_text_corpora(cfg)) == 7


def test_text_corpus_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="text corpus not found: .*nowhere"):
        data.TextLines(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no \.txt or \.txt\.gz files"):
        data.TextLines(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n \n = Heading = \n")
    with pytest.raises(ValueError, match=r"blank\.txt: no text in this corpus"):
        data.TextLines(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.txt: line 2 is not UTF-8"):
        data.TextLines(tmp_path / "latin1.txt")
    (tmp_path / "broken.txt.gz").write_bytes(gzip.compress(b"some text\n" * 50)[:-12])
    with pytest.raises(ValueError, match=r"broken\.txt\.gz: not a readable gzip file"):
        data.TextLines(tmp_path / "broken.txt.gz")
    with pytest.raises(ValueError, match="text_corpora lists a corpus twice"):
        data.build_text_corpora(tiny_config(data_root=str(tmp_path), text_corpora=["latin1.txt", "latin1.txt"]))


def test_text_stream_split_across_ranks_and_workers_covers_every_line_once(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = [f"line {i}" for i in range(53)]
    (folder / "a.txt").write_text("\n".join(lines[:20]) + "\n")
    (folder / "b.txt.gz").write_bytes(gzip.compress(("\n".join(lines[20:]) + "\n").encode()))
    stream = data.CaptionStream([data.TextLines(folder)])
    seen = []
    for rank in range(2):
        stream.set_partition(rank, 2, seed=4)
        stream.set_position(epoch=1, batches_done=0, batch_size=1)
        seen += [item["text"] for item in DataLoader(stream, batch_size=None, num_workers=2)]
    assert sorted(seen) == sorted(lines)
    # shuffled beyond file order, and reshuffled each epoch
    corpus = data.TextLines(folder)
    assert texts(corpus, epoch=0) != sorted(texts(corpus, epoch=0), key=lines.index)
    assert texts(corpus, epoch=0) != texts(corpus, epoch=1)


def test_shuffle_buffer_keeps_every_item_and_mixes_beyond_its_size():
    rng = np.random.default_rng(0)
    out = list(data._shuffled(iter(range(1000)), rng, 16))
    assert sorted(out) == list(range(1000))
    assert max(abs(i - x) for i, x in enumerate(out)) > 16  # items travel further than one buffer


def test_text_stream_resumes_exactly(tmp_path):
    (tmp_path / "t.txt").write_text("".join(f"sentence {i}\n" for i in range(40)))
    stream = data.CaptionStream([data.TextLines(tmp_path / "t.txt")])
    collate = batching.TextCollator(data.synthetic_tokenizer(), 8)
    for num_workers in (0, 2):
        def make():
            return batching.ResumableLoader(stream, 3, rank=0, world_size=1, seed=2, collate=lambda items: [
                item["text"] for item in items], num_workers=num_workers)
        reference = iter(make())
        batches = [next(reference) for _ in range(17)]  # 13 batches an epoch: into the second epoch
        loader = make()
        iterator = iter(loader)
        for _ in range(11):
            next(iterator)
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
        resumed_iterator = iter(resumed)
        assert [next(resumed_iterator) for _ in range(6)] == batches[11:]
    batch = collate([{"text": "a red circle"}, {"text": "there are two blue squares"}])
    assert set(batch) == {"input_ids", "attention_mask", "special_tokens_mask", "word_ids"}  # no images


def test_synthetic_text_corpus_is_deterministic_in_vocabulary_and_longer_than_captions(tmp_path):
    cfg = tiny_config(data_root=str(tmp_path), synthetic_text_lines=300, synthetic_seed=5)
    path = world.ensure_synthetic_text(cfg)
    lines = path.read_text().splitlines()
    assert len(lines) == 300 and len(set(lines)) > 250
    again = tmp_path / "again"
    world.generate_synthetic_text(again, 300, seed=5, image_size=cfg.synthetic_image_size)
    assert (again / "corpus.txt").read_text() == path.read_text()
    tokenizer = data.synthetic_tokenizer()
    ids = tokenizer(lines)["input_ids"]
    assert not any(tokenizer.unk_token_id in row for row in ids)
    rng = np.random.default_rng(0)
    captions = [c for _ in range(100) for c in world.describe_scene(world.sample_scene(rng, 64), 64, rng)]
    caption_tokens = np.mean([len(row) for row in tokenizer(captions)["input_ids"]])
    assert np.mean([len(row) for row in ids]) > 2 * caption_tokens
    assert all(line.startswith("there ") and line.count(",") + line.count(" and ") >= 1 for line in lines)
    with pytest.raises(ValueError, match="text generated with .* config asks for"):
        world.ensure_synthetic_text(tiny_config(data_root=str(tmp_path), synthetic_text_lines=301, synthetic_seed=5))


# -----------------------------------------------------------------------------
# The schedule

def test_steps_before_the_switch_are_text_only_and_after_it_mixed():
    schedule = batching.ImageTextSchedule(max_steps=1000, text_only_fraction=0.8, image_text_share=0.3, seed=7)
    kinds = [schedule.kind(step) for step in range(1000)]
    assert schedule.switch_step == 800
    assert set(kinds[:800]) == {"text"} and set(kinds[800:]) == {"text", "image_text"}
    assert [schedule.phase(s) for s in (0, 799, 800, 999)] == ["text_only", "text_only", "image_text", "image_text"]
    # a function of (seed, step) alone: another instance, or steps asked in another order, agree
    again = batching.ImageTextSchedule(1000, 0.8, 0.3, 7)
    assert [again.kind(step) for step in reversed(range(1000))] == kinds[::-1]
    assert [batching.ImageTextSchedule(1000, 0.8, 0.3, 8).kind(s) for s in range(800, 1000)] != kinds[800:]
    today = batching.ImageTextSchedule(1000, 0.0, 1.0, 7)
    assert {today.kind(s) for s in range(1000)} == {"image_text"} and not today.uses_text
    text_only = batching.ImageTextSchedule(1000, 1.0, 0.5, 7)
    assert {text_only.kind(s) for s in range(1000)} == {"text"} and not text_only.uses_images


@pytest.mark.parametrize("share", [0.1, 0.5, 0.8])
def test_image_text_share_over_many_steps(share):
    schedule = batching.ImageTextSchedule(max_steps=1000, text_only_fraction=0.0, image_text_share=share, seed=3)
    count = sum(schedule.kind(step) == "image_text" for step in range(1000))
    sd = (1000 * share * (1 - share)) ** 0.5
    assert abs(count - 1000 * share) < 4 * sd, count  # a binomial count, 4 standard deviations


def test_schedule_keys_are_validated():
    with pytest.raises(ConfigError, match="text_only_fraction=0.5 .* text_corpora is empty"):
        validate(tiny_config(text_only_fraction=0.5))
    with pytest.raises(ConfigError, match="image_text_share=1.5 must lie in"):
        validate(tiny_config(image_text_share=1.5, text_corpora=["synthetic"]))
    with pytest.raises(ConfigError, match="mlm_weight=0"):
        validate(tiny_config(image_text_share=0.5, text_corpora=["synthetic"], mlm_weight=0.0))
    with pytest.raises(ConfigError, match="save_text_tower needs model_type='two_tower'"):
        validate(tiny_config(model_type="one_tower", save_text_tower="somewhere"))
    validate(tiny_config(text_corpora=["synthetic"]))  # text corpora with today's schedule: allowed, unused


# -----------------------------------------------------------------------------
# Text-only MLM

def text_only_batch(vocab_size=60):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab_size, (4, 7), generator=g)
    mlm_labels = torch.full((4, 7), -100)
    mlm_labels[:, 2] = input_ids[:, 2]
    return {"input_ids": input_ids, "mlm_input_ids": input_ids.masked_fill(mlm_labels != -100, 4),
            "attention_mask": torch.ones(4, 7, dtype=torch.long), "mlm_labels": mlm_labels,
            "mlm_positions": PretrainModel.mlm_positions(mlm_labels, None, "separate")}


def grad_prefixes(model, prefixes):
    """{prefix: True if every parameter under it got a gradient, False if none did} (mixed raises)."""
    result = {}
    for prefix in prefixes:
        got = [p.grad is not None for n, p in model.named_parameters() if n.startswith(prefix)]
        assert got and (all(got) or not any(got)), prefix
        result[prefix] = all(got)
    return result


def test_two_tower_text_only_step_trains_the_text_path_alone():
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_config(), 60)
    out = model(text_only_batch())
    assert set(out) == {"loss", "mlm_loss", "mlm_acc"} and out["loss"] > 0
    out["loss"].backward()
    assert grad_prefixes(model, [
        "encoder.text_tower.", "encoder.text_proj.", "encoder.modality_type.", "encoder.text_norm.", "mlm_head.",
        "encoder.vision_tower.", "encoder.image_proj.", "encoder.cross_layers.", "encoder.image_norm.",
        "encoder.text_pooler.", "encoder.image_pooler.", "itm_head."]) == {
        "encoder.text_tower.": True, "encoder.text_proj.": True, "encoder.modality_type.": True,
        "encoder.text_norm.": True, "mlm_head.": True, "encoder.vision_tower.": False, "encoder.image_proj.": False,
        "encoder.cross_layers.": False, "encoder.image_norm.": False, "encoder.text_pooler.": False,
        "encoder.image_pooler.": False, "itm_head.": False}
    # the MLM head reads the text tower's output projected and normalised, with no cross-modal layer between
    enc, batch = model.encoder, text_only_batch()
    with torch.no_grad():
        feats = enc.text_norm(enc.text_proj(enc.text_tower(input_ids=batch["mlm_input_ids"],
                              attention_mask=batch["attention_mask"]).last_hidden_state) + enc.modality_type.weight[0])
        expected = model.mlm_outputs(feats, batch["mlm_labels"], batch["mlm_positions"])["mlm_loss"]
        assert model(batch)["mlm_loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_one_tower_text_only_step_runs_the_stack_on_word_pieces_alone():
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_config(model_type="one_tower"), 60)
    model(text_only_batch())["loss"].backward()
    assert grad_prefixes(model, ["encoder.text_embeddings.", "encoder.layers.", "mlm_head.",
                                 "encoder.image_embeddings.", "itm_head."]) == {
        "encoder.text_embeddings.": True, "encoder.layers.": True, "mlm_head.": True,
        "encoder.image_embeddings.": False, "itm_head.": False}


# -----------------------------------------------------------------------------
# Training runs across the switch

SWITCH_RUN = TINY_RUN + TINY_TEXT + ["--text_only_fraction=0.34", "--image_text_share=0.5"]  # 6 steps: T T | I T I T


def test_log_says_the_phase_and_mix_and_the_lr_runs_on(tmp_path, data_root):
    out = str(tmp_path / "run")
    pretrain.main(SWITCH_RUN + NO_DROPOUT + [f"--data_root={data_root}", f"--out_dir={out}"])
    train, val = read_log(out)
    assert [r["phase"] for r in train] == ["text_only"] * 2 + ["image_text"] * 4
    assert [(r["image_text_batches"], r["text_batches"]) for r in train] == [(0, 1), (0, 1), (1, 0), (0, 1),
                                                                            (1, 0), (0, 1)]
    assert ["itm_loss" in r for r in train] == [False, False, True, False, True, False]
    assert all(r["loss"] == pytest.approx(r["mlm_loss"]) for r in train if "itm_loss" not in r)
    cfg = load_config(SWITCH_RUN)
    assert [r["lr"] for r in train] == pytest.approx([engine.lr_at(s, cfg) for s in range(6)])
    assert [r["step"] for r in val] == [3, 6]
    # a line over several steps averages each loss over the steps that had it, and counts the mix
    out = str(tmp_path / "every_3")
    pretrain.main(SWITCH_RUN + NO_DROPOUT + [f"--data_root={data_root}", f"--out_dir={out}", "--log_interval=3"])
    every_3 = read_log(out)[0]
    assert [(r["phase"], r["image_text_batches"], r["text_batches"]) for r in every_3] == [
        ("image_text", 1, 2), ("image_text", 1, 2)]
    assert [r["itm_loss"] for r in every_3] == pytest.approx([train[2]["itm_loss"], train[4]["itm_loss"]], rel=1e-6)
    assert [r["mlm_loss"] for r in every_3] == pytest.approx(
        [np.mean([r["mlm_loss"] for r in train[:3]]), np.mean([r["mlm_loss"] for r in train[3:]])], rel=1e-6)


@pytest.mark.parametrize("crash_at", [2, 3])  # the last text-only step; the first image-text step
def test_resume_across_the_switch_is_exact(tmp_path, data_root, monkeypatch, crash_at):
    args = SWITCH_RUN + WITH_DROPOUT + [f"--data_root={data_root}", "--ckpt_interval=1", "--eval_interval=100"]
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    pretrain.main(args + [f"--out_dir={straight}"])
    crash_then_resume(args + [f"--out_dir={interrupted}"], crash_at, monkeypatch)
    key = lambda r: {k: v for k, v in r.items() if k != "samples_per_sec"}
    assert [key(r) for r in read_log(interrupted)[0]] == [key(r) for r in read_log(straight)[0]]
    a, b = final_weights(straight, 6), final_weights(interrupted, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def optimizer_state_by_group(checkpoint):
    """{param group name: [whether AdamW holds state for each of its parameters]}: state exists once a parameter
    has had a gradient, so a group without any was never updated (no step, no weight decay)."""
    optimizer = torch.load(checkpoint, weights_only=True)["optimizer"]
    return {g["name"]: [i in optimizer["state"] for i in g["params"]] for g in optimizer["param_groups"]}


def test_mixed_schedule_trains_under_ddp(tmp_path, data_root):
    """Two gloo processes through text-only steps, then an image-text step using the parameters the text-only steps
    left without gradients, then a text-only step again: no DDP error, every rank on the same kind of step, and the
    unused parameters left untouched (no optimizer state) rather than given zero gradients."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = TINY_RUN + TINY_TEXT + NO_DROPOUT + [f"--data_root={data_root}", "--max_steps=4", "--eval_interval=100",
                                                "--ckpt_interval=2", "--text_only_fraction=0.5",
                                                "--image_text_share=0.5"]  # T T | I T
    out = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "pretrain.py", *args, f"--out_dir={out}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    train = read_log(out)[0]
    assert [r["text_batches"] for r in train] == [1, 1, 0, 1] and ["itm_loss" in r for r in train] == [0, 0, 1, 0]
    assert all(np.isfinite(r["loss"]) for r in train)
    before, after = optimizer_state_by_group(out / "ckpt_2.pt"), optimizer_state_by_group(out / "ckpt_4.pt")
    assert all(before["text_tower"]) and not any(before["vision_tower"])
    assert all(after["vision_tower"]) and all(after["text_tower"])


def test_text_only_run_saves_a_text_tower_a_later_model_loads(tmp_path, data_root):
    out, tower = tmp_path / "run", tmp_path / "towers" / "text"
    pretrain.main(TINY_RUN + TINY_TEXT + [f"--data_root={data_root}", f"--out_dir={out}", "--max_steps=3",
                                          "--text_only_fraction=1", f"--save_text_tower={tower}"])
    trained = final_weights(out, 3)
    cfg = tiny_config(text_tower=str(tower), text_hidden_size=-1, text_layers=-1, text_heads=-1, text_mlp_ratio=-1.0,
                      text_embedding_size=-1, tokenizer="")
    tokenizer = data.build_tokenizer(cfg)  # the directory's own tokenizer
    assert tokenizer.get_vocab() == data.synthetic_tokenizer().get_vocab()
    loaded = build_encoder(cfg, len(tokenizer)).text_tower.state_dict()
    prefix = "encoder.text_tower."
    assert loaded.keys() == {k[len(prefix):] for k in trained if k.startswith(prefix)}
    assert all(torch.equal(loaded[k], trained[prefix + k]) for k in loaded)
    # nothing image-side was trained: AdamW never saw a gradient for it (no state), so it never moved
    seen = optimizer_state_by_group(out / "ckpt_3.pt")
    assert all(seen["text_tower"]) and not any(seen["vision_tower"])
    assert "image_text" not in (out / "log.jsonl").read_text().replace("image_text_batches", "")
    assert not list(tower.parent.glob(".*"))  # no staging folder left behind


# -----------------------------------------------------------------------------
# The study's configs

TINY_MODEL = [a for a in TINY_RUN if not a.startswith(("--corpora", "--tokenizer", "--max_steps", "--batch_size",
                                                       "--micro_batch_size", "--ckpt", "--eval_interval"))]
TINY_STEPS = ["--max_steps=2", "--batch_size=4", "--micro_batch_size=4", "--synthetic_text_lines=200",
              "--ckpt_interval=2", "--eval_interval=2"]


def test_synthetic_study_configs_run(tmp_path, data_root):
    """The three arms on the synthetic world with a tiny model for two steps; the third arm's second run starts
    from the text tower its first run saved."""
    tower = tmp_path / "text_tower"
    for arm in ("images_from_start", "images_at_80", "text_only"):
        args = [str(ROOT / "configs" / f"synthetic_schedule_{arm}.py"), *TINY_MODEL, *TINY_STEPS,
                f"--data_root={data_root}", f"--out_dir={tmp_path / arm}", f"--save_text_tower={tower}"]
        pretrain.main(args if arm == "text_only" else args[:-1])
    phases = {arm: [r["phase"] for r in read_log(tmp_path / arm)[0]] for arm in ("images_from_start", "images_at_80",
                                                                               "text_only")}
    assert phases == {"images_from_start": ["image_text"] * 2, "images_at_80": ["text_only", "text_only"],
                      "text_only": ["text_only", "text_only"]}
    text_dims = ("--text_hidden_size", "--text_layers", "--text_heads", "--text_mlp_ratio")
    pretrain.main([str(ROOT / "configs" / "synthetic_schedule_text_then_images.py"),
                   *[a for a in TINY_MODEL if not a.startswith(text_dims + ("--text_tower",))], *TINY_STEPS,
                   f"--text_tower={tower}", f"--data_root={data_root}", f"--out_dir={tmp_path / 'then_images'}"])
    assert json.load(open(tmp_path / "then_images" / "config.json"))["text_tower"] == str(tower)
    assert read_log(tmp_path / "then_images")[1]  # it evaluated image-text matching


@pytest.mark.parametrize("config", ["schedule_images_from_start.py", "schedule_images_at_80.py",
                                    "schedule_text_only.py", "schedule_text_then_images.py"])
def test_real_study_configs_fail_offline_with_one_line(config, tmp_path):
    with pytest.raises(ValueError) as err:
        pretrain.main([str(ROOT / "configs" / config), f"--data_root={tmp_path}", f"--out_dir={tmp_path / 'run'}"])
    # a hub name that cannot be fetched, or (the second run of the third arm) the first run's tower not made yet
    message = str(err.value)
    assert "\n" not in message and ("could not load" in message or "does not exist" in message), message
    assert not (tmp_path / "run").exists()
