"""SNLI-VE: its reader (the JSON lines files over Flickr30k images), its classification task and its
synthetic version.
"""

import json
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from data import StringArray
from tasks.base import Task
from tasks.common import ClassifierModel, Transform, _field, _label, _read_json, _read_jsonl, load_image
from tasks.metrics import accuracy
from tasks.synthetic import (FLICKR_SPLIT, SYNTHETIC_FLICKR_ID, _neutral_statement, _statement, _world_scenes,
                             _write_lines, generate_synthetic_flickr30k)

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

    def image_files(self):
        """(path, the line naming it) per item: see common.check_images_exist."""
        for i in range(len(self)):
            yield self.image_dir / f"{self.image_ids[i]}.jpg", f"{self.path}:{self.line_numbers[i]}"

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


def generate_synthetic_snli_ve(out: Path, world_root: Path, rng) -> None:
    """SNLI-VE on the synthetic Flickr30k: for the first three captions of each picture (the premises), one
    hypothesis per label: a true statement about an object, a count or a relation (entailment), a property no
    picture shows such as 'a red circle is heavy' (neutral), or a true statement with one attribute changed,
    its colour, shape, size, position, count or relation (contradiction: tasks.synthetic._statement). train / dev / test follow the
    Flickr30k split. train spells the image key "Flikr30kID": "<id>.jpg" as the widely downloaded files do,
    dev and test "Flickr30K_ID": "<id>" as the current generator does."""
    scenes, image_size = _world_scenes(world_root)
    captions = {e["cocoid"]: [s["raw"] for s in e["sentences"]]
                for e in _read_json(world_root / "coco" / "karpathy" / "dataset_coco.json")["images"]}
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
