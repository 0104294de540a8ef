"""Tests for world.py, data.py and batching.py: synthetic world, corpus readers, streaming, tokenizer, collator,
MLM/ITM, sampling."""

import io
import json
import os
import sys
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import BertTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import batching  # noqa: E402
import data  # noqa: E402
import world  # noqa: E402


def make_cfg(tmp_path, **overrides):
    values = dict(data_root=str(tmp_path / "data"), corpora=["synthetic"], coco_dir="", vg_dir="", cc3m_dir="",
                  sbu_dir="", synthetic_images=12, synthetic_seed=0, synthetic_image_size=32, image_size=16,
                  image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), image_resize="squash", augment=False,
                  tokenizer="synthetic", text_tower="bert", max_text_len=40, micro_batch_size=4, num_workers=0,
                  strict_images=False)
    values.update(overrides)
    return SimpleNamespace(**values)


TRANSFORM = data.build_transform(make_cfg(Path("unused"), image_size=8), train=False)


def write_jpeg(path, colour=(200, 30, 30), size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


def jpeg_bytes(colour=(30, 200, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (9, 9), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


# -----------------------------------------------------------------------------
# Synthetic world

def test_synthetic_world_is_read_back_by_the_real_loaders(tmp_path):
    root = tmp_path / "world"
    world.generate_synthetic_world(root, num_images=20, seed=3, image_size=32)
    scenes = {s["image_id"]: s for s in json.loads((root / "scenes.json").read_text())["scenes"]}
    tables = data.read_karpathy(root / "coco/karpathy/dataset_coco.json", root / "coco",
                                {"train": ("train", "restval"), "val": ("val",), "test": ("test",)})
    assert sum(len(t.image_ids) for t in tables.values()) == 20
    assert len(tables["val"].image_ids) >= 1 and len(tables["test"].image_ids) >= 1
    train = data.CaptionDataset(tables["train"], lambda image: image)
    assert len(train) == world.CAPTIONS_PER_IMAGE * len(tables["train"].image_ids)
    for i in range(0, len(train), world.CAPTIONS_PER_IMAGE):  # first caption of each image: the summary
        item = train[i]
        objects = scenes[item["image_id"]]["objects"]
        assert item["caption"] == world.scene_summary(objects)
        assert item["image"].size == (32, 32)
        pixels = np.asarray(item["image"]).astype(int)
        for obj in objects:  # the picture shows what the scene says, where it says
            x, y, w, h = obj["box"]
            centre = pixels[y + h // 2, x + w // 2]
            assert np.abs(centre - np.array(world.COLOURS[obj["colour"]])).max() < 40, (obj, centre)
    vg_table = data.read_visual_genome(root / "vg")
    vg = data.CaptionDataset(vg_table, lambda image: image)
    train_ids = set(tables["train"].image_ids.tolist())
    assert set(vg_table.image_ids.tolist()) == train_ids  # train + restval scenes only
    assert any("VG_100K_2" in vg_table.image_paths[k] for k in range(len(vg_table.image_ids)))
    for i in range(len(vg)):
        item = vg[i]
        objects = scenes[item["image_id"]]["objects"]
        single = {world.noun_phrase(obj, with_size=True) for obj in objects}
        assert item["caption"] in single or any(f" {r} " in item["caption"] for r in world.RELATIONS)
        assert item["image"].size == (32, 32)
    regions = json.loads((root / "vg/region_descriptions.json").read_text())
    for entry in regions:
        for region in entry["regions"]:
            assert 0 <= region["x"] and region["x"] + region["width"] <= 32
            assert 0 <= region["y"] and region["y"] + region["height"] <= 32


def test_synthetic_world_is_deterministic_for_a_seed(tmp_path):
    world.generate_synthetic_world(tmp_path / "a", num_images=10, seed=7, image_size=32)
    world.generate_synthetic_world(tmp_path / "b", num_images=10, seed=7, image_size=32)
    world.generate_synthetic_world(tmp_path / "c", num_images=10, seed=8, image_size=32)
    first, second = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert first == second and any(name.endswith(".jpg") for name in first)
    assert first["coco/karpathy/dataset_coco.json"] != tree_bytes(tmp_path / "c")["coco/karpathy/dataset_coco.json"]


def test_synthetic_captions_use_only_the_tokenizer_vocabulary(tmp_path):
    root = tmp_path / "world"
    world.generate_synthetic_world(root, num_images=60, seed=1, image_size=32)
    karpathy = json.loads((root / "coco/karpathy/dataset_coco.json").read_text())
    texts = [s["raw"] for image in karpathy["images"] for s in image["sentences"]]
    texts += [r["phrase"] for e in json.loads((root / "vg/region_descriptions.json").read_text()) for r in e["regions"]]
    assert any(" left of " in t for t in texts) and any(t.startswith("two ") for t in texts)
    assert any(" larger than " in t for t in texts) and any(t.endswith(" objects") for t in texts)
    tokenizer = data.synthetic_tokenizer()
    ids = tokenizer(texts)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)


def scene(*objects):
    """Objects from (size, colour, shape, x, y) tuples, boxes of the size's side in a 64-pixel picture."""
    sides = {size: round(fraction * 64) for size, fraction in world.SIZES.items()}
    return [{"size": size, "colour": colour, "shape": shape, "box": [x, y, sides[size], sides[size]]}
            for size, colour, shape, x, y in objects]


def test_statements_hold_as_the_scene_says():
    objects = scene(("large", "red", "circle", 0, 0), ("small", "red", "square", 40, 0),
                    ("small", "blue", "circle", 0, 44), ("small", "blue", "circle", 30, 44))
    holds = lambda statement: world.statement_holds(statement, objects, 64)  # noqa: E731
    assert holds({"type": "object", "colour": "red", "shape": "circle", "size": "large", "where": "at the top left"})
    assert not holds({"type": "object", "colour": "red", "shape": "circle", "size": "small", "where": None})
    assert not holds({"type": "object", "colour": "blue", "shape": "square", "size": None, "where": None})  # binding
    assert holds({"type": "count", "colour": "blue", "shape": "circle", "count": 2})
    assert holds({"type": "count", "colour": None, "shape": "circle", "count": 3})
    assert holds({"type": "count", "colour": "red", "shape": None, "count": 2})
    assert holds({"type": "count", "colour": None, "shape": None, "count": 4})
    assert not holds({"type": "count", "colour": "blue", "shape": "circle", "count": 1})  # exactly that many
    relation = {"type": "relation", "a": {"colour": "red", "shape": "circle"}, "relation": "above",
                "b": {"colour": "blue", "shape": "circle"}}
    assert holds(relation) and not holds({**relation, "relation": "below"})
    assert holds({**relation, "relation": "larger than"}) and not holds({**relation, "relation": "smaller than"})
    assert not holds({**relation, "b": {"colour": "blue", "shape": "square"}})
    assert world.statement_text(relation) == "a red circle is above a blue circle"
    assert world.statement_text({"type": "count", "colour": "red", "shape": None, "count": 2}) == \
        "there are two red objects"
    assert world.relations(objects[0], objects[1]) == ["left of", "larger than"]


def test_false_variants_differ_in_one_attribute_and_are_false():
    """The hard negatives: a true statement with exactly one attribute changed, false of the scene, worded from
    the same templates (so only the picture tells it from the truth), and every kind of change occurs."""
    rng = np.random.default_rng(0)
    tokenizer = data.synthetic_tokenizer()
    changed_attributes, texts = set(), []
    for _ in range(300):
        objects = world.sample_scene(rng, 64)
        statement = world.sample_statement(objects, 64, rng)
        assert world.statement_holds(statement, objects, 64)
        attribute, variant = world.false_variant(statement, objects, 64, rng)
        assert not world.statement_holds(variant, objects, 64)
        differences = [k for k in statement if statement[k] != variant[k]]
        assert len(differences) == 1 and variant["type"] == statement["type"]
        if isinstance(statement[differences[0]], dict):  # a relation's object: one of its colour and shape
            a, b = statement[differences[0]], variant[differences[0]]
            assert sum(a[k] != b[k] for k in a) == 1
        changed_attributes.add(attribute)
        texts += [world.statement_text(statement), world.statement_text(variant)]
    assert changed_attributes == {"colour", "shape", "size", "position", "count", "relation"}
    assert all(tokenizer.unk_token_id not in row for row in tokenizer(texts)["input_ids"])


def test_scenes_hold_distractors_and_counts():
    """Scenes share colours or shapes across kinds (naming an object takes both attributes) and hold several
    objects of a kind (counting matters)."""
    rng = np.random.default_rng(1)
    scenes = [world.sample_scene(rng, 64) for _ in range(300)]
    kinds = [{(o["colour"], o["shape"]) for o in objects} for objects in scenes]
    shared = sum(any(a != b and (a[0] == b[0] or a[1] == b[1]) for a in k for b in k) for k in kinds)
    repeated = sum(len(k) < len(objects) for k, objects in zip(kinds, scenes))
    assert shared > 0.4 * len(scenes) and repeated > 0.3 * len(scenes)
    assert max(len(objects) for objects in scenes) == world.MAX_OBJECTS


def test_ensure_synthetic_world_generates_once_and_other_ranks_wait(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = make_cfg(tmp_path)
    waited = {}

    def other_rank():  # bounded wait, and a daemon thread: a rank 0 that never finishes cannot hang the suite
        waited["root"] = world.ensure_synthetic_world(cfg, SimpleNamespace(local_rank=1), timeout_seconds=60)
    waiter = threading.Thread(target=other_rank, daemon=True)
    waiter.start()
    root = world.ensure_synthetic_world(cfg, SimpleNamespace(local_rank=0))
    waiter.join(timeout=60)
    assert not waiter.is_alive(), "the waiting rank never saw the world finished"
    assert waited["root"] == root == Path(cfg.data_root) / "synthetic"
    assert os.listdir(cfg.data_root) == ["synthetic"]  # no staging folder left behind
    stamp = (root / "world.json").stat().st_mtime_ns
    assert world.ensure_synthetic_world(cfg) == root  # LOCAL_RANK unset: rank 0
    assert (root / "world.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    with pytest.raises(ValueError, match="synthetic_images"):
        world.ensure_synthetic_world(make_cfg(tmp_path, synthetic_images=13))


# -----------------------------------------------------------------------------
# COCO Karpathy, COCO official, Visual Genome

def write_karpathy(coco_dir):
    images = []
    for imgid, (split, folder, cocoid) in enumerate([("train", "train2014", 9), ("restval", "val2014", 42),
                                                     ("val", "val2014", 77), ("test", "val2014", 88)]):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        write_jpeg(coco_dir / folder / filename)
        sentences = [{"raw": f"caption {k} of {cocoid}  ", "tokens": ["caption"], "imgid": imgid, "sentid": k}
                     for k in range(2)]
        images.append({"filepath": folder, "filename": filename, "split": split, "cocoid": cocoid,
                       "imgid": imgid, "sentids": [0, 1], "sentences": sentences})
    path = coco_dir / "karpathy" / "dataset_coco.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path, images


def test_coco_karpathy_reader(tmp_path):
    path, _ = write_karpathy(tmp_path / "coco")
    tables = data.read_karpathy(path, tmp_path / "coco", data.KARPATHY_PRETRAIN_SPLITS)
    train = data.CaptionDataset(tables["train"], TRANSFORM, image_id_offset=1000)
    assert [train[i]["caption"] for i in range(len(train))] == ["caption 0 of 9", "caption 1 of 9",
                                                                 "caption 0 of 42", "caption 1 of 42"]
    assert [train[i]["image_id"] for i in range(len(train))] == [1009, 1009, 1042, 1042]
    assert train[0]["image"].shape == (3, 8, 8) and train[0]["image"].dtype == torch.uint8
    assert tables["val"].image_ids.tolist() == [77]
    assert isinstance(tables["train"].captions.data, np.ndarray)  # compact storage, not lists of dicts


def test_coco_karpathy_missing_image_names_the_path(tmp_path):
    path, _ = write_karpathy(tmp_path / "coco")
    missing = tmp_path / "coco" / "val2014" / "COCO_val2014_000000000077.jpg"
    missing.unlink()
    val = data.CaptionDataset(data.read_karpathy(path, tmp_path / "coco", {"val": ("val",)})["val"], TRANSFORM)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        val[0]


def test_coco_karpathy_malformed_json_and_missing_field(tmp_path):
    path, images = write_karpathy(tmp_path / "coco")
    del images[1]["sentences"][1]["raw"]
    path.write_text(json.dumps({"images": images}))
    with pytest.raises(ValueError, match=r"dataset_coco\.json: images\[1\]\.sentences\[1\] has no field 'raw'"):
        data.read_karpathy(path, tmp_path / "coco", data.KARPATHY_PRETRAIN_SPLITS)
    path.write_text('{\n  "images": [\n    {"split": "train",, }\n  ]\n}')
    with pytest.raises(ValueError, match=r"dataset_coco\.json: malformed JSON at line 3"):
        data.read_karpathy(path, tmp_path / "coco", data.KARPATHY_PRETRAIN_SPLITS)


@pytest.mark.parametrize("year", ["2014", "2017"])
def test_coco_official_reader(tmp_path, year):
    coco_dir = tmp_path / "coco"
    names = {5: f"COCO_train{year}_000000000005.jpg" if year == "2014" else "000000000005.jpg", 6: "x.jpg"}
    for name in names.values():
        write_jpeg(coco_dir / f"train{year}" / name)
    annotations = {"images": [{"id": i, "file_name": n, "width": 12, "height": 10} for i, n in names.items()],
                   "annotations": [{"image_id": 6, "id": 1, "caption": "A dog. "},
                                   {"image_id": 5, "id": 2, "caption": "A cat."}]}
    path = coco_dir / "annotations" / f"captions_train{year}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(annotations))
    dataset = data.CaptionDataset(data.read_coco_official(coco_dir), TRANSFORM)
    assert [(dataset[i]["caption"], dataset[i]["image_id"]) for i in range(2)] == [("A dog.", 6), ("A cat.", 5)]
    del annotations["annotations"][1]["caption"]
    path.write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=rf"captions_train{year}\.json: annotations\[1\] has no field 'caption'"):
        data.read_coco_official(coco_dir)


@pytest.mark.parametrize("outer_key", ["id", "image_id"])
def test_visual_genome_reader(tmp_path, outer_key):
    vg_dir = tmp_path / "vg"
    write_jpeg(vg_dir / "images/VG_100K/1.jpg")
    write_jpeg(vg_dir / "images/VG_100K_2/7.jpg", colour=(0, 0, 250))
    image_data = [{"image_id": i, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{i}.jpg",
                   "width": 12, "height": 10, "coco_id": None, "flickr_id": None}
                  for i, folder in [(1, "VG_100K"), (7, "VG_100K_2")]]
    regions = [{outer_key: i, "regions": [{"region_id": 10 * i + k, "image_id": i, "phrase": phrase, "x": 0, "y": 0,
                                           "width": 5, "height": 5} for k, phrase in enumerate(phrases)]}
               for i, phrases in [(1, ["the clock is green ", ""]), (7, ["a blue wall"])]]
    (vg_dir / "image_data.json").write_text(json.dumps(image_data))
    (vg_dir / "region_descriptions.json").write_text(json.dumps(regions))
    dataset = data.CaptionDataset(data.read_visual_genome(vg_dir), TRANSFORM)
    assert [(dataset[i]["caption"], dataset[i]["image_id"]) for i in range(len(dataset))] == [
        ("the clock is green", 1), ("a blue wall", 7)]  # the empty phrase is skipped
    assert dataset[1]["image"][2].float().mean() > 127  # the blue picture, found in VG_100K_2
    del regions[1]["regions"][0]["phrase"]
    (vg_dir / "region_descriptions.json").write_text(json.dumps(regions))
    with pytest.raises(ValueError, match=r"region_descriptions\.json: \[1\]\.regions\[0\] has no field 'phrase'"):
        data.read_visual_genome(vg_dir)


# -----------------------------------------------------------------------------
# img2dataset shards (CC3M, SBU) and streaming

def write_img2dataset(root, fmt, num_shards=2, per_shard=3, png_key=None):
    """Shards in img2dataset's layout; returns {image_id: caption}. The sample png_key is stored as
    a .png holding JPEG bytes."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for shard in range(num_shards):
        members = []
        for index in range(per_shard):
            key = f"{shard:05d}{index:04d}"
            extension = "png" if key == png_key else "jpg"
            caption = f"photo {shard} {index}"
            members += [(f"{key}.{extension}", jpeg_bytes()), (f"{key}.txt", caption.encode() + b"\n"),
                        (f"{key}.json", json.dumps({"key": key}).encode())]
            expected[int(key)] = caption
        if fmt == "folder":
            for name, payload in members:
                (root / f"{shard:05d}").mkdir(exist_ok=True)
                (root / f"{shard:05d}" / name).write_bytes(payload)
        else:
            with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return expected


def read_stream(stream, rank=0, world_size=1, num_workers=0, seed=0):
    """All items one process sees in one epoch."""
    stream.set_partition(rank, world_size, seed)
    stream.set_position(epoch=0, batches_done=0, batch_size=1)
    return list(DataLoader(stream, batch_size=None, num_workers=num_workers))


@pytest.mark.parametrize("fmt", ["folder", "tar"])
def test_img2dataset_shards_are_read(tmp_path, fmt):
    expected = write_img2dataset(tmp_path / "cc3m", fmt, png_key="000010002")
    stream = data.CaptionStream([data.Img2DatasetShards(tmp_path / "cc3m", TRANSFORM, image_id_offset=500)])
    assert len(stream) == 6
    items = read_stream(stream)
    assert {item["image_id"] - 500: item["caption"] for item in items} == expected
    assert all(item["image"].shape == (3, 8, 8) for item in items)  # including the .png holding JPEG bytes


def test_img2dataset_tar_without_stats_is_counted_by_scanning(tmp_path):
    write_img2dataset(tmp_path / "sbu", "tar", num_shards=1, per_shard=4)
    (tmp_path / "sbu" / "00000_stats.json").unlink()
    assert len(data.Img2DatasetShards(tmp_path / "sbu", TRANSFORM)) == 4


def test_img2dataset_missing_image_and_bad_key(tmp_path):
    write_img2dataset(tmp_path / "cc3m", "folder", num_shards=1)
    missing = tmp_path / "cc3m" / "00000" / "000000001.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_stream(data.CaptionStream([data.Img2DatasetShards(tmp_path / "cc3m", TRANSFORM)]))
    (tmp_path / "cc3m" / "00000" / "abc.txt").write_text("a caption")
    with pytest.raises(ValueError, match=r"abc\.txt: key 'abc' is not an img2dataset key"):
        data.Img2DatasetShards(tmp_path / "cc3m", TRANSFORM)


def test_img2dataset_folder_above_its_shards_is_named_at_once(tmp_path):
    write_img2dataset(tmp_path / "downloads" / "cc3m", "folder")
    with pytest.raises(ValueError) as error:
        data.Img2DatasetShards(tmp_path / "downloads", TRANSFORM)
    message = str(error.value)
    assert "no img2dataset shards found" in message and "00000/" in message and "00000.tar" in message
    assert "cc3m/" in message and "\n" not in message
    (tmp_path / "downloads" / "cc3m" / "_tmp").mkdir()  # img2dataset's scratch folder beside the shards is not one
    assert len(data.Img2DatasetShards(tmp_path / "downloads" / "cc3m", TRANSFORM)) == 6


def test_stream_split_across_ranks_and_workers_covers_every_sample_once(tmp_path):
    expected = write_img2dataset(tmp_path / "cc3m", "tar", num_shards=5, per_shard=3)
    write_jpeg(tmp_path / "pics" / "p.jpg")
    table = data.CaptionTable.build(tmp_path / "pics", [("p.jpg", 1)], [(f"map {i}", 0) for i in range(7)])
    stream = data.CaptionStream([data.CaptionDataset(table, TRANSFORM, image_id_offset=10**11),
                                 data.Img2DatasetShards(tmp_path / "cc3m", TRANSFORM)])
    seen = []
    for rank in range(2):
        seen += [(item["image_id"], item["caption"]) for item in read_stream(stream, rank, 2, num_workers=2)]
    assert sorted(seen) == sorted(list(expected.items()) + [(10**11 + 1, f"map {i}") for i in range(7)])


def test_stream_resume_skips_the_consumed_batches(tmp_path):
    write_img2dataset(tmp_path / "cc3m", "folder", num_shards=4, per_shard=4)
    stream = data.CaptionStream([data.Img2DatasetShards(tmp_path / "cc3m", TRANSFORM)])
    for num_workers in (0, 2):
        loader = batching.ResumableLoader(stream, 2, rank=0, world_size=1, seed=5, collate=captions_of,
                                      num_workers=num_workers)
        iterator = iter(loader)
        head = [next(iterator) for _ in range(3)]
        state = loader.state_dict()
        tail = [next(iterator) for _ in range(3)]
        resumed = batching.ResumableLoader(stream, 2, rank=0, world_size=1, seed=5, collate=captions_of,
                                       num_workers=num_workers)
        resumed.load_state_dict(state)
        resumed_iterator = iter(resumed)
        assert [next(resumed_iterator) for _ in range(3)] == tail
        assert len({c for batch in head + tail for c in batch}) == 12  # no repeats within the epoch


def captions_of(items):
    return [item["caption"] for item in items]


# -----------------------------------------------------------------------------
# Pretraining mix, tokenizer, transforms, collator

def test_build_pretrain_datasets_mixes_map_and_streaming_corpora(tmp_path, capsys):
    cfg = make_cfg(tmp_path, corpora=["synthetic"])
    transform = data.build_transform(cfg)
    train, val = data.build_pretrain_datasets(cfg, transform)
    # 12 scenes: 10 train + restval (5 captions each, plus their VG regions), 1 val, 1 test
    assert not isinstance(train, data.CaptionStream) and len(train) > 50 and len(val) == 5
    write_img2dataset(Path(cfg.data_root) / "cc3m", "folder")
    cfg.corpora = ["synthetic", "cc3m"]
    mixed, val = data.build_pretrain_datasets(cfg, transform)
    assert isinstance(mixed, data.CaptionStream) and len(mixed) == len(train) + 6
    ids = {item["image_id"] for item in read_stream(mixed)}
    assert len(ids) == 6 + 10  # cc3m keys and synthetic scenes never share an id
    collate = batching.PretrainCollator(data.build_tokenizer(cfg), cfg.max_text_len)
    batch = next(iter(batching.build_loader(mixed, cfg, rank=0, world_size=1, seed=0, collate=collate)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["image_ids"].shape == (4,)
    cfg.corpora = ["cc3m"]
    _, val = data.build_pretrain_datasets(cfg, transform)
    assert val is None and "no held-out split" in capsys.readouterr().out
    cfg.corpora = ["coco", "laion"]
    with pytest.raises(ValueError, match="unknown corpus 'laion'"):
        data.build_pretrain_datasets(cfg, transform)


def test_build_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="set tokenizer"):
        data.build_tokenizer(make_cfg(tmp_path, tokenizer="", text_tower="electra"))
    with pytest.raises(ValueError) as error:
        data.build_tokenizer(make_cfg(tmp_path, tokenizer=str(tmp_path / "nowhere")))
    assert str(error.value) == f"tokenizer: directory '{tmp_path / 'nowhere'}' does not exist"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as error:  # transformers' message runs over five lines: all of it, in one
        data.build_tokenizer(make_cfg(tmp_path, tokenizer=str(tmp_path / "empty")))
    message = str(error.value)
    assert message.startswith(f"could not load tokenizer from directory '{tmp_path / 'empty'}': ")
    assert "(3) an equivalent slow tokenizer" in message and "sentencepiece" in message and "\n" not in message
    synthetic = data.build_tokenizer(make_cfg(tmp_path))
    synthetic.save_pretrained(tmp_path / "tok")
    loaded = data.build_tokenizer(make_cfg(tmp_path, tokenizer="", text_tower=str(tmp_path / "tok")))
    text = "two green triangles left of a red circle"
    assert loaded(text)["input_ids"] == synthetic(text)["input_ids"]
    assert synthetic.unk_token_id not in synthetic(text)["input_ids"]


def test_image_transform_gives_uint8_and_never_flips(tmp_path):
    """Workers send uint8 pixels; the model normalises them (test_model.py checks that)."""
    cfg = make_cfg(tmp_path, image_size=16, augment=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    plain = data.build_transform(cfg, train=False)(Image.new("RGB", (40, 40), (255, 0, 0)))
    assert plain.shape == (3, 16, 16) and type(plain) is torch.Tensor and plain.dtype == torch.uint8
    assert plain[:, 0, 0].tolist() == [255, 0, 0]
    picture = Image.new("RGB", (40, 40), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 20, 40))  # red left half, blue right half
    augment = data.build_transform(cfg, train=True)
    torch.manual_seed(0)
    for _ in range(30):
        image = augment(picture).float()
        assert image[0, :, 0].mean() > image[2, :, 0].mean()  # left edge stays red
        assert image[2, :, -1].mean() > image[0, :, -1].mean()  # right edge stays blue


def wordpiece_tokenizer():
    vocabulary = list(data.SPECIAL_TOKENS) + ["a", "red", "green", "two", "circle", "triangle", "##s", "left",
                                              "of", "star", "##ry", "sky"]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocabulary)})


def test_collator_pads_to_the_longest_caption_and_truncates():
    tokenizer = wordpiece_tokenizer()
    collate = batching.PretrainCollator(tokenizer, max_text_len=6)
    items = [{"image": torch.zeros(3, 4, 4), "caption": caption, "image_id": i}
             for i, caption in enumerate(["two triangles", "a red circle"])]
    batch = collate(items)
    assert batch["input_ids"].shape == (2, 5)  # [CLS] a red circle [SEP]: the longest, not max_text_len
    assert batch["word_ids"][0].tolist() == [-1, 0, 1, 1, -1]  # triangle ##s belong to word 1
    assert batch["special_tokens_mask"][0].tolist() == [True, False, False, False, True]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1] and batch["image_ids"].tolist() == [0, 1]
    long = collate([{"image": torch.zeros(3, 4, 4), "caption": "a red circle " * 5, "image_id": 0}])
    assert long["input_ids"].shape == (1, 6) and long["input_ids"][0, -1] == tokenizer.sep_token_id
    assert long["pixel_values"].shape == (1, 3, 4, 4)


# -----------------------------------------------------------------------------
# MLM and ITM

def test_mask_tokens_statistics_and_specials():
    tokenizer = wordpiece_tokenizer()
    info = data.TokenizerInfo.from_tokenizer(tokenizer)
    generator = torch.Generator().manual_seed(0)
    B, T = 256, 64
    input_ids = torch.randint(5, info.vocab_size, (B, T), generator=generator)
    lengths = torch.randint(10, T, (B,), generator=generator)
    positions = torch.arange(T)[None, :]
    special = (positions == 0) | (positions >= lengths[:, None])  # [CLS] ... then padding
    input_ids[special] = tokenizer.pad_token_id
    input_ids[:, 0] = tokenizer.cls_token_id
    word_ids = torch.where(special, -1, positions - 1)
    mlm_input_ids, labels = batching.mask_tokens(input_ids, special, word_ids, info, 0.15, False, generator)
    selected = labels != -100
    assert abs(selected.sum() / (~special).sum() - 0.15) < 0.02
    assert not selected[special].any() and torch.equal(mlm_input_ids[special], input_ids[special])
    assert torch.equal(labels[selected], input_ids[selected])
    masked = selected & (mlm_input_ids == info.mask_token_id)
    unchanged = selected & (mlm_input_ids == input_ids)
    replaced = selected & ~masked & ~unchanged
    n = selected.sum()
    assert abs(masked.sum() / n - 0.8) < 0.04
    assert abs(replaced.sum() / n - 0.1) < 0.03 and abs(unchanged.sum() / n - 0.1) < 0.03
    assert not np.isin(mlm_input_ids[replaced].numpy(), info.special_ids).any()
    again = batching.mask_tokens(input_ids, special, word_ids, info, 0.15, False, torch.Generator().manual_seed(0))
    first = batching.mask_tokens(input_ids, special, word_ids, info, 0.15, False, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(again, first))  # a function of the generator only


def test_mask_tokens_whole_words_and_at_least_one_per_row():
    tokenizer = wordpiece_tokenizer()
    info = data.TokenizerInfo.from_tokenizer(tokenizer)
    collate = batching.PretrainCollator(tokenizer, max_text_len=40)
    captions = ["two triangles left of a starry sky", "a red circle", "triangles", "two green stars"] * 50
    batch = collate([{"image": torch.zeros(3, 2, 2), "caption": c, "image_id": 0} for c in captions])
    ids, special, word_ids = batch["input_ids"], batch["special_tokens_mask"], batch["word_ids"]
    for seed in range(5):
        _, labels = batching.mask_tokens(ids, special, word_ids, info, 0.15, True, torch.Generator().manual_seed(seed))
        selected = labels != -100
        assert selected.any(dim=1).all() and not selected[special].any()
        for b in range(len(captions)):
            for word in word_ids[b].unique():
                if word >= 0:  # all pieces of a word share its fate ("triangle" "##s", "star" "##ry")
                    assert selected[b][word_ids[b] == word].unique().numel() == 1
    _, labels = batching.mask_tokens(ids, special, word_ids, info, 0.0, False, torch.Generator().manual_seed(0))
    assert ((labels != -100).sum(dim=1) == 1).all()  # nothing drawn: exactly one forced per row
    empty = torch.ones_like(special)
    _, labels = batching.mask_tokens(ids, empty, word_ids, info, 0.15, True, torch.Generator().manual_seed(0))
    assert (labels == -100).all()  # rows with nothing eligible stay unlabelled


def test_itm_negatives_never_share_the_image():
    image_ids = torch.tensor([4, 4, 4, 4, 4, 9, 9, 9, 9, 9, 2])  # five captions per picture, like COCO
    for seed in range(20):
        index, labels = batching.sample_itm_pairs(image_ids, 1.0, torch.Generator().manual_seed(seed))
        assert (labels == 0).all() and (image_ids[index] != image_ids).all()
    index, labels = batching.sample_itm_pairs(torch.full((6,), 3), 1.0, torch.Generator().manual_seed(0))
    assert (labels == 1).all() and torch.equal(index, torch.arange(6))  # no other picture: stays positive
    index, labels = batching.sample_itm_pairs(torch.arange(4000), 0.5, torch.Generator().manual_seed(0))
    assert abs(labels.float().mean() - 0.5) < 0.03
    assert torch.equal(index[labels == 1], torch.arange(4000)[labels == 1])


# -----------------------------------------------------------------------------
# Sampling and loading

def test_micro_batch_sampler_grouping_coverage_and_resume():
    one = batching.MicroBatchSampler(48, 4, rank=0, world_size=1, seed=3)
    ranks = [batching.MicroBatchSampler(48, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    single = list(one)
    per_rank = [list(s) for s in ranks]
    # optimizer step s: one process's micro-steps 2s and 2s+1 == rank 0's and rank 1's micro-batch s
    for step in range(6):
        assert single[2 * step] == per_rank[0][step] and single[2 * step + 1] == per_rank[1][step]
    assert sorted(i for batch in single for i in batch) == list(range(48))
    one.set_epoch(1)
    assert list(one) != single and sorted(i for batch in one for i in batch) == list(range(48))
    one.set_epoch(1, start_batch=5)
    remaining = list(one)
    one.set_epoch(1)
    assert remaining == list(one)[5:] and len(remaining) == 7


class Indices(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return i


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_state_round_trip_across_epochs(num_workers):
    def make():
        return batching.ResumableLoader(Indices(), 3, rank=0, world_size=1, seed=1, collate=list,
                                    num_workers=num_workers)
    reference = make()
    iterator = iter(reference)
    batches = [next(iterator) for _ in range(12)]  # 3 batches per epoch: four epochs
    assert sorted(sum(batches[:3], [])) == sorted(set(sum(batches[:3], [])))
    loader = make()
    iterator = iter(loader)
    for _ in range(7):
        next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches_done": 1, "world_size": 1}
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint's serialisation
    resumed_iterator = iter(resumed)
    assert [next(resumed_iterator) for _ in range(5)] == batches[7:]


def test_resumable_loader_resumes_on_another_world_size():
    """Two processes that took 3 micro-batches each resume on one process at global micro-batch 6, and one
    process that took 5 resumes on two at global micro-batch 6 (a whole round: nothing is seen twice)."""
    def loader(rank, world_size):
        return batching.ResumableLoader(Indices(), 1, rank=rank, world_size=world_size, seed=1, collate=list)
    one = iter(loader(0, 1))
    order = [next(one) for _ in range(8)]  # the global micro-batch order of epoch 0 (10 micro-batches of 1)
    states = []
    for rank in (0, 1):
        ranked = loader(rank, 2)
        iterator = iter(ranked)
        assert [next(iterator) for _ in range(3)] == order[rank:6:2]
        states.append(ranked.state_dict())
    assert states[0] == states[1] == {"epoch": 0, "batches_done": 3, "world_size": 2}
    resumed = loader(0, 1)
    resumed.load_state_dict(states[0])
    assert next(iter(resumed)) == order[6]
    single = loader(0, 1)
    single.load_state_dict({"epoch": 0, "batches_done": 5, "world_size": 1})
    for rank in (0, 1):
        resumed = loader(rank, 2)
        resumed.load_state_dict(single.state_dict())
        assert next(iter(resumed)) == order[6 + rank]
