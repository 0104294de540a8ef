"""CIFAR-10 (image only), python version: its reader, its task and its synthetic version.
"""

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

import world
from tasks.base import Task
from tasks.common import ClassifierModel, Transform, _field, _read_pickle
from tasks.metrics import accuracy
from tasks.synthetic import _pick, _world_scenes
from world import COLOURS, SHAPES, SIZES

# -----------------------------------------------------------------------------
# CIFAR-10 (image only), python version


class CIFAR10Dataset(Dataset):
    """`cifar-10-batches-py/`: data_batch_1..5 (split "train") or test_batch ("test"), batching.meta for
    label_names. Python-2 pickles whose keys load as bytes or str: both accepted. `data` is uint8
    (N, 3072): R, G, B planes of 32x32, row-major. Item: {"image", "label"}."""

    def __init__(self, cifar_dir, split: str, transform: Transform):
        cifar_dir = Path(cifar_dir)
        names = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
        if split not in names:
            raise ValueError(f"CIFAR-10 split must be train or test, got '{split}'")
        self.transform = transform
        meta = self._read_batch(cifar_dir / "batching.meta")
        self.label_names = [n.decode() if isinstance(n, bytes) else str(n)
                            for n in _field(meta, "label_names", str(cifar_dir / "batching.meta"))]
        images, labels = [], []
        for name in names[split]:
            path = cifar_dir / name
            batch = self._read_batch(path)
            data = self._array_field(batch, "data", path, np.uint8)
            batch_labels = self._array_field(batch, "labels", path, np.int64)
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
    def _array_field(batch: dict, key: str, path: Path, dtype) -> np.ndarray:
        try:
            return np.asarray(_field(batch, key, str(path)), dtype=dtype)
        except (ValueError, TypeError, OverflowError):  # a string or an object where numbers belong
            raise ValueError(f"{path}: field '{key}' does not hold {np.dtype(dtype).name} numbers") from None

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
    label name in batching.meta (ten for CIFAR-10; the synthetic shape set has six)."""

    inputs = "image"

    def __init__(self):
        super().__init__("cifar10", "cifar-10-batches-py", ("cifar10_acc",), ("train",), "test", ("test",))

    def synthetic_parts(self):
        return [("cifar-10-batches-py", generate_synthetic_cifar10)]

    def dataset(self, cfg, split, transform, label_names=None):
        return CIFAR10Dataset(self.folder_of(cfg), split, transform)

    def label_names(self, cfg):
        meta_path = self.folder_of(cfg) / "batching.meta"
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


def generate_synthetic_cifar10(out: Path, world_root: Path, rng) -> None:
    """A shape classification set in CIFAR-10's python layout: 32x32 pictures of one shape of any colour, size
    and place, labelled by shape (six classes, named in batching.meta); five training batches and a test batch
    of synthetic_images / 4 pictures each (at least 20). The batches have bytes keys, as pickles re-saved
    after loading with encoding="bytes" do, and batching.meta str keys: the reader must take both."""
    scenes, _ = _world_scenes(world_root)
    per_batch = max(20, len(scenes) // 4)
    shapes, colours, sizes = list(SHAPES), list(COLOURS), list(SIZES)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        labels, rows = [], []
        for _ in range(per_batch):
            label, size = int(rng.integers(len(shapes))), _pick(rng, sizes)
            side = round(SIZES[size] * 32)
            x, y = (int(v) for v in rng.integers(0, 32 - side + 1, size=2))
            obj = {"shape": shapes[label], "colour": _pick(rng, colours), "size": size, "box": [x, y, side, side]}
            pixels = np.asarray(world.render_scene([obj], 32))  # (32, 32, 3)
            rows.append(pixels.transpose(2, 0, 1).reshape(-1))  # R, G, B planes, each row-major
            labels.append(label)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": np.stack(rows).astype(np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        (out / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": shapes, "num_cases_per_batch": per_batch, "num_vis": 3 * 32 * 32}
    (out / "batching.meta").write_bytes(pickle.dumps(meta, protocol=2))
