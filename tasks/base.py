"""The task interface. finetune.py and evaluate.py drive every downstream task through one `Task`:

  train_dataset / eval_dataset     the splits, read from data_root or from the synthetic world
  label_names                      what the head's outputs mean (class names, VQA answers), saved with a run
  build_model                      the encoder plus the task's head; forward(batch) -> {"loss", ...} (0-dim tensors)
  evaluate                         predictions over a split, spread over the processes, and the task's metrics
  write_predictions                the predictions file, in the evaluation server's format where there is one
"""

from pathlib import Path
from typing import Optional

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

import world
from model import FreezableModel
from tasks.common import Collator, Transform, check_images_exist, predict_items
from tasks.synthetic import ensure_generated

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
        world_root = world.ensure_synthetic_world(cfg)
        for folder, generate in self.synthetic_parts():
            ensure_generated(world_root, folder, generate, cfg.synthetic_seed)
        return world_root

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

    def check_evaluation_images(self, cfg, val_split: str, val_set: Dataset, transform: Transform, label_names):
        """Before fine-tuning: every image the validation split and the evaluation splits name must exist
        (check_images_exist), or one error names the first missing files and their number."""
        for split in dict.fromkeys([val_split, *self.evaluation_splits(cfg)]):
            dataset = val_set if split == val_split else self.eval_dataset(cfg, split, transform, label_names)
            check_images_exist(dataset, f"{self.name} split {split!r}"
                                        + ("" if split == val_split else " (evaluation split: see eval_splits)"))

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
