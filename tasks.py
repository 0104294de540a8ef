"""Downstream tasks. For each task, together: its reader (the files as the publisher distributes them, no
conversion step), its model head, its evaluation and official metric, and its synthetic version.

finetune.py and evaluate.py drive every task through one interface, `TASKS[name]` (a `Task`):

  train_dataset / eval_dataset     the splits, read from data_root or from the synthetic world
  label_names                      what the head's outputs mean (class names, VQA answers), saved with a run
  build_model                      the encoder plus the task's head; forward(batch) -> {"loss", ...} (0-dim tensors)
  evaluate                         predictions over a split, spread over the processes, and the task's metrics
  write_predictions                the predictions file, in the evaluation server's format where there is one

Sections: shared helpers (reading, batching, the evaluation loop, generating synthetic data once), then one
section per task, then the registry. Readers keep annotations in numpy arrays (strings in data.StringArray),
never lists of dicts, so forked DataLoader workers share them instead of copying them. Images are opened by
content (some NLVR2 `.png` files hold JPEG bytes), then passed through the caller's `transform(PIL.Image) ->
tensor`. Bad input raises a one-line ValueError / FileNotFoundError naming the file, line (or record) and
field; a missing image is reported when it is first read, naming the annotation that asked for it.

The synthetic version of each task is written, in the task's official layout, under data_root/synthetic
next to the synthetic world (data.py) whose pictures and scene facts it is built from, so that every task
runs offline end to end with the same readers as the real data.
"""

import copy
import csv
import io
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, DataLoader, Dataset

import data
from data import COLOURS, SHAPES, SIZES, StringArray
from model import ClassifierHead, Embedded, FreezableModel, TaskModel, TwoTowerEncoder

Transform = Callable[[Image.Image], torch.Tensor]

# -----------------------------------------------------------------------------
# Reading helpers


def load_image(path, named_by: str) -> Image.Image:
    """data.open_image (format from the bytes, RGB), with the annotation that named the image in errors."""
    try:
        return data.open_image(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image not found (named by {named_by})") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: not a readable image (named by {named_by}): {error}") from None


_read_json = data._load_json  # one JSON reader for the project: errors name the file and line


def _read_jsonl(path: Path):
    """Yield (line number, object) for each non-blank line of a JSON-lines file."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    with f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def _read_pickle(path: Path):
    """Python-2 pickles (RefCOCO refs, CIFAR batches): latin1 turns Py2 str into str and lets numpy
    rebuild arrays that Python 2 pickled as raw byte strings."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError) as error:
        raise ValueError(f"{path}: not a readable pickle ({error})") from None


def _field(record: dict, key: str, where: str):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where}: missing field '{key}'")
    return record[key]


def _label(value, label_set: dict, where: str, key: str) -> int:
    try:
        return label_set[value]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a list, an object) in the label field
        raise ValueError(f"{where}: {key} {value!r} is not one of {sorted(label_set)}") from None


def _pick_dir(candidates: Sequence[Path], what: str) -> Path:
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{what}: none of {', '.join(str(c) for c in candidates)} exists")


# -----------------------------------------------------------------------------
# Batches


class Collator:
    """Task items -> a batch of tensors, whatever the task: "image" -> pixel_values (B, 3, H, W) (NLVR2's
    "image0" / "image1" -> pixel_values_left / pixel_values_right); "text" (+ "text_pair", GLUE) -> input_ids,
    attention_mask (B, T) padded to the batch's longest, at most max_text_len; "label" -> labels (B,) (float
    for regression); "target" -> targets (B, A); "boxes" (N_i, 4) xywh in pixels with "image_size" (w, h) ->
    boxes (B, N_max, 4) as x0, y0, x1, y1 in [0, 1] (the fraction survives resizing) and box_mask (B, N_max);
    "index" -> index (B,). Other item fields are metadata, looked up by index when scoring."""

    IMAGE_KEYS = {"image": "pixel_values", "image0": "pixel_values_left", "image1": "pixel_values_right"}

    def __init__(self, tokenizer, max_text_len):
        self.tokenizer, self.max_text_len = tokenizer, max_text_len

    def __call__(self, items: list) -> dict:
        first, batch = items[0], {}
        for key, name in self.IMAGE_KEYS.items():
            if key in first:
                batch[name] = torch.stack([item[key] for item in items])
        if "text" in first:
            pairs = [item["text_pair"] for item in items] if first.get("text_pair") is not None else None
            encoded = self.tokenizer([item["text"] for item in items], pairs, padding="longest", truncation=True,
                                     max_length=self.max_text_len, return_tensors="pt")
            batch["input_ids"] = encoded["input_ids"].long()  # (B, T)
            batch["attention_mask"] = encoded["attention_mask"].long()  # (B, T)
        if "label" in first:
            batch["labels"] = torch.tensor([item["label"] for item in items])  # (B,) long, or float (STS-B)
        if "target" in first:
            batch["targets"] = torch.stack([item["target"] for item in items])  # (B, A)
        if "boxes" in first:
            max_boxes = max(len(item["boxes"]) for item in items)
            batch["boxes"] = torch.zeros(len(items), max_boxes, 4)  # (B, N_max, 4)
            batch["box_mask"] = torch.zeros(len(items), max_boxes, dtype=torch.bool)  # (B, N_max)
            for b, item in enumerate(items):
                x, y, w, h = item["boxes"].float().unbind(-1)
                width, height = item["image_size"].float()
                batch["boxes"][b, :len(x)] = torch.stack([x / width, y / height, (x + w) / width, (y + h) / height], -1)
                batch["box_mask"][b, :len(x)] = True
        if "index" in first:
            batch["index"] = torch.tensor([item["index"] for item in items])  # (B,)
        return batch


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Indexed(Dataset):
    """Items `indices` of a dataset, each carrying its index in that dataset, for evaluation shards."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        return {**self.dataset[i], "index": i}


# -----------------------------------------------------------------------------
# Evaluation loop


class Progress:
    """Wraps an iterable, drawing `desc [####....] done/total rate/s eta` on stderr at most twice a second.
    Disabled (a plain pass-through) on every process but the master and for short periodic validations."""

    def __init__(self, iterable, total, desc, enabled=True):
        self.iterable, self.total, self.desc, self.enabled = iterable, total, desc, enabled

    def _draw(self, done, start, end=""):
        rate = done / max(time.time() - start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        filled = 30 * done // max(self.total, 1)
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} "
                         f"{rate:.1f}/s eta {eta:.0f}s{end}")
        sys.stderr.flush()

    def __iter__(self):
        if not self.enabled:
            yield from self.iterable
            return
        start = last = time.time()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            if time.time() - last > 0.5:
                self._draw(done, start)
                last = time.time()
        self._draw(done, start, end="\n")


def _gather(obj, dist):
    """The list of every process's `obj` (a one-element list without a process group)."""
    if not dist.is_ddp:
        return [obj]
    gathered = [None] * dist.world_size
    tdist.all_gather_object(gathered, obj)
    return gathered


def predict_items(model, dataset, collate, cfg, dist, max_items=0, desc=None) -> np.ndarray:
    """model.predict(batch) -> (B,) over the first `max_items` items of `dataset` (0 = all), item i on process
    i % world_size, gathered onto every process in dataset order: (n,) predictions. A progress bar when `desc`."""
    count = len(dataset) if max_items <= 0 else min(max_items, len(dataset))
    shard = _Indexed(dataset, range(dist.rank, count, dist.world_size))
    loader = DataLoader(shard, batch_size=cfg.micro_batch_size, collate_fn=collate, num_workers=cfg.num_workers)
    indices, preds = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.float64)]
    for batch in Progress(loader, len(loader), desc, enabled=desc is not None and dist.master):
        batch = to_device(batch, dist.device)
        preds.append(model.predict(batch).double().cpu())
        indices.append(batch["index"].cpu())
    parts = _gather((torch.cat(indices), torch.cat(preds)), dist)
    order = torch.cat([i for i, _ in parts]).argsort()
    return torch.cat([p for _, p in parts])[order].numpy()


def _classification_outputs(logits, labels):
    return {"loss": F.cross_entropy(logits.float(), labels), "acc": (logits.argmax(-1) == labels).float().mean()}


class ClassifierModel(TaskModel):
    """Encoder + classifier over the pooled output (SNLI-VE, GLUE classification, CIFAR-10)."""

    def predict(self, batch):  # -> (B,) class
        return self.logits(batch).argmax(-1)


def unused_modules(model, inputs: str) -> list:
    """Dotted names of the encoder parts a text-only or image-only task never runs: they take no part in
    training (no gradient, so DDP needs no unused-parameter search) and are listed as such at start."""
    enc = model.encoder
    if inputs not in ("text", "image"):
        return []
    if isinstance(enc, TwoTowerEncoder):  # unimodal input skips the cross-modal layers and the other tower
        other = "vision_tower image_proj image_norm image_pooler" if inputs == "text" else \
            "text_tower text_proj text_norm text_pooler"
        return [f"encoder.{name}" for name in ["cross_layers"] + other.split()]
    names = ["image_embeddings"] if inputs == "text" else ["text_embeddings", "text_embeddings_project"]
    if enc.image_pooler is not None:  # "double" pooling: text-only input pools with one pooler, image-only the other
        names.append("image_pooler" if inputs == "text" else "text_pooler")
    return [f"encoder.{name}" for name in names if getattr(enc, name) is not None]


# -----------------------------------------------------------------------------
# Synthetic versions: generated once, atomically, beside the synthetic world

SYNTHETIC_VERSION = 1  # bump when a generator changes, so old files on disk are refused, not reused
SYNTHETIC_MARKER = "synthetic.json"  # written last into each generated folder: present = complete


def ensure_generated(world_root: Path, folder: str, generate, seed: int, timeout_seconds=3600.0) -> Path:
    """world_root/folder, generating it first with generate(staging_dir, world_root, rng) if missing.

    As for the world itself (data.generate_once): local rank 0 writes into a hidden temporary folder
    beside the target and renames it into place in one step, so the folder is complete or absent; the other
    local ranks wait for its marker. The rng depends only on (seed, folder): the files are deterministic."""
    target = Path(world_root) / folder
    marker = target / SYNTHETIC_MARKER
    wanted = {"version": SYNTHETIC_VERSION, "seed": seed}

    def write(staging):
        generate(staging, Path(world_root), np.random.default_rng([seed, zlib.crc32(folder.encode())]))
        (staging / SYNTHETIC_MARKER).write_text(json.dumps(wanted))

    data.generate_once(target, marker, write, int(os.environ.get("LOCAL_RANK", "0")), timeout_seconds,
                       "a synthetic task")
    found = _read_json(marker)
    if found != wanted:
        raise ValueError(f"{marker}: generated with {found}, this code writes {wanted}; delete {target}")
    return target


def _world_scenes(world_root: Path):
    """The synthetic world's scenes [{"image_id", "split", "objects"}] and its picture side in pixels."""
    world = _read_json(Path(world_root) / "scenes.json")
    return world["scenes"], world["image_size"]


def _world_image(world_root: Path, scene) -> Path:
    folder = "train2014" if scene["split"] == "train" else "val2014"  # as data.generate_synthetic_world files them
    return Path(world_root) / "coco" / folder / f"COCO_{folder}_{scene['image_id']:012d}.jpg"


def _kind(obj):
    return obj["colour"], obj["shape"]


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def _where(obj, image_size) -> str:
    """The object's place on a 3x3 grid as an answer: 'top left', 'left', 'middle'."""
    return data.position_phrase(obj, image_size).split(" ", 2)[2]


def _statement(objects, image_size, rng, true: bool) -> str:
    """A statement about one object of the scene, true or false. Both are drawn from the same templates
    ('a red circle', 'a large red circle at the top', 'there is a red circle', 'a red circle left of a blue
    square', 'there are two red circles'), so that only the picture tells them apart: a false one describes
    an object of a kind the scene lacks (same place, size and relations), or a present kind with a wrong count."""
    obj = _pick(rng, objects)
    kinds = Counter(_kind(o) for o in objects)
    template = int(rng.integers(5))
    if template == 4:  # a count
        count = kinds[_kind(obj)] if true else _pick(rng, [n for n in (1, 2, 3, 4) if n != kinds[_kind(obj)]])
        return f"there {'is' if count == 1 else 'are'} {data.count_phrase(count, *_kind(obj))}"
    if not true:  # the same object as a kind the scene lacks
        colour, shape = _pick(rng, [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in kinds
                                    and (c == obj["colour"] or s == obj["shape"])])
        obj = {**obj, "colour": colour, "shape": shape}
    others = [(o, r) for o in objects if o is not obj for r in data.spatial_relations(obj, o)]
    if template == 3 and others:
        other, relation = _pick(rng, others)
        return f"{data.noun_phrase(obj)} {relation} {data.noun_phrase(other)}"
    if template == 2:
        return f"there is {data.noun_phrase(obj)}"
    phrase = data.noun_phrase(obj, with_size=template == 1)
    return f"{phrase} {data.position_phrase(obj, image_size)}" if template == 1 or rng.random() < 0.5 else phrase


