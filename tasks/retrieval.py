"""Image-text retrieval on the Karpathy splits of COCO (5k test) and Flickr30k (1k test): the split
reader, recall@K, hard-negative sampling, the scoring model and the task.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import batching
import data
import files
from contrastive import DualEncoder
from encoders import Embedded
from model import FreezableModel
from tasks.base import Task
from tasks.common import Transform, in_float32, load_image
from tasks.synthetic import generate_synthetic_flickr30k
from towers import init_new

# -----------------------------------------------------------------------------
# Image-text retrieval on the Karpathy splits of COCO (5k test) and Flickr30k (1k test)


class ImageListDataset(Dataset):
    """The pictures of a data.CaptionTable, one item {"image"} each."""

    def __init__(self, table: data.CaptionTable, transform: Transform, named_by: str):
        self.table, self.transform, self.named_by = table, transform, named_by

    def __len__(self):
        return len(self.table.image_ids)

    def image_files(self):
        """(path, the file naming it) per picture: see common.check_images_exist."""
        for i in range(len(self)):
            yield Path(self.table.root) / self.table.image_paths[i], self.named_by

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

    def image_files(self):
        return self.images.image_files()

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
        self.head = init_new(nn.Linear(encoder.pooled_dim, 1), encoder.bert_init)

    def heads(self):
        return [self.head]

    def match(self, text: Embedded, image: Embedded):  # N pairs of encoded captions and pictures -> (N,) float32
        return in_float32(self.head, self.encoder.fuse(text, image).pooled).squeeze(-1)

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
    for start in files.progress(starts, len(starts), desc, enabled=desc is not None):
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
        return batching.PretrainCollator(tokenizer, cfg.max_text_len)

    def prepare(self, batch, generator, cfg):
        candidates, valid = sample_negative_images(batch["image_ids"], cfg.retrieval_negatives, generator)
        return {**batch, "candidate_images": candidates, "candidate_mask": valid}

    def build_model(self, encoder, label_names):
        if isinstance(encoder, DualEncoder):  # its pair score would be a sum of two separate terms: it cannot rank
            raise ValueError(f"task={self.name}: a dual encoder retrieves by embedding similarity, with no fusion for "
                             "a pair head to score: evaluate its pretraining run with evaluate.py --zero_shot=true")
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
