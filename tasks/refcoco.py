"""RefCOCO, RefCOCO+ and RefCOCOg: the reader of the refs(<split_by>).p and instances.json files, the
box-scoring head, accuracy, and the synthetic versions.
"""

import json
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

import world
from data import StringArray
from model import ClassifierHead, FreezableModel
from tasks.base import Task
from tasks.common import (Transform, _classification_outputs, _field, _int_field, _read_json, _read_pickle,
                          load_image)
from tasks.metrics import accuracy
from tasks.synthetic import _kind, _world_scenes
from towers import init_new
from world import SHAPES

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
            size = (_int_field(image, "width", where), _int_field(image, "height", where))
            images[_field(image, "id", where)] = (str(_field(image, "file_name", where)), *size)
        anns_by_image = {}
        for k, ann in enumerate(_field(instances, "annotations", str(instances_path))):
            where = f"{instances_path}: annotations[{k}]"
            bbox = _field(ann, "bbox", where)
            if len(bbox) != 4:
                raise ValueError(f"{where}: bbox {bbox!r} is not [x, y, w, h]")
            ann_id = _int_field(ann, "id", where)
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
                sent_ids.append(_int_field(sentence, "sent_id", f"{where} sentence {s}"))
                ref_ids.append(_int_field(ref, "ref_id", where))
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

    def image_files(self):
        """(path, the file naming it) per image: see common.check_images_exist."""
        for row in range(len(self.file_names)):
            yield self.image_dir / self.file_names[row], str(self.instances_path)

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

    def __init__(self, dim, pooled_dim, bert_init=False):
        super().__init__()
        self.geometry = init_new(nn.Linear(4, dim), bert_init)
        self.score = ClassifierHead(pooled_dim + dim, 1, bert_init=bert_init)

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
        self.head = BoxScoringHead(encoder.dim, encoder.pooled_dim, encoder.bert_init)

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
        return [(self.folder, lambda out, world_root, rng: generate_synthetic_refcoco(out, world_root, rng, self.folder))]

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
        where = world.position_phrase(target, image_size)
        if sum(world.position_phrase(o, image_size) == where for o in same) == 1:
            found.append(f"the {kind} {where}")
    if flavour == "refcocog" and len(same) == 1:
        for other in objects:
            for relation in world.relations(target, other) if other is not target else []:
                found.append(f"the {target['size']} {kind} {relation} {world.noun_phrase(other)}")
    return found


def generate_synthetic_refcoco(out: Path, world_root: Path, rng, flavour: str) -> None:
    """RefCOCO ("refcoco"), RefCOCO+ ("refcoco+") or RefCOCOg ("refcocog") in the refer layout, on the world's
    train2014 pictures (as the real sets use COCO train2014) with at least two objects: every object is
    annotated (bbox, category = its shape) in instances.json, and each object some expression picks out
    alone becomes a ref with up to two sentences in refs(unc).p / refs(umd).p. Pictures are split ~76%
    train, 8% val, 16% test; in unc, test refs to circles, squares and triangles form testA and the others
    testB (the real testA holds people, testB other objects)."""
    scenes, image_size = _world_scenes(world_root)
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