NEUTRAL_PROPERTIES = ("heavy", "moving", "wooden")  # never shown by a picture: neither entailed nor contradicted


def _neutral_statement(objects, rng) -> str:
    return f"{data.noun_phrase(_pick(rng, objects))} is {_pick(rng, NEUTRAL_PROPERTIES)}"


def _write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# -----------------------------------------------------------------------------
# The task interface


class Task:
    """A downstream task: where its files are, how its items become batches, its model and its evaluation.
    Subclasses provide dataset, label_names, build_model, score and write_predictions."""

    inputs = "image_text"  # "image_text" | "image_pair_text" (NLVR2) | "text" (GLUE) | "image" (CIFAR-10)

    def __init__(self, name, folder, metrics, train_splits, val_split, eval_splits):
        self.name, self.folder, self.metrics = name, folder, metrics  # metrics: names as logged, <task>_<metric>
        self.train_splits = train_splits  # splits fine-tuned on by default
        self.val_split = val_split  # split validated on during fine-tuning by default
        self.eval_splits = eval_splits  # splits evaluate.py scores by default

    # where the files are

    def synthetic_parts(self) -> list:
        """(folder, generate) for each folder of the synthetic version, in the order they must be generated."""
        return []

    def root(self, cfg) -> Path:
        """data_root, or with synthetic_task the synthetic world with this task's folders generated in it."""
        if not cfg.synthetic_task:
            return Path(cfg.data_root)
        for key in ("task_dir", "coco_dir", "f30k_dir"):
            if getattr(cfg, key):
                raise ValueError(f"{key}={getattr(cfg, key)!r} names real data, but synthetic_task=True reads "
                                 f"{Path(cfg.data_root) / 'synthetic'}: unset {key}")
        world = data.ensure_synthetic_world(cfg)
        for folder, generate in self.synthetic_parts():
            ensure_generated(world, folder, generate, cfg.synthetic_seed)
        return world

    def folder_of(self, cfg, key="task_dir", name=None) -> Path:
        """cfg.<key> when set, else <root>/<name> (name defaults to the task's folder)."""
        return Path(getattr(cfg, key)) if getattr(cfg, key) else self.root(cfg) / (name or self.folder)

    # splits

    def training_splits(self, cfg) -> list:
        return list(cfg.train_splits) or list(self.train_splits)

    def validation_split(self, cfg) -> str:
        split = cfg.val_split or self.val_split
        if split in self.training_splits(cfg):
            raise ValueError(f"val_split={split!r} is also in train_splits {self.training_splits(cfg)}: "
                             f"validation would score training data")
        return split

    def evaluation_splits(self, cfg) -> list:
        return list(cfg.eval_splits) or list(self.eval_splits)

    def dataset(self, cfg, split: str, transform: Transform, label_names=None) -> Dataset:
        """One split as its reader gives it. label_names: the run's (VQA's targets need its answer vocabulary)."""
        raise NotImplementedError

    def train_dataset(self, cfg, transform: Transform, label_names=None) -> Dataset:
        parts = [self.dataset(cfg, split, transform, label_names) for split in self.training_splits(cfg)]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def eval_dataset(self, cfg, split: str, transform: Transform, label_names=None) -> Dataset:
        return self.dataset(cfg, split, transform, label_names)

    # model and batches

    def label_names(self, cfg) -> list:
        """What the head's outputs mean, saved as labels.json in the run so evaluation rebuilds the same head."""
        return []

    def build_model(self, encoder, label_names: list) -> FreezableModel:
        raise NotImplementedError

    def init_head(self, model, pretrained_state: dict) -> Optional[str]:
        """Initialise the new head from pretraining weights where that makes sense; returns what was done."""
        return None

    def collate(self, tokenizer, cfg):
        return Collator(tokenizer, cfg.max_text_len)

    def train_collate(self, tokenizer, cfg):
        return self.collate(tokenizer, cfg)

    def prepare(self, batch: dict, generator, cfg) -> dict:
        """Per-step work on a training batch already on the device (retrieval draws its negatives here)."""
        return batch

    # evaluation

    def evaluate(self, model, dataset, split, tokenizer, cfg, dist, max_items=0, desc=None):
        """(metrics, predictions) over the first max_items items of the split (0 = all); every process gets both."""
        preds = predict_items(model, dataset, self.collate(tokenizer, cfg), cfg, dist, max_items, desc)
        return self.score(preds, dataset, split), preds

    def score(self, preds: np.ndarray, dataset, split: str) -> dict:
        """The task's metrics for predictions of the first len(preds) items; {} for a split without labels."""
        raise NotImplementedError

    def write_predictions(self, preds: np.ndarray, dataset, label_names: list, path_stem: Path) -> Path:
        raise NotImplementedError


# -----------------------------------------------------------------------------
# NLVR2: two images + a statement -> true / false


def nlvr2_sentence_key(identifier: str) -> str:
    """`split-set-pair-sentence` with the pair id blanked ("dev-850-0-1" -> "dev-850--1"): the key that
    groups one sentence across its image pairs, exactly as the official metrics.py forms it."""
    parts = identifier.split("-")
    parts[2] = ""
    return "-".join(parts)


class NLVR2Dataset(Dataset):
    """`{split}.json` (train, dev, test1): one JSON object per line. Item: {"image0", "image1" (3, H, W),
    "text", "label" (1 = "True"), "identifier", "sentence_key" (for nlvr2_consistency)}.

    Images: the identifier minus its last `-k`, plus `-img0.png` (left) / `-img1.png` (right), under
    `nlvr2/images/train/<directory>/` for train and `nlvr2/<split>/` (or `nlvr2/images/<split>/`) otherwise."""

    LABELS = {"False": 0, "True": 1}

    def __init__(self, nlvr2_dir, split: str, transform: Transform):
        nlvr2_dir = Path(nlvr2_dir)
        self.transform = transform
        self.path = nlvr2_dir / f"{split}.json"
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: file not found")
        image_dir = _pick_dir([nlvr2_dir / split, nlvr2_dir / "images" / split], f"NLVR2 {split} images")
        identifiers, sentences, labels, pair_paths, line_numbers = [], [], [], [], []
        for line_no, record in _read_jsonl(self.path):
            where = f"{self.path}:{line_no}"
            identifier = str(_field(record, "identifier", where))
            if len(identifier.split("-")) != 4:
                raise ValueError(f"{where}: identifier {identifier!r} is not split-set-pair-sentence")
            pair_dir = image_dir / str(_field(record, "directory", where)) if split == "train" else image_dir
            identifiers.append(identifier)
            sentences.append(str(_field(record, "sentence", where)))
            labels.append(_label(_field(record, "label", where), self.LABELS, where, "label"))
            pair_paths.append(str(pair_dir / identifier.rsplit("-", 1)[0]))
            line_numbers.append(line_no)
        self.identifiers = StringArray(identifiers)
        self.sentences = StringArray(sentences)
        self.pair_paths = StringArray(pair_paths)  # image path without the -img0.png / -img1.png suffix
        self.labels = np.array(labels, dtype=np.int64)  # (N,)
        self.line_numbers = np.array(line_numbers, dtype=np.int64)  # (N,)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        named_by = f"{self.path}:{self.line_numbers[i]}"
        pair = self.pair_paths[i]
        identifier = self.identifiers[i]
        return {"image0": self.transform(load_image(Path(pair + "-img0.png"), named_by)),
                "image1": self.transform(load_image(Path(pair + "-img1.png"), named_by)),
                "text": self.sentences[i], "label": int(self.labels[i]),
                "identifier": identifier, "sentence_key": nlvr2_sentence_key(identifier)}


def nlvr2_consistency(sentence_keys: Sequence[str], preds, labels) -> float:
    """Fraction of unique sentences (see nlvr2_sentence_key) whose predictions are all correct."""
    correct = np.asarray(preds) == np.asarray(labels)  # (N,)
    if len(sentence_keys) != len(correct) or len(correct) == 0:
        raise ValueError(f"nlvr2_consistency: {len(sentence_keys)} keys for {len(correct)} predictions")
    all_correct = {}
    for key, ok in zip(sentence_keys, correct):
        all_correct[key] = all_correct.get(key, True) and bool(ok)
    return sum(all_correct.values()) / len(all_correct)


class NLVR2Model(FreezableModel):
    """ViLT's pairing: one forward per image with the same statement, the images told apart by their
    modality-type embedding (1 left, 2 right); the two pooled outputs, concatenated, go into the classifier."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.head = ClassifierHead(2 * encoder.pooled_dim, 2)

    def heads(self):
        return [self.head]

    def logits(self, batch):  # -> (B, 2)
        text = self.encoder.encode_text(batch["input_ids"], batch["attention_mask"])  # encoded once for both
        left = self.encoder.fuse(text, self.encoder.encode_image(batch["pixel_values_left"], image_type=1))
        right = self.encoder.fuse(text, self.encoder.encode_image(batch["pixel_values_right"], image_type=2))
        return self.head(torch.cat([left.pooled, right.pooled], dim=-1))

    def forward(self, batch):
        return _classification_outputs(self.logits(batch), batch["labels"])

    def predict(self, batch):  # -> (B,) 1 = true
        return self.logits(batch).argmax(-1)


class NLVR2Task(Task):
    inputs = "image_pair_text"

    def synthetic_parts(self):
        return [("nlvr2", generate_synthetic_nlvr2)]

    def dataset(self, cfg, split, transform, label_names=None):
        return NLVR2Dataset(self.folder_of(cfg), split, transform)

    def label_names(self, cfg):
        return list(NLVR2Dataset.LABELS)

    def build_model(self, encoder, label_names):
        return NLVR2Model(encoder)

    def score(self, preds, dataset, split):
        labels = dataset.labels[:len(preds)]
        keys = [dataset.identifiers[i] for i in range(len(preds))]
        return {"nlvr2_acc": accuracy(preds, labels),
                "nlvr2_consistency": nlvr2_consistency([nlvr2_sentence_key(k) for k in keys], preds, labels)}

    def write_predictions(self, preds, dataset, label_names, path_stem):
        """`identifier,prediction` lines (True / False), the format the official metrics.py reads."""
        path = path_stem.with_suffix(".csv")
        _write_lines(path, [f"{dataset.identifiers[i]},{label_names[int(p)]}" for i, p in enumerate(preds)])
        return path


def _nlvr2_pairs(rng, scenes, holds):
    """Four (left, right) scenes realising the four combinations of (holds(left), holds(right)), in random
    order, or None when the scenes do not allow it."""
    with_it = [s for s in scenes if holds(s["objects"])]
    without = [s for s in scenes if not holds(s["objects"])]
    if not with_it or not without:
        return None
    combos = [(a, b) for a in (with_it, without) for b in (with_it, without)]
    return [(_pick(rng, combos[k][0]), _pick(rng, combos[k][1])) for k in rng.permutation(4)]


NLVR2_KIND_FRACTION = 0.2  # the rest name a colour only: a small model grounds colours long before shapes
NLVR2_HELDOUT_SETS_PER_PICTURE = 4  # dev and test1 have few pictures: more sets of them keep accuracy precise


def generate_synthetic_nlvr2(out: Path, world: Path, rng) -> None:
    """NLVR2 from the world's pictures: train from its train + restval scenes (one set per picture), dev from
    val, test1 from test (NLVR2_HELDOUT_SETS_PER_PICTURE sets per picture).
    A set is one property of a picture, a colour ("a red object") or, in NLVR2_KIND_FRACTION of the sets, a
    kind of object ("a red circle"), and four image pairs covering every combination of which side has it;
    its two sentences say the left / the right image has it, so each sentence is true for exactly two of its
    pairs and the text alone tells nothing. Images are the world's JPEG bytes, half of them
    re-encoded as real PNG: a reader that trusts the extension fails on the other half, as on the real files."""
    scenes, _ = _world_scenes(world)
    groups = {"train": ("train", "restval"), "dev": ("val",), "test1": ("test",)}
    for split, world_splits in groups.items():
        members = [s for s in scenes if s["split"] in world_splits]
        records, set_id = [], 0
        while set_id < max(4, len(members) * (1 if split == "train" else NLVR2_HELDOUT_SETS_PER_PICTURE)):
            obj = _pick(rng, _pick(rng, members)["objects"])
            if rng.random() < NLVR2_KIND_FRACTION:
                phrase, holds = f"a {obj['colour']} {obj['shape']}", lambda objs, k=_kind(obj): any(
                    _kind(o) == k for o in objs)
            else:
                phrase, holds = f"a {obj['colour']} object", lambda objs, c=obj["colour"]: any(
                    o["colour"] == c for o in objs)
            pairs = _nlvr2_pairs(rng, members, holds)
            if pairs is None:
                continue
            image_dir = out / "images" / "train" / str(set_id % 20) if split == "train" else out / split
            image_dir.mkdir(parents=True, exist_ok=True)
            sides = ["left", "right"] if rng.random() < 0.5 else ["right", "left"]
            for pair_id, (left, right) in enumerate(pairs):
                for side, scene in (("img0", left), ("img1", right)):
                    jpeg = _world_image(world, scene).read_bytes()
                    target = image_dir / f"{split}-{set_id}-{pair_id}-{side}.png"
                    if rng.random() < 0.5:
                        target.write_bytes(jpeg)
                    else:
                        Image.open(io.BytesIO(jpeg)).save(target, format="PNG")
                for sentence_id, side in enumerate(sides):
                    truth = holds((left if side == "left" else right)["objects"])
                    record = {"identifier": f"{split}-{set_id}-{pair_id}-{sentence_id}",
                              "sentence": f"there is {phrase} in the {side} image", "label": str(truth),
                              "left_url": f"synthetic://{left['image_id']}",
                              "right_url": f"synthetic://{right['image_id']}",
                              "writer": "synthetic", "validation": {}, "extra_validations": {},
                              "synset": "shape", "query": phrase}
                    if split == "train":
                        record["directory"] = set_id % 20
                    records.append(json.dumps(record))
            set_id += 1
        _write_lines(out / f"{split}.json", records)


# -----------------------------------------------------------------------------
# SNLI-VE: image + hypothesis -> entailment / neutral / contradiction


class SNLIVEDataset(Dataset):
    """`snli_ve_{split}.jsonl` (train, dev, test). Item: {"image", "text" (sentence2, the hypothesis; the
    caption premise sentence1 is not given to the model), "label"}. The image is Flickr30k `<id>.jpg`, the
    id under "Flickr30K_ID" ("3416050480", current generator) or "Flikr30kID" ("3416050480.jpg", the widely
    downloaded files). `pair_ids` keep each record's pairID for the predictions file."""

    LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}

    def __init__(self, snli_ve_dir, split: str, flickr_image_dir, transform: Transform):
        self.transform = transform
        self.image_dir = Path(flickr_image_dir)
        self.path = Path(snli_ve_dir) / f"snli_ve_{split}.jsonl"
        image_ids, hypotheses, labels, pair_ids, line_numbers = [], [], [], [], []
        for line_no, record in _read_jsonl(self.path):
            where = f"{self.path}:{line_no}"
            key = "Flickr30K_ID" if "Flickr30K_ID" in record else "Flikr30kID"
            image_id = str(_field(record, key, where)).removesuffix(".jpg")
            if not image_id.isdigit():
                raise ValueError(f"{where}: {key} {record[key]!r} is not a Flickr30k image id")
            image_ids.append(int(image_id))
            hypotheses.append(str(_field(record, "sentence2", where)))
            labels.append(_label(_field(record, "gold_label", where), self.LABELS, where, "gold_label"))
            pair_ids.append(str(_field(record, "pairID", where)))
            line_numbers.append(line_no)
        self.image_ids = np.array(image_ids, dtype=np.int64)  # (N,)
        self.hypotheses = StringArray(hypotheses)
        self.labels = np.array(labels, dtype=np.int64)  # (N,)
        self.pair_ids = StringArray(pair_ids)
        self.line_numbers = np.array(line_numbers, dtype=np.int64)  # (N,)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = load_image(self.image_dir / f"{self.image_ids[i]}.jpg", f"{self.path}:{self.line_numbers[i]}")
        return {"image": self.transform(image), "text": self.hypotheses[i], "label": int(self.labels[i])}


