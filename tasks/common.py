"""What the task modules share: reading helpers (images opened by content, JSON / JSON lines / pickle
files, fields and labels checked with the file and record named), batching (Collator, to_device) and the
evaluation loop (predictions spread over the processes and gathered in item order), with the plain
classification model most heads reuse.
"""

import json
import os
import pickle
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import data
import files
from encoders import TwoTowerEncoder
from model import TaskModel

Transform = Callable[[Image.Image], torch.Tensor]

# -----------------------------------------------------------------------------
# Reading helpers


def load_image(path, named_by: str) -> Image.Image:
    """data.open_image (format from the bytes, RGB), with the annotation that named the image in errors. Its
    errors stay data.ImageNotFoundError / data.BadImageError, so that a training loader skips, counts and logs
    the item as pretraining does (batching.ResumableLoader; strict_images stops instead)."""
    try:
        return data.open_image(path)
    except data.ImageNotFoundError:
        raise data.ImageNotFoundError(f"{path}: image not found (named by {named_by})") from None
    except data.BadImageError as error:
        raise data.BadImageError(f"{path}: not a readable image (named by {named_by}): {error}") from None


MISSING_IMAGES_SHOWN = 3  # missing files named in the error; the count says how many there are


def check_images_exist(dataset, what: str) -> None:
    """Raise one FileNotFoundError naming the first missing files among those `dataset.image_files()` lists
    ((path, the annotation naming it) per item; datasets without images have no such method), and how many
    are missing. Fine-tuning checks its validation and evaluation splits before training, so that a run
    cannot die at its first evaluation after hours of training."""
    if not hasattr(dataset, "image_files"):
        return
    named_by = {}
    for path, annotation in dataset.image_files():
        named_by.setdefault(str(path), annotation)
    missing = [path for path in named_by if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(missing[:MISSING_IMAGES_SHOWN]) + (", ..." if len(missing) > MISSING_IMAGES_SHOWN else "")
        raise FileNotFoundError(f"{what}: {len(missing)} of its {len(named_by)} image files not found: {shown} "
                                f"(the first named by {named_by[missing[0]]})")


_read_json = files.load_json  # one JSON reader for the project: errors name the file and line


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


def _int_field(record: dict, key: str, where: str) -> int:
    """An integer field (an int, or a string of digits as some copies write ids), or a one-line error naming
    the file, the record and the field."""
    value = _field(record, key, where)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{where}: field '{key}' is {value!r}, not an integer")


MALFORMED_LINES_SHOWN = 5  # line numbers reported per file; the count says how many rows were skipped


def malformed_rows(*datasets) -> dict:
    """{file: {"count": rows skipped, "first_lines": [line numbers]}} over the datasets (and ConcatDataset
    parts) whose reader skips malformed rows and lists them in `malformed_lines` (QQP); {} when none was."""
    found = {}
    for dataset in datasets:
        for part in getattr(dataset, "datasets", [dataset]):
            lines = getattr(part, "malformed_lines", None)
            if lines:
                found[str(part.path)] = {"count": len(lines), "first_lines": lines[:MALFORMED_LINES_SHOWN]}
    return found


def format_malformed_rows(found: dict) -> list:
    """One console line per file of malformed_rows(...)."""
    return [f"{path}: {m['count']} malformed rows skipped (lines {', '.join(map(str, m['first_lines']))}"
            f"{', ...' if m['count'] > len(m['first_lines']) else ''})" for path, m in found.items()]


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
    for batch in files.progress(loader, len(loader), desc, enabled=desc is not None):
        batch = to_device(batch, dist.device)
        preds.append(model.predict(batch).double().cpu())
        indices.append(batch["index"].cpu())
    parts = _gather((torch.cat(indices), torch.cat(preds)), dist)
    order = torch.cat([i for i, _ in parts]).argsort()
    return torch.cat([p for _, p in parts])[order].numpy()


def in_float32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) in float32 with autocast off: for the final layer of scores that are ranked or regressed, where
    bfloat16's 8-bit mantissa would round near scores into ties (which retrieval counts as misses)."""
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


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
    if hasattr(enc, "text_tower"):  # a dual encoder: unimodal input skips the other tower and its projection
        other = "vision_tower image_proj" if inputs == "text" else "text_tower text_proj"
        return [f"encoder.{name}" for name in other.split()]
    names = ["image_embeddings"] if inputs == "text" else ["text_embeddings", "text_embeddings_project"]
    if enc.image_pooler is not None:  # "double" pooling: text-only input pools with one pooler, image-only the other
        names.append("image_pooler" if inputs == "text" else "text_pooler")
    return [f"encoder.{name}" for name in names if getattr(enc, name) is not None]
