"""Scene attributes (image only): which colours, shapes and kinds of object a picture of the synthetic world
holds, and how many objects in all. Its files are a synthetic world's own (world.py: scenes.json
and the pictures); it is the image-only objective a vision tower is pretrained with for the synthetic studies
(configs/synthetic_vision_tower.py), richer than synthetic CIFAR-10's one shape per picture: naming every kind
takes colour and shape bound together, among distractors, and the total takes counting.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import world
from model import TaskModel
from tasks.base import Task
from tasks.common import Transform, load_image
from tasks.synthetic import _world_image, _world_scenes

# -----------------------------------------------------------------------------
# Scene attributes: picture -> the set of kinds present and the number of objects

SCENE_PRESENT = [*world.COLOURS, *world.SHAPES,  # each colour, shape and kind present somewhere in the picture
                 *(f"{colour} {shape}" for colour in world.COLOURS for shape in world.SHAPES)]
SCENE_COUNTS = [f"{world.NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'}"
                for n in range(1, world.MAX_OBJECTS + 1)]  # how many objects in all: exactly one of them
SCENE_ATTRIBUTES = SCENE_PRESENT + SCENE_COUNTS  # 53: a prediction is a bitmask, which float64 holds exactly
SCENE_KINDS = slice(len(world.COLOURS) + len(world.SHAPES), len(SCENE_PRESENT))  # the kinds among SCENE_PRESENT
SCENE_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}  # split -> the world's splits


def scene_targets(objects) -> np.ndarray:
    """(len(SCENE_ATTRIBUTES),) float32 multi-hot: each colour, shape and kind present, and the total count."""
    target = np.zeros(len(SCENE_ATTRIBUTES), dtype=np.float32)
    for obj in objects:
        for name in (obj["colour"], obj["shape"], f"{obj['colour']} {obj['shape']}"):
            target[SCENE_PRESENT.index(name)] = 1.0
    target[len(SCENE_PRESENT) + len(objects) - 1] = 1.0
    return target


class SceneAttributesDataset(Dataset):
    """A synthetic world's pictures of one split (train = the world's train + restval) with their targets.
    Item: {"image", "target" (A,) multi-hot}."""

    def __init__(self, world_root, split: str, transform: Transform):
        if split not in SCENE_SPLITS:
            raise ValueError(f"scene attributes split must be one of {', '.join(SCENE_SPLITS)}, got '{split}'")
        self.world_root, self.transform = Path(world_root), transform
        scenes, _ = _world_scenes(self.world_root)
        self.scenes = [s for s in scenes if s["split"] in SCENE_SPLITS[split]]
        self.targets = np.stack([scene_targets(s["objects"]) for s in self.scenes]) if self.scenes else \
            np.zeros((0, len(SCENE_ATTRIBUTES)), dtype=np.float32)  # (N, A)

    def __len__(self):
        return len(self.scenes)

    def image_files(self):
        return [self._image_file(i) for i in range(len(self.scenes))]

    def _image_file(self, i):  # (path, the annotation naming it)
        return _world_image(self.world_root, self.scenes[i]), f"scenes.json image_id {self.scenes[i]['image_id']}"

    def __getitem__(self, i):
        return {"image": self.transform(load_image(*self._image_file(i))),
                "target": torch.from_numpy(self.targets[i])}


class SceneAttributesModel(TaskModel):
    """The encoder's image stream, pooled, and one logit per attribute: binary cross-entropy on each presence,
    summed over a picture's presences (a mean over 48 of them would leave them a 48th of the count's weight),
    plus cross-entropy over the counts (a picture has one)."""

    def __init__(self, encoder, num_attributes):
        super().__init__(encoder, num_attributes, unimodal=True)

    def forward(self, batch):
        logits, targets = self.logits(batch).float(), batch["targets"]  # (B, A) each
        present, count = len(SCENE_PRESENT), targets[:, len(SCENE_PRESENT):].argmax(-1)  # (B,)
        presences = F.binary_cross_entropy_with_logits(logits[:, :present], targets[:, :present], reduction="none")
        loss = presences.sum(-1).mean() + F.cross_entropy(logits[:, present:], count)  # per picture, then mean
        exact = (self._decide(logits) == (targets > 0.5)).all(-1)  # (B,) every attribute right
        return {"loss": loss, "acc": exact.float().mean()}

    @staticmethod
    def _decide(logits):  # (B, A) logits -> (B, A) bool: presences above 0, the count of the largest logit
        present = len(SCENE_PRESENT)
        count = F.one_hot(logits[:, present:].argmax(-1), logits.shape[-1] - present).bool()
        return torch.cat([logits[:, :present] > 0, count], dim=-1)

    def predict(self, batch):  # -> (B,) the predicted attribute set as a bitmask: bit k = attribute k
        bits = self._decide(self.logits(batch)).long()  # (B, A)
        return (bits << torch.arange(bits.shape[-1], device=bits.device)).sum(-1)


def decode_predictions(preds: np.ndarray, num_attributes: int) -> np.ndarray:
    """(n,) bitmasks from SceneAttributesModel.predict -> (n, A) 0/1."""
    return (preds.astype(np.int64)[:, None] >> np.arange(num_attributes)) & 1


def _f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    """F1 of 0/1 arrays of one shape, over every entry (0 when neither has a 1)."""
    hits, claimed, present = int((predicted & truth).sum()), int(predicted.sum()), int(truth.sum())
    return 2 * hits / (claimed + present) if claimed + present else 0.0


class SceneAttributesTask(Task):
    inputs = "image"

    def __init__(self):
        super().__init__("scenes", "", ("scenes_acc", "scenes_present_f1", "scenes_kind_f1",
                                   "scenes_count_acc"), ("train",), "val",
                         ("test",))

    def dataset(self, cfg, split, transform, label_names=None):
        """The synthetic world (synthetic_task=True), or the world folder task_dir names (one generated earlier)."""
        if not cfg.synthetic_task and not cfg.task_dir:
            raise ValueError("task=scenes reads a synthetic world: set synthetic_task=True, or task_dir to a "
                             "world's folder (holding scenes.json)")
        return SceneAttributesDataset(self.folder_of(cfg), split, transform)

    def label_names(self, cfg):
        return list(SCENE_ATTRIBUTES)

    def build_model(self, encoder, label_names):
        return SceneAttributesModel(encoder, len(label_names))

    def score(self, preds, dataset, split):
        """scenes_acc: pictures with every attribute right; scenes_present_f1 and scenes_kind_f1: F1 of the colours,
        shapes and kinds present, and of the kinds alone, over every (picture, attribute); scenes_count_acc:
        pictures whose total count is predicted right."""
        predicted = decode_predictions(preds, len(SCENE_ATTRIBUTES))
        truth = dataset.targets[:len(preds)].astype(np.int64)
        counts = len(SCENE_PRESENT)
        return {"scenes_acc": float((predicted == truth).all(-1).mean()),
                "scenes_present_f1": _f1(predicted[:, :counts], truth[:, :counts]),
                "scenes_kind_f1": _f1(predicted[:, SCENE_KINDS], truth[:, SCENE_KINDS]),
                "scenes_count_acc": float((predicted[:, counts:] == truth[:, counts:]).all(-1).mean())}

    def write_predictions(self, preds, dataset, label_names, path_stem):
        path = path_stem.with_suffix(".json")
        predicted = decode_predictions(preds, len(label_names))
        path.write_text(json.dumps([{"image_id": dataset.scenes[i]["image_id"],
                                     "prediction": [n for n, bit in zip(label_names, predicted[i]) if bit],
                                     "truth": [n for n, t in zip(label_names, dataset.targets[i]) if t]}
                                    for i in range(len(preds))]))
        return path