class SNLIVETask(Task):
    def synthetic_parts(self):
        return [("f30k", generate_synthetic_flickr30k), ("snli_ve", generate_synthetic_snli_ve)]

    def dataset(self, cfg, split, transform, label_names=None):
        images = self.folder_of(cfg, "f30k_dir", "f30k") / "flickr30k-images"
        return SNLIVEDataset(self.folder_of(cfg), split, images, transform)

    def label_names(self, cfg):
        return list(SNLIVEDataset.LABELS)

    def build_model(self, encoder, label_names):
        return ClassifierModel(encoder, len(label_names))

    def score(self, preds, dataset, split):
        return {"snli_ve_acc": accuracy(preds, dataset.labels[:len(preds)])}

    def write_predictions(self, preds, dataset, label_names, path_stem):
        path = path_stem.with_suffix(".json")
        path.write_text(json.dumps([{"pairID": dataset.pair_ids[i], "gold_label": label_names[dataset.labels[i]],
                                     "prediction": label_names[int(p)]} for i, p in enumerate(preds)]))
        return path


SYNTHETIC_FLICKR_ID = 1_000_000_000  # + the scene's image id: ten digits, like real Flickr ids
FLICKR_SPLIT = {"train": "train", "restval": "train", "val": "val", "test": "test"}  # world split -> Flickr30k split


def generate_synthetic_flickr30k(out: Path, world: Path, rng) -> None:
    """Flickr30k (Karpathy split) from the world: its pictures as flickr30k-images/<id>.jpg and its captions in
    karpathy/dataset_flickr30k.json (no filepath, no cocoid); train + restval scenes form train. The images
    of SNLI-VE and of Flickr30k retrieval."""
    (out / "flickr30k-images").mkdir(parents=True)
    scenes, _ = _world_scenes(world)
    split_of = {s["image_id"]: s["split"] for s in scenes}
    coco = _read_json(world / "coco" / "karpathy" / "dataset_coco.json")
    images = []
    for k, entry in enumerate(coco["images"]):
        flickr_id = SYNTHETIC_FLICKR_ID + entry["cocoid"]
        shutil.copyfile(world / "coco" / entry["filepath"] / entry["filename"],
                        out / "flickr30k-images" / f"{flickr_id}.jpg")
        sentences = [{**s, "imgid": k} for s in entry["sentences"]]
        images.append({"sentids": [s["sentid"] for s in sentences], "imgid": k, "sentences": sentences,
                       "split": FLICKR_SPLIT[split_of[entry["cocoid"]]], "filename": f"{flickr_id}.jpg"})
    (out / "karpathy").mkdir()
    (out / "karpathy" / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))


def generate_synthetic_snli_ve(out: Path, world: Path, rng) -> None:
    """SNLI-VE on the synthetic Flickr30k: for the first three captions of each picture (the premises), one
    hypothesis per label: a true caption (entailment), a property no picture shows such as 'a red circle is
    heavy' (neutral), an absent object or a wrong count (contradiction). train / dev / test follow the
    Flickr30k split. train spells the image key "Flikr30kID": "<id>.jpg" as the widely downloaded files do,
    dev and test "Flickr30K_ID": "<id>" as the current generator does."""
    scenes, image_size = _world_scenes(world)
    captions = {e["cocoid"]: [s["raw"] for s in e["sentences"]]
                for e in _read_json(world / "coco" / "karpathy" / "dataset_coco.json")["images"]}
    hypothesis = {"entailment": lambda objs: _statement(objs, image_size, rng, True),
                  "neutral": lambda objs: _neutral_statement(objs, rng),
                  "contradiction": lambda objs: _statement(objs, image_size, rng, False)}
    for split in ("train", "dev", "test"):
        lines = []
        for scene in scenes:
            if FLICKR_SPLIT[scene["split"]] != ("val" if split == "dev" else split):
                continue
            flickr_id = SYNTHETIC_FLICKR_ID + scene["image_id"]
            image_key = {"Flikr30kID": f"{flickr_id}.jpg"} if split == "train" else {"Flickr30K_ID": str(flickr_id)}
            for c, premise in enumerate(captions[scene["image_id"]][:3]):
                for label, make in hypothesis.items():
                    lines.append(json.dumps({
                        "gold_label": label, "sentence1": premise, "sentence2": make(scene["objects"]),
                        "captionID": f"{flickr_id}.jpg#{c}", "pairID": f"{flickr_id}.jpg#{c}r1{label[0]}",
                        "annotator_labels": [label], **image_key}))
        _write_lines(out / f"snli_ve_{split}.jsonl", lines)


# -----------------------------------------------------------------------------
# RefCOCO / RefCOCO+ / RefCOCOg: pick, among all annotated objects of the image, the one a phrase refers to


class RefCOCODataset(Dataset):
    """`refs(<split_by>).p` (Python-2 pickle) + `instances.json` (COCO format) in `refer_dir`; split_by is
    "unc" (RefCOCO, RefCOCO+: train/val/testA/testB), "umd" or "google" (RefCOCOg). One item per (ref,
    sentence) of the split: {"image", "text" (the sentence's `sent`), "boxes" (N, 4) xywh in pixels of
    ALL annotations of the image ordered by annotation id, "label" (index of the ref's ann_id among
    them: the box to pick), "image_size" (2,) = (width, height)}. The image file comes from instances.json (the refs'
    `file_name` carries an extra suffix). `ann_ids`, `ref_ids`, `sent_ids` name things in predictions."""

    def __init__(self, refer_dir, split: str, coco_image_dir, transform: Transform, split_by: str = "unc"):
        refer_dir = Path(refer_dir)
        self.transform = transform
        self.image_dir = Path(coco_image_dir)
        refs_path, instances_path = refer_dir / f"refs({split_by}).p", refer_dir / "instances.json"
        refs = _read_pickle(refs_path)
        if not isinstance(refs, list):
            raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
        refs_in_split = [(r, ref) for r, ref in enumerate(refs)
                         if _field(ref, "split", f"{refs_path}: ref {r}") == split]
        if not refs_in_split:
            found = sorted({str(ref["split"]) for ref in refs})
            raise ValueError(f"{refs_path}: no refs in split '{split}' (splits: {', '.join(found)})")
        self.instances_path = instances_path
        instances = _read_json(instances_path)
        images = {}
        for k, image in enumerate(_field(instances, "images", str(instances_path))):
            where = f"{instances_path}: images[{k}]"
            size = (int(_field(image, "width", where)), int(_field(image, "height", where)))
            images[_field(image, "id", where)] = (str(_field(image, "file_name", where)), *size)
        anns_by_image = {}
        for k, ann in enumerate(_field(instances, "annotations", str(instances_path))):
            where = f"{instances_path}: annotations[{k}]"
            bbox = _field(ann, "bbox", where)
            if len(bbox) != 4:
                raise ValueError(f"{where}: bbox {bbox!r} is not [x, y, w, h]")
            ann_id = int(_field(ann, "id", where))
            anns_by_image.setdefault(_field(ann, "image_id", where), []).append((ann_id, bbox))

        # Per used image: its annotations sorted by id, stored flat with offsets.
        image_row, file_names, sizes, offsets, ann_ids, boxes = {}, [], [], [0], [], []
        item_image, item_target, texts, ref_ids, sent_ids = [], [], [], [], []
        for r, ref in refs_in_split:
            where = f"{refs_path}: ref {r}"
            image_id, ann_id = _field(ref, "image_id", where), _field(ref, "ann_id", where)
            if image_id not in image_row:
                if image_id not in images:
                    raise ValueError(f"{where}: image_id {image_id} is not in {instances_path}")
                anns = sorted(anns_by_image.get(image_id, []), key=lambda a: a[0])
                image_row[image_id] = len(file_names)
                file_names.append(images[image_id][0])
                sizes.append(images[image_id][1:])
                ann_ids.extend(a[0] for a in anns)
                boxes.extend(a[1] for a in anns)
                offsets.append(len(ann_ids))
            row = image_row[image_id]
            image_ann_ids = ann_ids[offsets[row]:offsets[row + 1]]
            if ann_id not in image_ann_ids:
                raise ValueError(f"{where}: ann_id {ann_id} is not an annotation of image {image_id} "
                                 f"in {instances_path}")
            for s, sentence in enumerate(_field(ref, "sentences", where)):
                texts.append(str(_field(sentence, "sent", f"{where} sentence {s}")))
                sent_ids.append(int(_field(sentence, "sent_id", f"{where} sentence {s}")))
                ref_ids.append(int(_field(ref, "ref_id", where)))
                item_image.append(row)
                item_target.append(image_ann_ids.index(ann_id))
        self.file_names = StringArray(file_names)
        self.image_sizes = np.array(sizes, dtype=np.int64)  # (M, 2) width, height
        self.box_offsets = np.array(offsets, dtype=np.int64)  # (M + 1,) image m owns boxes[off[m]:off[m+1]]
        self.boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)  # (total annotations, 4) xywh
        self.ann_ids = np.array(ann_ids, dtype=np.int64)  # (total annotations,)
        self.texts = StringArray(texts)
        self.item_image = np.array(item_image, dtype=np.int64)  # (N,) row of the item's image
        self.targets = np.array(item_target, dtype=np.int64)  # (N,)
        self.ref_ids = np.array(ref_ids, dtype=np.int64)  # (N,)
        self.sent_ids = np.array(sent_ids, dtype=np.int64)  # (N,)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        row = self.item_image[i]
        image = load_image(self.image_dir / self.file_names[row], str(self.instances_path))
        start, end = self.box_offsets[row], self.box_offsets[row + 1]
        return {"image": self.transform(image), "text": self.texts[i],
                "boxes": torch.from_numpy(self.boxes[start:end].copy()),  # (N_boxes, 4)
                "label": int(self.targets[i]), "image_size": torch.from_numpy(self.image_sizes[row].copy())}

    def box_of(self, i: int, k: int):
        """(ann_id, [x, y, w, h]) of box k of item i's image."""
        start = self.box_offsets[self.item_image[i]]
        return int(self.ann_ids[start + k]), self.boxes[start + k].tolist()


