"""Synthetic versions of the tasks: each is written, in the task's official layout, under
data_root/synthetic next to the synthetic world (world.py) whose pictures and scene facts it is built from, so
that every task runs offline end to end with the same readers as the real data. Here: generating a folder
once and atomically, reading the world's scenes, the statements the generators share, and the synthetic
Flickr30k that SNLI-VE and Flickr30k retrieval both read.
"""

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

import files
import world
from tasks.common import _read_json
from world import COLOURS, SHAPES

# -----------------------------------------------------------------------------
# Synthetic versions: generated once, atomically, beside the synthetic world

SYNTHETIC_VERSION = 2  # bump when a generator changes, so old files on disk are refused, not reused
SYNTHETIC_MARKER = "synthetic.json"  # written last into each generated folder: present = complete


def ensure_generated(world_root: Path, folder: str, generate, seed: int, timeout_seconds=3600.0) -> Path:
    """world_root/folder, generating it first with generate(staging_dir, world_root, rng) if missing.

    As for the world itself (files.generate_once): local rank 0 writes into a hidden temporary folder
    beside the target and renames it into place in one step, so the folder is complete or absent; the other
    local ranks wait for its marker. The rng depends only on (seed, folder): the files are deterministic."""
    target = Path(world_root) / folder
    marker = target / SYNTHETIC_MARKER
    wanted = {"version": SYNTHETIC_VERSION, "seed": seed}

    def write(staging):
        generate(staging, Path(world_root), np.random.default_rng([seed, zlib.crc32(folder.encode())]))
        (staging / SYNTHETIC_MARKER).write_text(json.dumps(wanted))

    files.generate_once(target, marker, write, int(os.environ.get("LOCAL_RANK", "0")), timeout_seconds,
                       "a synthetic task")
    found = _read_json(marker)
    if found != wanted:
        raise ValueError(f"{marker}: generated with {found}, this code writes {wanted}; delete {target}")
    return target


def _world_scenes(world_root: Path):
    """The synthetic world's scenes [{"image_id", "split", "objects"}] and its picture side in pixels."""
    scenes = _read_json(Path(world_root) / "scenes.json")
    return scenes["scenes"], scenes["image_size"]


def _world_image(world_root: Path, scene) -> Path:
    folder = "train2014" if scene["split"] == "train" else "val2014"  # as world.generate_synthetic_world files them
    return Path(world_root) / "coco" / folder / f"COCO_{folder}_{scene['image_id']:012d}.jpg"


def _kind(obj):
    return obj["colour"], obj["shape"]


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def _where(obj, image_size) -> str:
    """The object's place on a 3x3 grid as an answer: 'top left', 'left', 'middle'."""
    return world.position_phrase(obj, image_size).split(" ", 2)[2]


STATEMENT_TRIES = 20


def _statement(objects, image_size, rng, true: bool) -> str:
    """A statement about the scene, true or false: an object ('there is a large red circle at the top'), a
    count ('there are two red objects') or a relation ('a red circle is left of a blue square'). A false one
    is a true one with exactly one attribute changed (colour, shape, size, position, count or relation:
    world.false_variant), so that both come from the same templates with the same words and only the picture
    tells them apart."""
    for _ in range(STATEMENT_TRIES):
        statement = world.sample_statement(objects, image_size, rng)
        if true:
            return world.statement_text(statement)
        found = world.false_variant(statement, objects, image_size, rng)
        if found is not None:
            return world.statement_text(found[1])
    raise ValueError(f"no false statement about the scene {objects} in {STATEMENT_TRIES} tries")


NEUTRAL_PROPERTIES = ("heavy", "moving", "wooden")  # never shown by a picture: neither entailed nor contradicted


def _neutral_statement(objects, rng) -> str:
    return f"{world.noun_phrase(_pick(rng, objects))} is {_pick(rng, NEUTRAL_PROPERTIES)}"


def _write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# -----------------------------------------------------------------------------
# Flickr30k from the world: the images of SNLI-VE and of Flickr30k retrieval

SYNTHETIC_FLICKR_ID = 1_000_000_000  # + the scene's image id: ten digits, like real Flickr ids
FLICKR_SPLIT = {"train": "train", "restval": "train", "val": "val", "test": "test"}  # world split -> Flickr30k split


def generate_synthetic_flickr30k(out: Path, world_root: Path, rng) -> None:
    """Flickr30k (Karpathy split) from the world: its pictures as flickr30k-images/<id>.jpg and its captions in
    karpathy/dataset_flickr30k.json (no filepath, no cocoid); train + restval scenes form train. The images
    of SNLI-VE and of Flickr30k retrieval."""
    (out / "flickr30k-images").mkdir(parents=True)
    scenes, _ = _world_scenes(world_root)
    split_of = {s["image_id"]: s["split"] for s in scenes}
    coco = _read_json(world_root / "coco" / "karpathy" / "dataset_coco.json")
    images = []
    for k, entry in enumerate(coco["images"]):
        flickr_id = SYNTHETIC_FLICKR_ID + entry["cocoid"]
        shutil.copyfile(world_root / "coco" / entry["filepath"] / entry["filename"],
                        out / "flickr30k-images" / f"{flickr_id}.jpg")
        sentences = [{**s, "imgid": k} for s in entry["sentences"]]
        images.append({"sentids": [s["sentid"] for s in sentences], "imgid": k, "sentences": sentences,
                       "split": FLICKR_SPLIT[split_of[entry["cocoid"]]], "filename": f"{flickr_id}.jpg"})
    (out / "karpathy").mkdir()
    (out / "karpathy" / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
