"""NLVR2: its reader, its model (one pass per image, the two pooled outputs concatenated), accuracy and
consistency, and its synthetic version.
"""

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data import StringArray
from model import ClassifierHead, FreezableModel
from tasks.base import Task
from tasks.common import Transform, _classification_outputs, _field, _label, _pick_dir, _read_jsonl, load_image
from tasks.metrics import accuracy
import world
from tasks.synthetic import _pick, _world_image, _world_scenes, _write_lines

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

    def image_files(self):
        """(path, the line naming it) for both images of every item: see common.check_images_exist."""
        for i in range(len(self)):
            for side in ("-img0.png", "-img1.png"):
                yield self.pair_paths[i] + side, f"{self.path}:{self.line_numbers[i]}"

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
        self.head = ClassifierHead(2 * encoder.pooled_dim, 2, bert_init=encoder.bert_init)
        self.second_image_type_from_first()

    def second_image_type_from_first(self) -> None:
        """The right image's modality-type embedding (type 2) becomes a copy of the left's (type 1), as in ViLT
        and the original: pretraining never trains type 2, so left at its N(0, 1) start it would only be noise."""
        with torch.no_grad():
            self.encoder.modality_type.weight[2].copy_(self.encoder.modality_type.weight[1])

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

    def init_head(self, model, pretrained_state):
        """After the pretrained weights are in: type 2 starts from the pretrained type 1 (see NLVR2Model)."""
        model.second_image_type_from_first()
        return "new head initialised at random; second image type's embedding copied from the first's"

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


NLVR2_COLOUR_FRACTION = 0.5  # sets saying only that a colour is present: a small model grounds colours long before
#                              shapes, counts and relations, so a short fine-tuning run learns these first
NLVR2_CANDIDATES = 40  # pictures drawn per set, among which its four pairs are chosen
NLVR2_HELDOUT_SETS_PER_PICTURE = 4  # dev and test1 have few pictures: more sets of them keep accuracy precise


def _nlvr2_pairs(rng, scenes, statement, image_size):
    """Four (left, right) scenes realising the four combinations of (statement true of left, of right), in
    random order, or None when NLVR2_CANDIDATES pictures drawn at random do not allow it. A picture the
    statement is false of is, where the candidates hold one, a near miss: one that a one-attribute variant of
    the statement is true of (two red circles where the statement says three, a blue circle where it says a
    red one), so that telling the two apart takes the attribute the statement names."""
    variants = [v for _, v in world.one_attribute_variants(statement)]
    with_it, without, near = [], [], []
    for k in rng.choice(len(scenes), size=min(NLVR2_CANDIDATES, len(scenes)), replace=False):
        objects = scenes[k]["objects"]
        if world.statement_holds(statement, objects, image_size):
            with_it.append(scenes[k])
        else:
            without.append(scenes[k])
            if any(world.statement_holds(v, objects, image_size) for v in variants):
                near.append(scenes[k])
    without = near or without
    if not with_it or not without:
        return None
    combos = [(a, b) for a in (with_it, without) for b in (with_it, without)]
    return [(_pick(rng, combos[k][0]), _pick(rng, combos[k][1])) for k in rng.permutation(4)]


def generate_synthetic_nlvr2(out: Path, world_root: Path, rng) -> None:
    """NLVR2 from the world's pictures: train from its train + restval scenes (one set per picture), dev from
    val, test1 from test (NLVR2_HELDOUT_SETS_PER_PICTURE sets per picture).
    A set is one statement true of a picture: in NLVR2_COLOUR_FRACTION of the sets that a colour is present
    ("there is a red object"), in the others about an object, a count or a relation (world.sample_statement),
    and four image pairs covering every combination of which side it is true of, the other pictures near
    misses where the world has them (_nlvr2_pairs); its two sentences say it of the left / the right image,
    so each sentence is true for exactly two of its pairs and the text alone tells nothing. Images are the
    world's JPEG bytes, half of them re-encoded as real PNG: a reader that trusts the extension fails on the
    other half, as on the real files."""
    scenes, image_size = _world_scenes(world_root)
    groups = {"train": ("train", "restval"), "dev": ("val",), "test1": ("test",)}
    for split, world_splits in groups.items():
        members = [s for s in scenes if s["split"] in world_splits]
        records, set_id = [], 0
        while set_id < max(4, len(members) * (1 if split == "train" else NLVR2_HELDOUT_SETS_PER_PICTURE)):
            objects = _pick(rng, members)["objects"]
            if rng.random() < NLVR2_COLOUR_FRACTION:
                statement = {"type": "object", "colour": _pick(rng, objects)["colour"], "shape": None, "size": None,
                             "where": None}
            else:
                statement = world.sample_statement(objects, image_size, rng)
            phrase = world.statement_text(statement)
            pairs = _nlvr2_pairs(rng, members, statement, image_size)
            if pairs is None:
                continue
            image_dir = out / "images" / "train" / str(set_id % 20) if split == "train" else out / split
            image_dir.mkdir(parents=True, exist_ok=True)
            sides = ["left", "right"] if rng.random() < 0.5 else ["right", "left"]
            for pair_id, (left, right) in enumerate(pairs):
                for side, scene in (("img0", left), ("img1", right)):
                    jpeg = _world_image(world_root, scene).read_bytes()
                    target = image_dir / f"{split}-{set_id}-{pair_id}-{side}.png"
                    if rng.random() < 0.5:
                        target.write_bytes(jpeg)
                    else:
                        Image.open(io.BytesIO(jpeg)).save(target, format="PNG")
                for sentence_id, side in enumerate(sides):
                    truth = world.statement_holds(statement, (left if side == "left" else right)["objects"],
                                                  image_size)
                    record = {"identifier": f"{split}-{set_id}-{pair_id}-{sentence_id}",
                              "sentence": f"in the {side} image {phrase}", "label": str(truth),
                              "left_url": f"synthetic://{left['image_id']}",
                              "right_url": f"synthetic://{right['image_id']}",
                              "writer": "synthetic", "validation": {}, "extra_validations": {},
                              "synset": "shape", "query": phrase}
                    if split == "train":
                        record["directory"] = set_id % 20
                    records.append(json.dumps(record))
            set_id += 1
        _write_lines(out / f"{split}.json", records)