class BoxScoringHead(nn.Module):
    """One score per candidate box from a single forward of (image, expression), rather than one forward
    per box crop as in the original: a box's feature is the mean of the fused image-patch features whose
    centres lie inside it (the patch under its centre when it covers none), plus its embedded geometry, so
    it sees the object with all its context at the cost of one pass; concatenated with the pooled output
    (which carries the expression), a classifier gives its score."""

    def __init__(self, dim, pooled_dim):
        super().__init__()
        self.geometry = nn.Linear(4, dim)
        self.score = ClassifierHead(pooled_dim + dim, 1)

    def forward(self, image_feats, pooled, boxes):  # (B, S, D), (B, Dp), (B, N, 4) x0 y0 x1 y1 -> (B, N)
        B, S, D = image_feats.shape
        grid = math.isqrt(S - 1)  # S = grid^2 + one or two leading tokens (CLS; DeiT's distillation token)
        patches = image_feats[:, S - grid * grid:]  # (B, P, D), row-major over the grid
        centres = (torch.arange(grid, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid
        cy, cx = (c.flatten() for c in torch.meshgrid(centres, centres, indexing="ij"))  # (P,)
        x0, y0, x1, y1 = (b[..., None] for b in boxes.unbind(-1))  # (B, N, 1)
        inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)  # (B, N, P)
        centre_patch = (((y0 + y1) / 2 * grid).long().clamp(0, grid - 1) * grid
                        + ((x0 + x1) / 2 * grid).long().clamp(0, grid - 1)).squeeze(-1)  # (B, N)
        inside |= F.one_hot(centre_patch, grid * grid).bool() & ~inside.any(-1, keepdim=True)
        weights = inside.to(patches.dtype) / inside.sum(-1, keepdim=True)  # (B, N, P)
        box_feats = weights @ patches + self.geometry(boxes.to(patches.dtype))  # (B, N, D)
        x = torch.cat([pooled[:, None].expand(-1, boxes.shape[1], -1), box_feats], dim=-1)  # (B, N, Dp + D)
        return self.score(x).squeeze(-1)


class RefCOCOModel(FreezableModel):
    """Encoder + BoxScoringHead; softmax cross-entropy over the real boxes of each image."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.head = BoxScoringHead(encoder.dim, encoder.pooled_dim)

    def heads(self):
        return [self.head]

    def box_scores(self, batch):  # -> (B, N_max), padding at -inf so that it never wins
        out = self.encoder(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        scores = self.head(out.image_feats, out.pooled, batch["boxes"]).float()
        return scores.masked_fill(~batch["box_mask"], float("-inf"))

    def forward(self, batch):
        return _classification_outputs(self.box_scores(batch), batch["labels"])

    def predict(self, batch):  # -> (B,) index of the chosen box
        return self.box_scores(batch).argmax(-1)


class RefCOCOTask(Task):
    def __init__(self, name, folder, split_by, eval_splits):
        super().__init__(name, folder, (f"{name}_acc",), ("train",), "val", eval_splits)
        self.split_by = split_by

    def synthetic_parts(self):
        return [(self.folder, lambda out, world, rng: generate_synthetic_refcoco(out, world, rng, self.folder))]

    def dataset(self, cfg, split, transform, label_names=None):
        images = self.folder_of(cfg, "coco_dir", "coco") / "train2014"
        return RefCOCODataset(self.folder_of(cfg), split, images, transform, self.split_by)

    def train_dataset(self, cfg, transform, label_names=None):
        if cfg.augment:
            raise ValueError(f"augment=True crops images at random, which would move the boxes of {self.name}; "
                             f"set augment=False")
        return super().train_dataset(cfg, transform, label_names)

    def build_model(self, encoder, label_names):
        return RefCOCOModel(encoder)

    def score(self, preds, dataset, split):
        return {f"{self.name}_acc": accuracy(preds, dataset.targets[:len(preds)])}

    def write_predictions(self, preds, dataset, label_names, path_stem):
        path = path_stem.with_suffix(".json")
        rows = []
        for i, p in enumerate(preds):
            ann_id, bbox = dataset.box_of(i, int(p))
            rows.append({"ref_id": int(dataset.ref_ids[i]), "sent_id": int(dataset.sent_ids[i]),
                         "ann_id": ann_id, "bbox": bbox, "correct": bool(p == dataset.targets[i])})
        path.write_text(json.dumps(rows))
        return path


def _referring_expressions(target, objects, image_size, flavour) -> list:
    """Expressions that pick out `target` alone among `objects`. "refcoco+" uses no location words, as the
    real RefCOCO+ forbids them; "refcocog" adds longer ones relating the object to another."""
    same = [o for o in objects if _kind(o) == _kind(target)]
    kind = f"{target['colour']} {target['shape']}"
    found = []
    if len(same) == 1:
        found.append(f"the {kind}")
    elif sum(o["size"] == target["size"] for o in same) == 1:
        found.append(f"the {target['size']} {kind}")
    if sum(o["colour"] == target["colour"] for o in objects) == 1:
        found.append(f"the {target['colour']} object")
    if flavour != "refcoco+":
        where = data.position_phrase(target, image_size)
        if sum(data.position_phrase(o, image_size) == where for o in same) == 1:
            found.append(f"the {kind} {where}")
    if flavour == "refcocog" and len(same) == 1:
        for other in objects:
            for relation in data.spatial_relations(target, other) if other is not target else []:
                found.append(f"the {target['size']} {kind} {relation} {data.noun_phrase(other)}")
    return found


def generate_synthetic_refcoco(out: Path, world: Path, rng, flavour: str) -> None:
    """RefCOCO ("refcoco"), RefCOCO+ ("refcoco+") or RefCOCOg ("refcocog") in the refer layout, on the world's
    train2014 pictures (as the real sets use COCO train2014) with at least two objects: every object is
    annotated (bbox, category = its shape) in instances.json, and each object some expression picks out
    alone becomes a ref with up to two sentences in refs(unc).p / refs(umd).p. Pictures are split ~76%
    train, 8% val, 16% test; in unc, test refs to circles, squares and triangles form testA and the others
    testB (the real testA holds people, testB other objects)."""
    scenes, image_size = _world_scenes(world)
    categories = [{"id": k + 1, "name": shape, "supercategory": "shape"} for k, shape in enumerate(SHAPES)]
    category_id = {c["name"]: c["id"] for c in categories}
    images, annotations, refs = [], [], []
    for scene in scenes:
        if scene["split"] != "train" or len(scene["objects"]) < 2:
            continue
        image_id = scene["image_id"]
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        draw = rng.random()
        split = "train" if draw < 0.76 else "val" if draw < 0.84 else "test"
        for k, obj in enumerate(scene["objects"]):
            ann_id = image_id * 10 + k
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id[obj["shape"]],
                                "bbox": [float(v) for v in obj["box"]], "area": float(obj["box"][2] * obj["box"][3]),
                                "iscrowd": 0, "segmentation": []})
            expressions = _referring_expressions(obj, scene["objects"], image_size, flavour)
            if not expressions:
                continue
            chosen = [expressions[j] for j in rng.permutation(len(expressions))[:2]]
            ref_split = split
            if split == "test" and flavour != "refcocog":
                ref_split = "testA" if obj["shape"] in ("circle", "square", "triangle") else "testB"
            sentences = [{"tokens": e.split(), "raw": e.capitalize(), "sent_id": len(refs) * 2 + j, "sent": e}
                         for j, e in enumerate(chosen)]
            refs.append({"image_id": image_id, "split": ref_split, "sentences": sentences,
                         "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                         "category_id": category_id[obj["shape"]],
                         "ann_id": ann_id, "sent_ids": [s["sent_id"] for s in sentences], "ref_id": len(refs)})
    with open(out / f"refs({'umd' if flavour == 'refcocog' else 'unc'}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (out / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": categories}))


# -----------------------------------------------------------------------------
# Image-text retrieval on the Karpathy splits of COCO (5k test) and Flickr30k (1k test)


class ImageListDataset(Dataset):
    """The pictures of a data.CaptionTable, one item {"image"} each."""

    def __init__(self, table: data.CaptionTable, transform: Transform, named_by: str):
        self.table, self.transform, self.named_by = table, transform, named_by

    def __len__(self):
        return len(self.table.image_ids)

    def __getitem__(self, i):
        return {"image": self.transform(load_image(Path(self.table.root) / self.table.image_paths[i], self.named_by))}


@dataclass
class RetrievalSplit:
    images: Dataset  # n_images items {"image"}
    image_ids: np.ndarray  # (n_images,) the dataset's own ids (cocoid, or Flickr30k imgid)
    captions: list  # n_captions strings, grouped by image in image order
    caption_image: np.ndarray  # (n_captions,) int64: row in `images` that each caption describes

    def __len__(self):
        return len(self.image_ids)

    def first_images(self, count: int) -> "RetrievalSplit":
        """The first `count` images and their captions (for a quick validation during fine-tuning)."""
        count = min(count, len(self))
        kept = int((self.caption_image < count).sum())  # captions are grouped by image, so a prefix
        return RetrievalSplit(torch.utils.data.Subset(self.images, range(count)), self.image_ids[:count],
                              self.captions[:kept], self.caption_image[:kept])


def load_retrieval_split(karpathy_json, image_root, split: str, transform: Transform,
                         captions_per_image: Optional[int] = 5) -> RetrievalSplit:
    """An evaluation split of `dataset_coco.json` (image_root = the coco folder holding train2014/ and
    val2014/) or `dataset_flickr30k.json` (image_root = flickr30k-images/), read by data.read_karpathy. The
    standard protocol keeps the first five captions of each image (5k images / 25k captions on COCO test);
    None keeps all."""
    table = data.read_karpathy(karpathy_json, image_root, {split: (split,)})[split]
    if len(table.image_ids) == 0:
        raise ValueError(f"{karpathy_json}: no images in split '{split}'")
    caption_image = table.caption_image  # (n_captions,) grouped by image
    first_of_image = np.searchsorted(caption_image, caption_image)  # index of each image's first caption
    keep = np.arange(len(caption_image)) - first_of_image < (captions_per_image or len(caption_image))
    captions = [table.captions[i] for i in np.flatnonzero(keep)]
    return RetrievalSplit(ImageListDataset(table, transform, str(karpathy_json)), table.image_ids, captions,
                          caption_image[keep])


RETRIEVAL_METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")


def retrieval_recall(scores, caption_image, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@K both ways from scores (n_images, n_captions), higher = better match, and caption_image
    (n_captions,) the true image of each caption.

    Text retrieval tr_rK: an image counts when its best-ranked true caption is within the top K captions.
    Image retrieval ir_rK: a caption counts when its true image is within the top K images.
    Ties rank pessimistically: a true item is placed after every other candidate with an equal score, so
    equal scores never make a hit (a constant scorer gets 0 at K=1). With fewer than K candidates every
    query counts (K is capped at the number of candidates)."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"retrieval_recall: scores must be (n_images, n_captions), got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    n_images, n_captions = scores.shape
    if caption_image.shape != (n_captions,):
        raise ValueError(f"retrieval_recall: caption_image has shape {caption_image.shape}, expected ({n_captions},)")
    if n_captions and (caption_image.min() < 0 or caption_image.max() >= n_images):
        raise ValueError(f"retrieval_recall: caption_image holds rows outside [0, {n_images})")
    if not np.isfinite(scores).all():
        raise ValueError("retrieval_recall: scores hold NaN or infinity")
    caption_counts = np.bincount(caption_image, minlength=n_images)  # (n_images,)
    if (caption_counts == 0).any():
        raise ValueError(f"retrieval_recall: image {int(np.argmin(caption_counts))} has no caption")

    true_scores = scores[caption_image, np.arange(n_captions)]  # (n_captions,)
    # image retrieval: other images scoring at least the true image's score rank above it
    image_rank = (scores >= true_scores[None, :]).sum(axis=0) - 1  # (n_captions,)
    # text retrieval: the image's best true caption is outranked by every false caption scoring at least as high
    best_true = np.full(n_images, -np.inf, dtype=scores.dtype)
    np.maximum.at(best_true, caption_image, true_scores)  # (n_images,)
    true_at_best = np.bincount(caption_image, weights=true_scores >= best_true[caption_image], minlength=n_images)
    text_rank = (scores >= best_true[:, None]).sum(axis=1) - true_at_best  # (n_images,)

    recalls = {}
    for k in ks:
        recalls[f"tr_r{k}"] = float((text_rank < k).mean())
        recalls[f"ir_r{k}"] = float((image_rank < k).mean())
    return recalls


def sample_negative_images(image_ids, num_negatives: int, generator):
    """Candidates for ranking each caption's picture: (candidates (B, 1 + k), valid (B, 1 + k) bool). Row i
    lists the caption's own row first, then k rows drawn without replacement among rows showing another
    picture; where fewer than k exist the surplus is marked invalid."""
    B = image_ids.shape[0]
    other_image = image_ids[None, :] != image_ids[:, None]  # (B, B)
    scores = torch.rand(B, B, generator=generator, device=image_ids.device).masked_fill(~other_image, -1.0)
    drawn = scores.topk(num_negatives, dim=1)  # top-k of iid uniform scores: a uniform draw without replacement
    own = torch.arange(B, device=image_ids.device)[:, None]
    candidates = torch.cat([own, drawn.indices], dim=1)  # (B, 1 + k)
    valid = torch.cat([torch.ones_like(own, dtype=torch.bool), drawn.values >= 0], dim=1)  # (B, 1 + k)
    return candidates, valid


class RetrievalModel(FreezableModel):
    """Encoder + a match score per (image, caption) pair: a linear layer over the pooled pair output. Trained
    as ViLT is, with a softmax over one positive and several negative pictures per caption."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.pooled_dim, 1)

    def heads(self):
        return [self.head]

    def match(self, text: Embedded, image: Embedded):  # N pairs of encoded captions and pictures -> (N,)
        return self.head(self.encoder.fuse(text, image).pooled).squeeze(-1)

    def forward(self, batch):
        text = self.encoder.encode_text(batch["input_ids"], batch["attention_mask"])
        image = self.encoder.encode_image(batch["pixel_values"])  # each picture encoded once, fused with many captions
        candidates, valid = batch["candidate_images"], batch["candidate_mask"]  # (B, K)
        B, K = candidates.shape
        captions = torch.arange(B, device=candidates.device).repeat_interleave(K)  # (B K,)
        logits = self.match(text.select(captions), image.select(candidates.flatten())).float().view(B, K)
        logits = logits.masked_fill(~valid, float("-inf"))
        positive = torch.zeros(B, dtype=torch.long, device=logits.device)
        return {"loss": F.cross_entropy(logits, positive), "acc": (logits.argmax(-1) == 0).float().mean()}


def retrieval_scores(model, split: RetrievalSplit, tokenizer, cfg, dist, desc=None) -> np.ndarray:
    """(n_images, n_captions) match scores by full cross-encoder ranking. Each picture goes through the image
    side once and each caption through the text side once; only the fusion runs per pair, in batches of
    eval_pairs_batch pairs. Process r scores images r, r + world_size, ...; every process gets the matrix."""
    if cfg.eval_pairs_batch < 1:
        raise ValueError(f"eval_pairs_batch={cfg.eval_pairs_batch} must be at least 1")
    encoder, device, n_captions = model.encoder, dist.device, len(split.captions)
    rows = list(range(dist.rank, len(split), dist.world_size))
    images = None
    if rows:
        loader = DataLoader(torch.utils.data.Subset(split.images, rows), batch_size=cfg.micro_batch_size,
                            num_workers=cfg.num_workers)
        parts = [encoder.encode_image(batch["image"].to(device)) for batch in loader]
        images = Embedded(torch.cat([p.feats for p in parts]), torch.cat([p.mask for p in parts]))  # (n_rows, P, D)
    tokens = tokenizer(split.captions, padding="longest", truncation=True, max_length=cfg.max_text_len,
                       return_tensors="pt")  # one padded length for all captions, so their features stack
    ids, mask = tokens["input_ids"].long().to(device), tokens["attention_mask"].long().to(device)  # (n_captions, T)
    parts = [encoder.encode_text(ids[i:i + cfg.micro_batch_size], mask[i:i + cfg.micro_batch_size])
             for i in range(0, n_captions, cfg.micro_batch_size)]
    texts = Embedded(torch.cat([p.feats for p in parts]), torch.cat([p.mask for p in parts]))  # (n_captions, T, D)
    scores = torch.zeros(len(rows) * n_captions, device=device)  # this process's rows, flattened
    starts = range(0, len(scores), cfg.eval_pairs_batch)
    for start in Progress(starts, len(starts), desc, enabled=desc is not None and dist.master):
        pairs = torch.arange(start, min(start + cfg.eval_pairs_batch, len(scores)), device=device)
        scores[pairs] = model.match(texts.select(pairs % n_captions), images.select(pairs // n_captions)).float()
    scores = scores.view(len(rows), n_captions)
    if not dist.is_ddp:
        return scores.cpu().numpy()
    per_process = -(-len(split) // dist.world_size)
    padded = torch.zeros(per_process, n_captions, device=device)
    padded[:len(rows)] = scores
    gathered = [torch.empty_like(padded) for _ in range(dist.world_size)]
    tdist.all_gather(gathered, padded)
    full = torch.empty(len(split), n_captions)
    for rank, part in enumerate(gathered):
        full[rank::dist.world_size] = part[:len(range(rank, len(split), dist.world_size))].cpu()
    return full.numpy()


class RetrievalTask(Task):
    def __init__(self, name, folder, karpathy_json, image_folder, train_splits):
        prefix = name.removesuffix("_retrieval")
        super().__init__(name, folder, tuple(f"{prefix}_{m}" for m in RETRIEVAL_METRICS), train_splits, "val",
                         ("test",))
        self.prefix, self.karpathy_json, self.image_folder = prefix, karpathy_json, image_folder

    def folder_of(self, cfg, key=None, name=None):
        return super().folder_of(cfg, key or f"{self.folder}_dir", name)  # coco_dir / f30k_dir, not task_dir

    def synthetic_parts(self):
        return [("f30k", generate_synthetic_flickr30k)] if self.folder == "f30k" else []  # COCO: the world's own

    def _paths(self, cfg):
        folder = self.folder_of(cfg)
        return folder / "karpathy" / self.karpathy_json, folder / self.image_folder

    def train_dataset(self, cfg, transform, label_names=None):
        """Caption items, as in pretraining, so that negatives can be drawn by image_id."""
        if not 1 <= cfg.retrieval_negatives < cfg.micro_batch_size:
            raise ValueError(f"retrieval_negatives={cfg.retrieval_negatives} must be at least 1 and below "
                             f"micro_batch_size={cfg.micro_batch_size}: the negatives are other pictures of the "
                             f"micro-batch")
        karpathy_json, image_root = self._paths(cfg)
        table = data.read_karpathy(karpathy_json, image_root, {"train": tuple(self.training_splits(cfg))})["train"]
        return data.CaptionDataset(table, transform)

    def eval_dataset(self, cfg, split, transform, label_names=None):
        return load_retrieval_split(*self._paths(cfg), split, transform)

    def train_collate(self, tokenizer, cfg):
        return data.PretrainCollator(tokenizer, cfg.max_text_len)

    def prepare(self, batch, generator, cfg):
        candidates, valid = sample_negative_images(batch["image_ids"], cfg.retrieval_negatives, generator)
        return {**batch, "candidate_images": candidates, "candidate_mask": valid}

    def build_model(self, encoder, label_names):
        return RetrievalModel(encoder)

    def init_head(self, model, pretrained_state):
        """Start from the pretraining ITM head, as ViLT does: its match-minus-mismatch logit ranks pairs."""
        if "itm_head.weight" not in pretrained_state:
            return None
        weight, bias = pretrained_state["itm_head.weight"], pretrained_state["itm_head.bias"]  # (2, Dp), (2,)
        with torch.no_grad():
            model.head.weight.copy_(weight[1:] - weight[:1])
            model.head.bias.copy_(bias[1:] - bias[:1])
        return "head initialised from itm_head (match logit minus mismatch logit)"

    def evaluate(self, model, dataset, split, tokenizer, cfg, dist, max_items=0, desc=None):
        dataset = dataset.first_images(max_items) if max_items > 0 else dataset
        scores = retrieval_scores(model, dataset, tokenizer, cfg, dist, desc)
        return self.score(scores, dataset, split), scores

    def score(self, scores, dataset, split):
        return {f"{self.prefix}_{k}": v for k, v in retrieval_recall(scores, dataset.caption_image).items()}

    def write_predictions(self, scores, dataset, label_names, path_stem):
        """For each image its ten best captions and for each caption its ten best images (indices, best first)."""
        path = path_stem.with_suffix(".json")
        path.write_text(json.dumps({
            "image_ids": dataset.image_ids.tolist(), "captions": list(dataset.captions),
            "caption_image": dataset.caption_image.tolist(),
            "text_retrieval": np.argsort(-scores, axis=1, kind="stable")[:, :10].tolist(),
            "image_retrieval": np.argsort(-scores.T, axis=1, kind="stable")[:, :10].tolist()}))
        return path


# -----------------------------------------------------------------------------
# VQAv2: image + question -> answer, scored against ten human answers

# The official evaluation's normalisation (VQA PythonEvaluationTools vqaEval.py), rewritten.
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!")  # not "'" (contractions) and not "." (handled apart: keeps "2.5")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The official map sends each form below with one apostrophe left out ("dont", "couldnt've",
# "couldn'tve") back to the full form. Its entries with a capital letter can never match (words are
# lowercased first) and "somebody'd" -> "somebodyd" is an evident typo: neither is reproduced.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()
_CONTRACTIONS = {full[:i] + full[i + 1:]: full for full in _CONTRACTED for i, c in enumerate(full) if c == "'"}


def _vqa_punctuation(text: str) -> str:
    """A mark next to a space, or any mark in a text with a digit-comma-digit number ("1,000"), is deleted;
    other marks become a space ("black/white" -> "black white"). Then periods not before a digit go."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        out = out.replace(mark, "" if delete_all or mark + " " in text or " " + mark in text else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    """Lowercase, number words to digits ("two" -> "2", "none" -> "0"), articles dropped, contractions
    restored ("dont" -> "don't"), whitespace collapsed."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation of an answer: "Two dogs!" -> "2 dogs", "the 1,000" -> "1000"."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(answer))


def vqa_accuracy(pred: str, human_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one answer: the mean over the 10 leave-one-out subsets of the human answers
    of min(1, matches / 3). As in the official script the prediction is always normalised, while the human
    answers get the punctuation rule only when they are not all identical (identical ones compare as given)."""
    if len(human_answers) == 0:
        raise ValueError("vqa_accuracy: no human answers")
    pred = normalize_answer(pred)
    humans = [_vqa_punctuation(a) for a in human_answers] if len(set(human_answers)) > 1 else list(human_answers)
    matches = sum(h == pred for h in humans)
    return sum(min(1.0, (matches - (h == pred)) / 3) for h in humans) / len(humans)


def vqa_score(preds: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Mean vqa_accuracy over questions (the overall score, as a fraction, of the evaluation server)."""
    if len(preds) != len(human_answers) or len(preds) == 0:
        raise ValueError(f"vqa_score: {len(preds)} predictions for {len(human_answers)} questions")
    return sum(vqa_accuracy(p, h) for p, h in zip(preds, human_answers)) / len(preds)


def vqa_soft_score(count: int) -> float:
    """Training target of an answer given by `count` of the ten annotators: 0, .3, .6, .9, then 1."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def read_vqa_annotations(path) -> list:
    """The `annotations` list of `v2_mscoco_{split}_annotations.json`, each checked for ten answers."""
    path = Path(path)
    annotations = _field(_read_json(path), "annotations", str(path))
    for k, ann in enumerate(annotations):
        where = f"{path}: annotations[{k}]"
        for key in ("question_id", "image_id", "multiple_choice_answer"):
            _field(ann, key, where)
        answers = _field(ann, "answers", where)
        if len(answers) != 10:
            raise ValueError(f"{where}: {len(answers)} answers, expected 10")
        for a, answer in enumerate(answers):
            _field(answer, "answer", f"{where} answers[{a}]")
    return annotations


def build_answer_vocab(annotations: Iterable[dict], min_count: int = 9) -> list:
    """Answer classes: normalised `multiple_choice_answer`s that are the answer of at least `min_count`
    questions (3,129 on train + val with 9), most frequent first, ties alphabetical."""
    counts = Counter(normalize_answer(ann["multiple_choice_answer"]) for ann in annotations)
    return sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))


def heldout_split_by_image(image_ids, heldout_fraction: float, seed: int = 0):
    """Split rows into (train_rows, heldout_rows) so that no image is in both: the unique image ids are
    shuffled with `seed` and the first `heldout_fraction` of them are held out. For validating when only
    a training split is available, so training never validates on its own questions."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    image_ids = np.asarray(image_ids, dtype=np.int64)  # (N,)
    unique_ids = np.unique(image_ids)  # sorted, so the split does not depend on row order
    shuffled = np.random.default_rng(seed).permutation(unique_ids)
    n_heldout = max(1, round(heldout_fraction * len(unique_ids)))
    is_heldout = np.isin(image_ids, shuffled[:n_heldout])  # (N,)
    return np.flatnonzero(~is_heldout), np.flatnonzero(is_heldout)


class VQADataset(Dataset):
    """`v2_OpenEnded_mscoco_{split}_questions.json` and, except for the unannotated test splits,
    `v2_mscoco_{split}_annotations.json` in `vqa_dir`; split is train2014, val2014, test-dev2015 or test2015. Images:
    `coco_dir/<folder>/COCO_<folder>_<image_id:012d>.jpg`, folder = the split, test2015 for both test splits.
    Item: {"image", "text", "question_id"} plus, with annotations and an answer vocabulary, "target"
    (len(answer_vocab),) of soft scores (vqa_soft_score of the normalised human answers).
    `human_answers(i)` gives the ten raw answers that vqa_accuracy scores against; `select(indices)` a view
    on some questions (see heldout_split_by_image)."""

    def __init__(self, vqa_dir, split: str, coco_dir, transform: Transform,
                 answer_vocab: Optional[Sequence[str]] = None):
        vqa_dir = Path(vqa_dir)
        self.transform = transform
        self.questions_path = vqa_dir / f"v2_OpenEnded_mscoco_{split}_questions.json"
        folder = "test2015" if split.startswith("test") else split
        self.image_pattern = str(Path(coco_dir) / folder / f"COCO_{folder}_{{:012d}}.jpg")
        question_ids, image_ids, questions = [], [], []
        for k, question in enumerate(_field(_read_json(self.questions_path), "questions", str(self.questions_path))):
            where = f"{self.questions_path}: questions[{k}]"
            question_ids.append(int(_field(question, "question_id", where)))
            image_ids.append(int(_field(question, "image_id", where)))
            questions.append(str(_field(question, "question", where)))
        # Storage is indexed by question row r; item i of this dataset (or of a select() view) is row rows[i].
        self.rows = np.arange(len(question_ids))  # (N,)
        self.question_ids = np.array(question_ids, dtype=np.int64)  # (N,) per item
        self.image_ids = np.array(image_ids, dtype=np.int64)  # (N,) per item
        self.questions = StringArray(questions)
        self.answers = None  # StringArray of 10 raw human answers per row, row r at [10 r, 10 r + 10)
        self.answer_vocab = list(answer_vocab) if answer_vocab is not None else None
        self.targets = None  # (labels, scores, offsets): row r's soft target entries at [off[r], off[r + 1])

        annotations_path = vqa_dir / f"v2_mscoco_{split}_annotations.json"
        if split.startswith("test"):
            return
        by_question = {ann["question_id"]: ann for ann in read_vqa_annotations(annotations_path)}
        answers = []
        for k, question_id in enumerate(question_ids):
            if question_id not in by_question:
                raise ValueError(f"{annotations_path}: no annotation for question_id {question_id} "
                                 f"(questions[{k}] of {self.questions_path})")
            answers.extend(str(a["answer"]) for a in by_question[question_id]["answers"])
        self.answers = StringArray(answers)
        if self.answer_vocab is not None:
            self.targets = self._soft_targets(answers)

    def _soft_targets(self, answers: list):
        label_of = {answer: c for c, answer in enumerate(self.answer_vocab)}
        normalized = {}  # raw answers repeat a lot: normalise each distinct one once
        labels, scores, offsets = [], [], [0]
        for r in range(len(self.question_ids)):
            counts = Counter(normalized.setdefault(a, normalize_answer(a)) for a in answers[10 * r:10 * r + 10])
            for answer, count in sorted(counts.items()):
                if answer in label_of:
                    labels.append(label_of[answer])
                    scores.append(vqa_soft_score(count))
            offsets.append(len(labels))
        return (np.array(labels, dtype=np.int64), np.array(scores, dtype=np.float32),
                np.array(offsets, dtype=np.int64))

    def __len__(self):
        return len(self.rows)

    def human_answers(self, i: int) -> list:
        if self.answers is None:
            raise ValueError(f"{self.questions_path}: this split has no annotations")
        r = self.rows[i]
        return [self.answers[10 * r + k] for k in range(10)]

    def select(self, indices) -> "VQADataset":
        """A view on items `indices` of this dataset, sharing its storage."""
        indices = np.asarray(indices, dtype=np.int64)
        view = copy.copy(self)
        view.rows = self.rows[indices]
        view.question_ids, view.image_ids = self.question_ids[indices], self.image_ids[indices]
        return view

    def __getitem__(self, i):
        r, question_id, image_id = self.rows[i], int(self.question_ids[i]), int(self.image_ids[i])
        named_by = f"{self.questions_path}: question_id {question_id}"
        image = load_image(Path(self.image_pattern.format(image_id)), named_by)
        item = {"image": self.transform(image), "text": self.questions[r], "question_id": question_id}
        if self.targets is not None:
            labels, scores, offsets = self.targets
            target = torch.zeros(len(self.answer_vocab))  # (num_answers,)
            span = slice(offsets[r], offsets[r + 1])
            target[torch.from_numpy(labels[span])] = torch.from_numpy(scores[span])
            item["target"] = target
        return item


def write_vqa_results(path, question_ids: Sequence[int], answers: Sequence[str]) -> None:
    """The evaluation server's results file: [{"question_id": int, "answer": str}, ...]."""
    if len(question_ids) != len(answers):
        raise ValueError(f"{path}: {len(question_ids)} question ids for {len(answers)} answers")
    results = [{"question_id": int(q), "answer": str(a)} for q, a in zip(question_ids, answers)]
    Path(path).write_text(json.dumps(results))


class VQAModel(TaskModel):
    """Encoder + classifier over the answer vocabulary, trained with binary cross-entropy on the soft scores."""

    def forward(self, batch):
        logits = self.logits(batch).float()  # (B, A)
        targets = batch["targets"]  # (B, A)
        # mean over answers times their number (ViLT's scaling): the gradient does not shrink as the vocabulary grows
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        return {"loss": loss, "score": targets.gather(1, logits.argmax(-1, keepdim=True)).mean()}

    def predict(self, batch):  # -> (B,) answer class
        return self.logits(batch).argmax(-1)


class VQATask(Task):
    """VQAv2. The answer vocabulary comes from the training splits' annotations. Validation never scores
    training questions: with the default splits it is val2014; when val_split is also a training split (as when
    training on train2014 + val2014 for a test-dev submission), vqa_heldout_fraction of its images, drawn with
    the run's seed, are kept out of training, and that held-out part is what validation and evaluate.py score."""

    def __init__(self):
        super().__init__("vqa", "vqa", ("vqa_score",), ("train2014",), "val2014", ("val2014",))

    def synthetic_parts(self):
        return [("vqa", generate_synthetic_vqa)]

    def validation_split(self, cfg):
        return cfg.val_split or self.val_split

    def _heldout_images(self, cfg, image_ids) -> set:
        _, heldout = heldout_split_by_image(image_ids, cfg.vqa_heldout_fraction, seed=cfg.seed)
        return set(np.asarray(image_ids)[heldout].tolist())

    def _read(self, cfg, split, transform, label_names):
        return VQADataset(self.folder_of(cfg), split, self.folder_of(cfg, "coco_dir", "coco"), transform,
                          answer_vocab=label_names)

    def _heldout(self, cfg, dataset) -> np.ndarray:
        """(N,) bool: the questions on the held-out images of the validation split."""
        return np.isin(dataset.image_ids, list(self._heldout_images(cfg, dataset.image_ids)))

    def train_dataset(self, cfg, transform, label_names=None):
        parts = []
        for split in self.training_splits(cfg):
            dataset = self._read(cfg, split, transform, label_names)
            if split == self.validation_split(cfg):
                dataset = dataset.select(np.flatnonzero(~self._heldout(cfg, dataset)))
            parts.append(dataset)
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def eval_dataset(self, cfg, split, transform, label_names=None):
        dataset = self._read(cfg, split, transform, label_names)
        if split not in self.training_splits(cfg):
            return dataset
        if split != self.validation_split(cfg):
            raise ValueError(f"VQA split {split!r} is a training split: scoring it would score training questions")
        return dataset.select(np.flatnonzero(self._heldout(cfg, dataset)))

    def label_names(self, cfg):
        """The answer vocabulary: normalised answers of at least vqa_min_answer_count training questions."""
        annotations = []
        for split in self.training_splits(cfg):
            anns = read_vqa_annotations(self.folder_of(cfg) / f"v2_mscoco_{split}_annotations.json")
            if split == self.validation_split(cfg):
                heldout = self._heldout_images(cfg, [ann["image_id"] for ann in anns])
                anns = [ann for ann in anns if ann["image_id"] not in heldout]
            annotations += anns
        vocab = build_answer_vocab(annotations, cfg.vqa_min_answer_count)
        if not vocab:
            raise ValueError(f"VQA: no answer is given to {cfg.vqa_min_answer_count} training questions "
                             f"(vqa_min_answer_count): the answer vocabulary would be empty")
        return vocab

    def build_model(self, encoder, label_names):
        return VQAModel(encoder, len(label_names))

    def score(self, preds, dataset, split):
        if dataset.answers is None:  # test-dev / test: answers only on the evaluation server
            return {}
        answers = [dataset.answer_vocab[int(p)] for p in preds]
        return {"vqa_score": vqa_score(answers, [dataset.human_answers(i) for i in range(len(preds))])}

    def write_predictions(self, preds, dataset, label_names, path_stem):
        path = path_stem.with_suffix(".json")
        write_vqa_results(path, dataset.question_ids[:len(preds)], [label_names[int(p)] for p in preds])
        return path


POSITIONS = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")
_DIGIT_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}


def _vqa_questions(objects, image_size, rng) -> list:
    """Questions about a scene: (question, answer, question_type, answer_type, other plausible answers)."""
    found = []
    colours_of, shapes_of = {}, {}
    for obj in objects:
        colours_of.setdefault(obj["shape"], set()).add(obj["colour"])
        shapes_of.setdefault(obj["colour"], set()).add(obj["shape"])
    one_colour = [s for s, colours in colours_of.items() if len(colours) == 1]
    if one_colour:
        shape = _pick(rng, one_colour)
        colour = next(iter(colours_of[shape]))
        found.append((f"what colour is the {shape} ?", colour, "what color is the", "other",
                      [c for c in COLOURS if c != colour]))
    one_shape = [c for c, shapes in shapes_of.items() if len(shapes) == 1]
    if one_shape:
        colour = _pick(rng, one_shape)
        shape = next(iter(shapes_of[colour]))
        found.append((f"what shape is the {colour} object ?", shape, "what shape is the", "other",
                      [s for s in SHAPES if s != shape]))
    shape = _pick(rng, [o["shape"] for o in objects]) if rng.random() < 0.7 else _pick(rng, list(SHAPES))
    count = sum(o["shape"] == shape for o in objects)
    found.append((f"how many {SHAPES[shape]} are there ?", str(count), "how many", "number",
                  [str(n) for n in (count - 1, count + 1) if n >= 0]))
    kinds = Counter(_kind(o) for o in objects)
    if rng.random() < 0.5:
        colour, shape = _pick(rng, list(kinds))
    else:
        colour, shape = _pick(rng, [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in kinds])
    present = "yes" if (colour, shape) in kinds else "no"
    found.append((f"is there a {colour} {shape} ?", present, "is there a", "yes/no",
                  ["no" if present == "yes" else "yes"]))
    alone = [o for o in objects if kinds[_kind(o)] == 1]
    if alone:
        obj = _pick(rng, alone)
        where = _where(obj, image_size)
        found.append((f"where is the {obj['colour']} {obj['shape']} ?", where, "where is the", "other",
                      [p for p in POSITIONS if p != where]))
    return found


def _human_answers(answer, alternatives, rng) -> list:
    """Ten annotators: most give the answer, some write it another way ("two" for "2", "Red", "red."), which
    the official normalisation reconciles, and a few disagree."""
    def written_differently(a):
        if a in _DIGIT_WORDS:
            return _DIGIT_WORDS[a]
        return a.capitalize() if rng.random() < 0.5 else a + "."
    answers = []
    for _ in range(10):
        draw = rng.random()
        if draw < 0.1:
            answers.append(_pick(rng, alternatives))
        else:
            answers.append(written_differently(answer) if draw < 0.3 else answer)
    return answers


def generate_synthetic_vqa(out: Path, world: Path, rng) -> None:
    """VQAv2 on the world's pictures: questions about colour, shape, count, presence and position, each with
    ten human answers. train2014 holds the world's train scenes and val2014 the others, whose pictures the
    world already files as COCO_train2014_* / COCO_val2014_*; question ids are image id * 100 + k."""
    scenes, image_size = _world_scenes(world)
    for split, world_splits in (("train2014", ("train",)), ("val2014", ("restval", "val", "test"))):
        questions, annotations = [], []
        for scene in scenes:
            if scene["split"] not in world_splits:
                continue
            for k, (question, answer, question_type, answer_type, others) in enumerate(
                    _vqa_questions(scene["objects"], image_size, rng)):
                question_id = scene["image_id"] * 100 + k
                questions.append({"image_id": scene["image_id"], "question": question, "question_id": question_id})
                answers = [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                           for j, a in enumerate(_human_answers(answer, others, rng))]
                annotations.append({"question_id": question_id, "image_id": scene["image_id"],
                                    "question_type": question_type, "answer_type": answer_type,
                                    "multiple_choice_answer": answer, "answers": answers})
        info = {"description": "synthetic VQA", "version": "2.0"}
        (out / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(
            {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
             "questions": questions, "license": {}}))
        (out / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(
            {"info": info, "data_type": "mscoco", "data_subtype": split, "annotations": annotations, "license": {}}))


# -----------------------------------------------------------------------------
# GLUE (text only)


@dataclass(frozen=True)
class GlueFormat:
    folder: str
    text: str  # column names, as in the files' header
    text_pair: Optional[str]
    label: str
    labels: Optional[dict]  # label string -> class; None = a float score (STS-B, 0 to 5)
    columns: Optional[tuple] = None  # names for train/dev files without a header row (CoLA)
    skip_malformed: bool = False  # QQP: rows with the wrong number of fields are skipped and counted


_BINARY = {"0": 0, "1": 1}
_NLI = {"entailment": 0, "not_entailment": 1}
GLUE_FORMATS = {
    "cola": GlueFormat("CoLA", "sentence", None, "label", _BINARY, columns=("source", "label", "mark", "sentence")),
    "sst2": GlueFormat("SST-2", "sentence", None, "label", _BINARY),
    "mrpc": GlueFormat("MRPC", "#1 String", "#2 String", "Quality", _BINARY),
    "stsb": GlueFormat("STS-B", "sentence1", "sentence2", "score", None),  # columns 7, 8, score last
    "qqp": GlueFormat("QQP", "question1", "question2", "is_duplicate", _BINARY, skip_malformed=True),
    "mnli": GlueFormat("MNLI", "sentence1", "sentence2", "gold_label",  # columns 8, 9, gold_label last
                       {"entailment": 0, "neutral": 1, "contradiction": 2}),
    "qnli": GlueFormat("QNLI", "question", "sentence", "label", _NLI),
    "rte": GlueFormat("RTE", "sentence1", "sentence2", "label", _NLI),
    "wnli": GlueFormat("WNLI", "sentence1", "sentence2", "label", _BINARY),
}


class GLUEDataset(Dataset):
    """`glue_data/<TASK>/<split>.tsv`, split = train, dev, test (MNLI: dev_matched, dev_mismatched,
    test_matched, test_mismatched). Tab-separated with no quoting (sentences contain quote characters).
    Item: {"text", "text_pair" (None for single-sentence tasks), "label"}: a class, a float for STS-B,
    -1 in test files (no labels). QQP's malformed rows are skipped; `num_malformed` counts them."""

    def __init__(self, glue_dir, task: str, split: str):
        if task not in GLUE_FORMATS:
            raise ValueError(f"unknown GLUE task '{task}' (tasks: {', '.join(GLUE_FORMATS)})")
        fmt = GLUE_FORMATS[task]
        self.task, self.path = task, Path(glue_dir) / fmt.folder / f"{split}.tsv"
        is_test = split.startswith("test")
        texts, pairs, labels = [], [], []
        self.num_malformed = 0
        try:
            f = open(self.path, encoding="utf-8-sig", newline="")  # utf-8-sig: MRPC's files open with a BOM
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: file not found") from None
        with f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = fmt.columns if fmt.columns and not is_test else next(rows, None)
            if header is None:
                raise ValueError(f"{self.path}: empty file")
            wanted = [fmt.text] + ([fmt.text_pair] if fmt.text_pair else []) + ([] if is_test else [fmt.label])
            for name in wanted:
                if name not in header:
                    raise ValueError(f"{self.path}:1: no column '{name}' in the header {list(header)}")
            column = {name: header.index(name) for name in wanted}
            for row in rows:
                where = f"{self.path}:{rows.line_num}"
                if len(row) != len(header):
                    if fmt.skip_malformed:
                        self.num_malformed += 1
                        continue
                    raise ValueError(f"{where}: {len(row)} fields, expected {len(header)} ({', '.join(header)})")
                texts.append(row[column[fmt.text]])
                pairs.append(row[column[fmt.text_pair]] if fmt.text_pair else "")
                labels.append(-1 if is_test else self._parse_label(row[column[fmt.label]], fmt, where))
        self.texts = StringArray(texts)
        self.text_pairs = StringArray(pairs) if fmt.text_pair else None
        self.labels = np.array(labels, dtype=np.float32 if fmt.labels is None else np.int64)  # (N,)

    @staticmethod
    def _parse_label(value: str, fmt: GlueFormat, where: str):
        if fmt.labels is not None:
            return _label(value, fmt.labels, where, fmt.label)
        try:
            score = float(value)
        except ValueError:
            score = float("nan")
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"{where}: {fmt.label} {value!r} is not a number from 0 to 5")
        return score

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"text": self.texts[i], "text_pair": self.text_pairs[i] if self.text_pairs is not None else None,
                "label": self.labels[i].item()}




class RegressionModel(TaskModel):
    """Encoder + one output trained with mean squared error (STS-B's similarity from 0 to 5)."""

    def forward(self, batch):
        return {"loss": F.mse_loss(self.logits(batch).float().squeeze(-1), batch["labels"].float())}

    def predict(self, batch):  # -> (B,) score
        return self.logits(batch).squeeze(-1)


GLUE_METRICS = {"cola": ("cola_mcc",), "sst2": ("sst2_acc",), "mrpc": ("mrpc_f1", "mrpc_acc"),
                "stsb": ("stsb_pearson", "stsb_spearman"), "qqp": ("qqp_f1", "qqp_acc"),
                "mnli": ("mnli_m_acc", "mnli_mm_acc"), "qnli": ("qnli_acc",), "rte": ("rte_acc",),
                "wnli": ("wnli_acc",)}


class GLUETask(Task):
    """One GLUE task, text only, through the text side of either model type (task_dir: the glue_data folder)."""

    inputs = "text"

    def __init__(self, name):
        eval_splits = ("dev_matched", "dev_mismatched") if name == "mnli" else ("dev",)
        super().__init__(name, "glue_data", GLUE_METRICS[name], ("train",), eval_splits[0], eval_splits)
        self.format = GLUE_FORMATS[name]

    def synthetic_parts(self):
        return [("glue_data", generate_synthetic_glue)]

    def dataset(self, cfg, split, transform, label_names=None):
        return GLUEDataset(self.folder_of(cfg), self.name, split)

    def label_names(self, cfg):
        labels = self.format.labels
        return ["score"] if labels is None else sorted(labels, key=labels.get)

    def build_model(self, encoder, label_names):
        if self.format.labels is None:
            return RegressionModel(encoder, 1, unimodal=True)
        return ClassifierModel(encoder, len(label_names), unimodal=True)

    def score(self, preds, dataset, split):
        if split.startswith("test"):  # GLUE's test files carry no labels
            return {}
        preds = preds if self.format.labels is None else preds.astype(np.int64)
        return glue_metrics(self.name, preds, dataset.labels[:len(preds)], split)

    def write_predictions(self, preds, dataset, label_names, path_stem):
        """`index<TAB>prediction` rows under a header, the GLUE server's format."""
        path = path_stem.with_suffix(".tsv")
        rows = [f"{i}\t{p:.3f}" if self.format.labels is None else f"{i}\t{label_names[int(p)]}"
                for i, p in enumerate(preds)]
        _write_lines(path, ["index\tprediction"] + rows)
        return path


GLUE_SYNTHETIC_SIZES = {"train": 400, "dev": 100, "test": 50}


def generate_synthetic_glue(out: Path, world: Path, rng) -> None:
    """All nine GLUE tasks as TSV files in their real layouts (CoLA's train and dev without a header, MNLI's
    matched and mismatched dev and test files, a malformed row in QQP's train), over sentences about random
    scenes of the world's kind: acceptable vs. shuffled word order (CoLA), one object vs. several (SST-2),
    the same objects in another order vs. another scene (MRPC), the same question reworded (QQP), overlap of
    the objects described (STS-B, 0-5), entailment / neutral / contradiction (MNLI, RTE, WNLI), a sentence
    that answers the question or not (QNLI). Each example is a row keyed by the real files' column names."""
    _, image_size = _world_scenes(world)

    def scene(at_least=1):
        while len(objects := data.sample_scene(rng, image_size)) < at_least:
            pass
        return objects

    def listing(objects, reverse=False):  # 'two red circles and a blue star', in either order
        phrases = [data.count_phrase(n, c, s) for (c, s), n in Counter(_kind(o) for o in objects).items()]
        phrases = phrases[::-1] if reverse else phrases
        return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]

    def placed(objects):  # mismatched MNLI premises: another register, every object with its size and place
        return ", ".join(f"{data.noun_phrase(o, True)} {data.position_phrase(o, image_size)}" for o in objects)

    def nli(premise_of=listing):
        objects, label = scene(), _pick(rng, list(SNLIVEDataset.LABELS))
        hypothesis = _neutral_statement(objects, rng) if label == "neutral" else \
            _statement(objects, image_size, rng, true=label == "entailment")
        return {"sentence1": premise_of(objects), "sentence2": hypothesis, "label": label}

    def cola():
        words = _pick(rng, data.describe_scene(scene(), image_size, rng)).split()
        shuffled = [words[i] for i in rng.permutation(len(words))]
        bad = rng.random() < 0.5 and shuffled != words
        return {"source": "syn", "label": int(not bad), "mark": "*" if bad else "",
                "sentence": " ".join(shuffled if bad else words)}

    def sst2():
        several = rng.random() < 0.5
        while (len(objects := scene()) > 1) != several:
            pass
        return {"sentence": listing(objects), "label": int(several)}

    def mrpc():
        objects = scene()
        if rng.random() < 0.5:
            kinds = len({_kind(o) for o in objects})
            reworded = listing(objects, reverse=True) if kinds > 1 else \
                f"there {'is' if len(objects) == 1 else 'are'} {listing(objects)}"
            return {"#1 String": listing(objects), "#2 String": reworded, "Quality": 1}
        while listing(other := scene()) == listing(objects):
            pass
        return {"#1 String": listing(objects), "#2 String": listing(other), "Quality": 0}

    def qqp():
        colour, shape = _kind(_pick(rng, scene()))
        duplicate = rng.random() < 0.5
        first = f"is there a {colour} {shape} ?"
        if not duplicate:
            colour, shape = _pick(rng, [(c, s) for c in COLOURS for s in SHAPES if (c, s) != (colour, shape)])
        return {"question1": first, "question2": f"is there a {colour} {shape} in the image ?",
                "is_duplicate": int(duplicate)}

    def stsb():
        first = scene()
        second = [o for o in first if rng.random() < 0.5] + scene()[:int(rng.integers(0, 3))] or scene()
        a, b = {_kind(o) for o in first}, {_kind(o) for o in second}
        return {"sentence1": listing(first), "sentence2": listing(second),
                "score": f"{5 * len(a & b) / len(a | b):.3f}"}

    def qnli():
        obj = _pick(rng, scene())
        others = [o for o in scene() if o["shape"] != obj["shape"]]
        answers = rng.random() < 0.5 or not others
        sentence = f"{data.noun_phrase(obj)} {data.position_phrase(obj, image_size)}" if answers else \
            data.noun_phrase(_pick(rng, others))
        return {"question": f"what colour is the {obj['shape']} ?", "sentence": sentence,
                "label": "entailment" if answers else "not_entailment"}

    def mnli(premise_of):
        row = nli(premise_of)
        row.update({f"label{k}": row["label"] for k in range(1, 6)}, gold_label=row.pop("label"),
                   promptID=0, pairID=0, genre="placements" if premise_of is placed else "scenes")
        row.update({f"sentence{k}_binary_parse": f"( {row[f'sentence{k}']} )" for k in (1, 2)})
        row.update({f"sentence{k}_parse": f"(ROOT {row[f'sentence{k}']})" for k in (1, 2)})
        return row

    def write(folder, name, columns, make, n, header=True):
        rows = [{"index": i, "id": i, "#1 ID": 2 * i, "#2 ID": 2 * i + 1, "qid1": 2 * i, "qid2": 2 * i + 1,
                 "genre": "synthetic", "filename": "scenes", "year": "2024", "old_index": i, "source1": "none",
                 "source2": "none", **make()} for i in range(n)]
        lines = ["\t".join(columns)] if header else []
        lines += ["\t".join(str(row[c]) for c in columns) for row in rows]
        if folder == "QQP" and name == "train":
            lines.append("\t".join(map(str, [n, 2 * n, 2 * n + 1, "a row cut short"])))
        _write_lines(out / folder / f"{name}.tsv", lines)

    mnli_columns = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    stsb_columns = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    for split, n in GLUE_SYNTHETIC_SIZES.items():
        test = split == "test"
        write("CoLA", split, ["index", "sentence"] if test else ["source", "label", "mark", "sentence"], cola, n,
              header=test)
        write("SST-2", split, ["index", "sentence"] if test else ["sentence", "label"], sst2, n)
        write("MRPC", split, ["index" if test else "Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], mrpc, n)
        write("QQP", split, ["id", "question1", "question2"] if test else
              ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], qqp, n)
        write("STS-B", split, stsb_columns + ([] if test else ["score"]), stsb, n)
        write("QNLI", split, ["index", "question", "sentence"] + ([] if test else ["label"]), qnli, n)
        for folder, entailed, not_entailed in (("RTE", "entailment", "not_entailment"), ("WNLI", 1, 0)):
            write(folder, split, ["index", "sentence1", "sentence2"] + ([] if test else ["label"]),
                  lambda: {**(row := nli()), "label": entailed if row["label"] == "entailment" else not_entailed}, n)
        if split == "train":
            write("MNLI", "train", mnli_columns + ["label1", "gold_label"], lambda: mnli(listing), n)
            continue
        labels = [] if test else [f"label{k}" for k in range(1, 6)] + ["gold_label"]
        write("MNLI", f"{split}_matched", mnli_columns + labels, lambda: mnli(listing), n)
        write("MNLI", f"{split}_mismatched", mnli_columns + labels, lambda: mnli(placed), n)


# -----------------------------------------------------------------------------
# CIFAR-10 (image only), python version


class CIFAR10Dataset(Dataset):
    """`cifar-10-batches-py/`: data_batch_1..5 (split "train") or test_batch ("test"), batches.meta for
    label_names. Python-2 pickles whose keys load as bytes or str: both accepted. `data` is uint8
    (N, 3072): R, G, B planes of 32x32, row-major. Item: {"image", "label"}."""

    def __init__(self, cifar_dir, split: str, transform: Transform):
        cifar_dir = Path(cifar_dir)
        names = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
        if split not in names:
            raise ValueError(f"CIFAR-10 split must be train or test, got '{split}'")
        self.transform = transform
        meta = self._read_batch(cifar_dir / "batches.meta")
        self.label_names = [n.decode() if isinstance(n, bytes) else str(n)
                            for n in _field(meta, "label_names", str(cifar_dir / "batches.meta"))]
        images, labels = [], []
        for name in names[split]:
            path = cifar_dir / name
            batch = self._read_batch(path)
            data = np.asarray(_field(batch, "data", str(path)), dtype=np.uint8)
            batch_labels = np.asarray(_field(batch, "labels", str(path)), dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
                raise ValueError(f"{path}: data {data.shape} with {len(batch_labels)} labels; "
                                 f"expected (N, 3072) with N labels")
            outside = np.flatnonzero((batch_labels < 0) | (batch_labels >= len(self.label_names)))
            if len(outside):
                raise ValueError(f"{path}: labels[{outside[0]}] = {batch_labels[outside[0]]} is not a class "
                                 f"0..{len(self.label_names) - 1}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planes -> (N, 32, 32, 3)
            labels.append(batch_labels)
        self.images = np.ascontiguousarray(np.concatenate(images))  # (N, 32, 32, 3) uint8
        self.labels = np.concatenate(labels)  # (N,)

    @staticmethod
    def _read_batch(path: Path) -> dict:
        batch = _read_pickle(path)
        if not isinstance(batch, dict):
            raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
        return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.transform(Image.fromarray(self.images[i])), "label": int(self.labels[i])}



class CIFAR10Task(Task):
    """CIFAR-10, image only, through the vision side of either model type. The head has one output per
    label name in batches.meta (ten for CIFAR-10; the synthetic shape set has six)."""

    inputs = "image"

    def __init__(self):
        super().__init__("cifar10", "cifar-10-batches-py", ("cifar10_acc",), ("train",), "test", ("test",))

    def synthetic_parts(self):
        return [("cifar-10-batches-py", generate_synthetic_cifar10)]

    def dataset(self, cfg, split, transform, label_names=None):
        return CIFAR10Dataset(self.folder_of(cfg), split, transform)

    def label_names(self, cfg):
        meta_path = self.folder_of(cfg) / "batches.meta"
        return [n.decode() if isinstance(n, bytes) else str(n)
                for n in _field(CIFAR10Dataset._read_batch(meta_path), "label_names", str(meta_path))]

    def build_model(self, encoder, label_names):
        return ClassifierModel(encoder, len(label_names), unimodal=True)

    def score(self, preds, dataset, split):
        return {"cifar10_acc": accuracy(preds, dataset.labels[:len(preds)])}

    def write_predictions(self, preds, dataset, label_names, path_stem):
        path = path_stem.with_suffix(".json")
        path.write_text(json.dumps([{"index": i, "prediction": label_names[int(p)],
                                     "label": label_names[dataset.labels[i]]} for i, p in enumerate(preds)]))
        return path


def generate_synthetic_cifar10(out: Path, world: Path, rng) -> None:
    """A shape classification set in CIFAR-10's python layout: 32x32 pictures of one shape of any colour, size
    and place, labelled by shape (six classes, named in batches.meta); five training batches and a test batch
    of synthetic_images / 4 pictures each (at least 20). The batches have bytes keys, as pickles re-saved
    after loading with encoding="bytes" do, and batches.meta str keys: the reader must take both."""
    scenes, _ = _world_scenes(world)
    per_batch = max(20, len(scenes) // 4)
    shapes, colours, sizes = list(SHAPES), list(COLOURS), list(SIZES)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        labels, rows = [], []
        for _ in range(per_batch):
            label, size = int(rng.integers(len(shapes))), _pick(rng, sizes)
            side = round(SIZES[size] * 32)
            x, y = (int(v) for v in rng.integers(0, 32 - side + 1, size=2))
            obj = {"shape": shapes[label], "colour": _pick(rng, colours), "size": size, "box": [x, y, side, side]}
            pixels = np.asarray(data.render_scene([obj], 32))  # (32, 32, 3)
            rows.append(pixels.transpose(2, 0, 1).reshape(-1))  # R, G, B planes, each row-major
            labels.append(label)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": np.stack(rows).astype(np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        (out / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": shapes, "num_cases_per_batch": per_batch, "num_vis": 3 * 32 * 32}
    (out / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


# -----------------------------------------------------------------------------
# Metrics (pure functions on numpy / Python inputs)


def _pair(preds, labels, name):
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape or preds.ndim != 1 or len(preds) == 0:
        raise ValueError(f"{name}: predictions {preds.shape} and labels {labels.shape} must be equal, non-empty 1-D")
    return preds, labels


def accuracy(preds, labels) -> float:
    """Fraction of predictions equal to their label."""
    preds, labels = _pair(preds, labels, "accuracy")
    return float((preds == labels).mean())


def _binary_counts(preds, labels, name):
    preds, labels = _pair(preds, labels, name)
    for values, what in ((preds, "predictions"), (labels, "labels")):
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name}: {what} must be 0 or 1")
    tp = int(((preds == 1) & (labels == 1)).sum())
    tn = int(((preds == 0) & (labels == 0)).sum())
    fp = int(((preds == 1) & (labels == 0)).sum())
    fn = int(((preds == 0) & (labels == 1)).sum())
    return tp, tn, fp, fn


def matthews_corrcoef(preds, labels) -> float:
    """Binary Matthews correlation (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)); 0 when a
    factor is 0 (a constant predictor or a single-class label set), the usual convention."""
    tp, tn, fp, fn = _binary_counts(preds, labels, "matthews_corrcoef")
    denominator = float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / denominator ** 0.5 if denominator else 0.0


def f1_binary(preds, labels) -> float:
    """F1 of the positive class 1: 2 tp / (2 tp + fp + fn); 0 when there is no true positive."""
    tp, _, fp, fn = _binary_counts(preds, labels, "f1_binary")
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def pearson(x, y) -> float:
    """Pearson correlation; 0 when either input is constant (no linear relation can be measured)."""
    x, y = _pair(x, y, "pearson")
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def average_ranks(values) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span: [10, 20, 20, 30] -> [1, 2.5, 2.5, 4]."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts_group = np.r_[True, sorted_values[1:] != sorted_values[:-1]]  # (N,)
    group = np.cumsum(starts_group) - 1  # (N,) tie group of each sorted position
    first = np.flatnonzero(starts_group)  # (G,) first sorted position of each group
    last = np.r_[first[1:], len(values)] - 1  # (G,)
    ranks = np.empty(len(values))
    ranks[order] = ((first + last) / 2 + 1)[group]
    return ranks


def spearman(x, y) -> float:
    """Spearman correlation: Pearson of the average ranks (ties share their mean rank)."""
    x, y = _pair(x, y, "spearman")
    return pearson(average_ranks(x), average_ranks(y))


def glue_metrics(task: str, preds, labels, split: str = "dev") -> dict:
    """GLUE's metric(s) for one evaluated split, named as logged: cola_mcc; stsb_pearson, stsb_spearman;
    mrpc_f1, mrpc_acc; qqp_f1, qqp_acc; mnli_m_acc (split dev_matched) or mnli_mm_acc (dev_mismatched);
    <task>_acc for sst2, qnli, rte, wnli. preds are classes (STS-B: scores)."""
    if task == "cola":
        return {"cola_mcc": matthews_corrcoef(preds, labels)}
    if task == "stsb":
        return {"stsb_pearson": pearson(preds, labels), "stsb_spearman": spearman(preds, labels)}
    if task in ("mrpc", "qqp"):
        return {f"{task}_f1": f1_binary(preds, labels), f"{task}_acc": accuracy(preds, labels)}
    if task == "mnli":
        names = {"dev_matched": "mnli_m_acc", "dev_mismatched": "mnli_mm_acc"}
        if split not in names:
            raise ValueError(f"glue_metrics: mnli split must be dev_matched or dev_mismatched, got '{split}'")
        return {names[split]: accuracy(preds, labels)}
    if task in ("sst2", "qnli", "rte", "wnli"):
        return {f"{task}_acc": accuracy(preds, labels)}
    raise ValueError(f"glue_metrics: unknown GLUE task '{task}' (tasks: {', '.join(GLUE_FORMATS)})")


# -----------------------------------------------------------------------------
# Registry

TASKS = {task.name: task for task in [
    NLVR2Task("nlvr2", "nlvr2", ("nlvr2_acc", "nlvr2_consistency"), ("train",), "dev", ("dev", "test1")),
    SNLIVETask("snli_ve", "snli_ve", ("snli_ve_acc",), ("train",), "dev", ("dev", "test")),
    RefCOCOTask("refcoco", "refcoco", "unc", ("val", "testA", "testB")),
    RefCOCOTask("refcoco_plus", "refcoco+", "unc", ("val", "testA", "testB")),
    RefCOCOTask("refcocog", "refcocog", "umd", ("val", "test")),
    RetrievalTask("coco_retrieval", "coco", "dataset_coco.json", "", ("train", "restval")),
    RetrievalTask("f30k_retrieval", "f30k", "dataset_flickr30k.json", "flickr30k-images", ("train",)),
    VQATask(),
    *(GLUETask(name) for name in GLUE_FORMATS),
    CIFAR10Task(),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not a downstream task; choose from {', '.join(TASKS)}")
    return TASKS[name]
