"""From datasets to training batches: the collators, MLM masking and ITM pairing, the resumable sampler and
loader, the image-introduction schedule, and the frozen vision tower's feature cache.

Sections, top to bottom:
  1. Collator           PretrainCollator, TextCollator
  2. MLM and ITM        mask_tokens, sample_itm_pairs (pure functions, run in the main process)
  3. Sampling, loading  MicroBatchSampler, ResumableLoader, build_loader; ImageTextSchedule and ScheduledLoader
                        (text-only batches before image-text data starts, and mixed in after)
  4. Feature cache      the frozen vision tower's output, computed once: with_cached_vision_features
"""

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Sampler

from data import BAD_IMAGE, BadImageError, CaptionDataset, load_or_mark, open_image
from files import load_json, progress, write_json

# -----------------------------------------------------------------------------
# 1. Collator

class PretrainCollator:
    """Caption items -> the pretraining batch: clean captions padded to the batch's longest (at most
    max_text_len tokens), or all to max_text_len with fixed_length (for torch.compile, which would otherwise
    meet a new shape with every new longest caption). Masking and ITM pairing happen later, in the main process."""

    def __init__(self, tokenizer, max_text_len, fixed_length=False):
        self.tokenizer, self.max_text_len = tokenizer, max_text_len
        self.padding = "max_length" if fixed_length else "longest"

    def __call__(self, items):
        return {
            "pixel_values": torch.stack([item["image"] for item in items]),  # (B, 3, H, W)
            **self.tokenize([item["caption"] for item in items]),
            "image_ids": torch.tensor([item["image_id"] for item in items], dtype=torch.long),  # (B,)
        }

    def tokenize(self, texts):
        """input_ids, attention_mask, special_tokens_mask (padding counts as special) and word_ids, each (B, T)."""
        encoded = self.tokenizer(texts, padding=self.padding, truncation=True, max_length=self.max_text_len,
                                 return_special_tokens_mask=True, return_tensors="pt")
        word_ids = [[-1 if w is None else w for w in encoded.word_ids(b)] for b in range(len(texts))]
        attention_mask = encoded["attention_mask"].long()  # (B, T)
        return {
            "input_ids": encoded["input_ids"].long(),  # (B, T)
            "attention_mask": attention_mask,
            "special_tokens_mask": encoded["special_tokens_mask"].bool() | (attention_mask == 0),  # (B, T)
            "word_ids": torch.tensor(word_ids, dtype=torch.long),  # (B, T)
        }


class TextCollator(PretrainCollator):
    """Text items ({"text": str}) -> a text-only batch: the tokenized lines, no images (no pixel_values, no
    image_ids), which the pretraining model trains with MLM on its text path alone."""

    def __call__(self, items):
        return self.tokenize([item["text"] for item in items])


# -----------------------------------------------------------------------------
# 2. MLM and ITM: pure functions of their inputs and a torch.Generator (on the tensors' device),
# so a per-step generator seed makes them exactly reproducible on resume.

def mask_tokens(input_ids, special_tokens_mask, word_ids, tokenizer_info, mlm_prob, whole_word, generator):
    """BERT masking. Selects each non-special token with probability mlm_prob (whole_word: each word,
    then all of its pieces), and at least one token (word) in every row that has one, so no row has an
    all -100 label row that would make a mean loss NaN. Of the selected: 80% -> [MASK], 10% -> a random
    non-special token, 10% unchanged. Returns (mlm_input_ids (B, T), mlm_labels (B, T), -100 where not
    selected)."""
    device = input_ids.device
    B, T = input_ids.shape
    eligible = ~special_tokens_mask  # (B, T); padding is special
    word_index = word_ids.clamp(min=0)  # (B, T) specials point at word 0 but are never eligible
    if whole_word:
        num_words = int(word_ids.max().item()) + 1 if word_ids.numel() else 0
        word_selected = torch.rand(B, max(num_words, 1), generator=generator, device=device) < mlm_prob  # (B, W)
        selected = eligible & word_selected.gather(1, word_index)
    else:
        selected = eligible & (torch.rand(B, T, generator=generator, device=device) < mlm_prob)
    # rows with eligible tokens but nothing selected: force one random eligible token (or its word)
    scores = torch.rand(B, T, generator=generator, device=device).masked_fill(~eligible, -1.0)
    forced_position = scores.argmax(dim=1, keepdim=True)  # (B, 1)
    needs_one = eligible.any(dim=1, keepdim=True) & ~selected.any(dim=1, keepdim=True)  # (B, 1)
    if whole_word:
        forced = eligible & (word_index == word_index.gather(1, forced_position))
    else:
        forced = torch.zeros_like(selected).scatter_(1, forced_position, True)
    selected |= forced & needs_one
    labels = input_ids.masked_fill(~selected, -100)
    action = torch.rand(B, T, generator=generator, device=device)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    allowed = torch.ones(tokenizer_info.vocab_size, dtype=torch.bool, device=device)
    allowed[list(tokenizer_info.special_ids)] = False
    allowed_ids = allowed.nonzero().squeeze(1)  # (V',)
    random_ids = allowed_ids[torch.randint(len(allowed_ids), (B, T), generator=generator, device=device)]
    mlm_input_ids = input_ids.masked_fill(to_mask, tokenizer_info.mask_token_id)
    mlm_input_ids = torch.where(to_random, random_ids, mlm_input_ids)
    return mlm_input_ids, labels


def sample_itm_pairs(image_ids, neg_prob, generator):
    """Image-text matching pairs within a batch. Each caption i becomes a negative with probability
    neg_prob, paired with the image of a uniformly drawn row whose image_id differs (several rows may
    share a picture, as COCO's five captions do); with no such row it stays positive. Returns
    (itm_image_index (B,), itm_labels (B,) long, 1 = match)."""
    B = image_ids.shape[0]
    device = image_ids.device
    wants_negative = torch.rand(B, generator=generator, device=device) < neg_prob  # (B,)
    other_image = image_ids[None, :] != image_ids[:, None]  # (B, B)
    # argmax of iid uniform scores over the allowed rows is a uniform draw among them
    scores = torch.rand(B, B, generator=generator, device=device).masked_fill(~other_image, -1.0)
    negative_row = scores.argmax(dim=1)  # (B,)
    negative = wants_negative & other_image.any(dim=1)
    itm_image_index = torch.where(negative, negative_row, torch.arange(B, device=device))
    return itm_image_index, (~negative).long()


# -----------------------------------------------------------------------------
# 3. Sampling and loading

class MicroBatchSampler(Sampler):
    """Micro-batches of indices for process `rank` of `world_size`.

    Each epoch draws one global permutation from (seed, epoch), the same on every process; global
    micro-batch j is perm[j*m:(j+1)*m] and this process takes j = k*world_size + rank, k = 0, 1, ...
    So one process accumulating 2 micro-steps sees the same samples, grouped the same way, as two
    processes taking one each. Every process gets the same number of micro-batches per epoch: the
    tail that does not fill a whole round (fewer than m * world_size samples) is left out of that
    epoch. set_epoch(epoch, start_batch=k) resumes at this process's k-th micro-batch."""

    def __init__(self, num_samples, micro_batch_size, rank, world_size, seed):
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = num_samples // micro_batch_size // world_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_samples} samples make no micro-batch of {micro_batch_size} "
                             f"for each of {world_size} processes")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        m = self.micro_batch_size
        for k in range(self.start_batch, self.batches_per_epoch):
            j = k * self.world_size + self.rank
            yield perm[j * m:(j + 1) * m].tolist()


class MarkBadImages(Dataset):
    """A map-style dataset whose items with a missing or unreadable image become load_or_mark stand-ins."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return load_or_mark(self.dataset.__getitem__, i)


def _is_bad(item):
    return isinstance(item, dict) and BAD_IMAGE in item


class DropBadImages:
    """A collate function around `collate`: (batch of the good items, or None if none is left, [messages of
    the items dropped for a bad image]). Items are dropped, never replaced, so the rest stay where they were."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        good = [item for item in items if not _is_bad(item)]
        return (self.collate(good) if good else None), [item[BAD_IMAGE] for item in items if _is_bad(item)]


MAX_BAD_IMAGE_EXAMPLES = 5  # messages kept per report: enough to find the files, bounded for a broken corpus


class ResumableLoader:
    """Endless batches across epochs, resumable exactly (map-style) or approximately (CaptionStream,
    see its docstring). state_dict() counts the micro-batches of the sampler consumed by the caller, not
    those prefetched. Iterate it once; persistent workers are used only for map-style data, because a
    stream's workers must be restarted to see the new epoch and resume point.
    Bad images: an item whose image is missing, truncated or not an image is dropped from its batch and
    counted (pop_skipped reports them); a micro-batch left empty is consumed without being handed out.
    With strict_images the first one raises BadImageError, with its path, in the main process.
    Another process count on resume: the state records the world size, and a run resumed with another one
    starts at the first global micro-batch of the epoch that no process has consumed yet (rounded up to a
    whole round of the new world size, so no sample is seen twice; at most world_size - 1 are skipped)."""

    def __init__(self, dataset, micro_batch_size, rank, world_size, seed, collate, num_workers=0, pin_memory=False,
                 strict_images=False):
        self.epoch, self.batches_done = 0, 0
        self.world_size = world_size
        self.strict_images = strict_images
        self.skipped, self.skipped_examples = 0, []
        self.stream = dataset if isinstance(dataset, IterableDataset) else None
        # An own generator for worker seeds: starting an iterator then never draws from the global RNG,
        # which a resumed run restores and an uninterrupted one must see consumed identically.
        generator = torch.Generator().manual_seed(seed * 1000 + rank)
        common = dict(collate_fn=DropBadImages(collate), num_workers=num_workers, pin_memory=pin_memory,
                      generator=generator)
        if self.stream is not None:
            self.stream.set_partition(rank, world_size, seed)
            self.stream.mark_bad_images = True
            self.micro_batch_size = micro_batch_size
            # drop_last keeps every batch full; each worker drops fewer than micro_batch_size per epoch
            self.loader = DataLoader(dataset, batch_size=micro_batch_size, drop_last=True, **common)
        else:
            self.sampler = MicroBatchSampler(len(dataset), micro_batch_size, rank, world_size, seed)
            self.loader = DataLoader(MarkBadImages(dataset), batch_sampler=self.sampler,
                                     persistent_workers=num_workers > 0, **common)

    def state_dict(self):
        return {"epoch": self.epoch, "batches_done": self.batches_done, "world_size": self.world_size}

    def pop_skipped(self):
        """(items dropped for a bad image since the last call, the first few distinct messages), then reset."""
        report = (self.skipped, self.skipped_examples)
        self.skipped, self.skipped_examples = 0, []
        return report

    def _skip(self, messages):
        if self.strict_images:
            raise BadImageError(f"{messages[0]} (strict_images=True stops at the first bad image)")
        self.skipped += len(messages)
        for message in messages:
            if len(self.skipped_examples) < MAX_BAD_IMAGE_EXAMPLES and message not in self.skipped_examples:
                self.skipped_examples.append(message)

    @property
    def batches_per_epoch(self):
        """This process's micro-batches per epoch of map-style data (None for a stream)."""
        return None if self.stream is not None else self.sampler.batches_per_epoch

    def load_state_dict(self, state):
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        saved_world_size = int(state.get("world_size", self.world_size))
        if saved_world_size != self.world_size:  # batches_done counts this process's share of the global order
            consumed = self.batches_done * saved_world_size  # global micro-batches of this epoch
            self.batches_done = -(-consumed // self.world_size)

    def __iter__(self):
        while True:
            if self.stream is not None:
                self.stream.set_position(self.epoch, self.batches_done, self.micro_batch_size)
            else:
                self.sampler.set_epoch(self.epoch, start_batch=self.batches_done)
            for batch, bad_images in self.loader:
                self.batches_done += 1
                if bad_images:
                    self._skip(bad_images)
                if batch is not None:
                    yield batch
            if self.batches_done == 0:
                raise ValueError("the training stream produced no full batch in an epoch; "
                                 "it has fewer samples than micro_batch_size per DataLoader worker")
            self.epoch, self.batches_done = self.epoch + 1, 0


def build_loader(dataset, cfg, rank, world_size, seed, collate):
    """A ResumableLoader with cfg.micro_batch_size and cfg.num_workers; seed must be the same on every
    rank (the sampler's permutation is global)."""
    if cfg.num_workers > 0:
        # workers are forked after the main process may have used the tokenizer; its thread pool
        # would otherwise print a warning and disable itself in each worker
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return ResumableLoader(dataset, cfg.micro_batch_size, rank, world_size, seed, collate,
                           num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                           strict_images=cfg.strict_images)


# The image-introduction schedule (Keh et al. 2025 found that when image-text data enters pretraining matters).
# Each optimizer step trains on one kind of batch, "text" (a text corpus, MLM on the text path alone) or
# "image_text" (captions with their pictures, MLM + ITM). Steps before switch_step are text-only; after it each
# step is image-text with probability image_text_share, drawn from (seed, step) alone: every rank draws the same
# kind, and a resumed run the same kinds as an uninterrupted one.

SCHEDULE_STREAM = 0x5C4ED  # keeps the schedule's draws apart from any other generator seeded by (seed, step)


@dataclass(frozen=True)
class ImageTextSchedule:
    max_steps: int
    text_only_fraction: float  # of max_steps, text-only before image-text data starts
    image_text_share: float  # of the steps after the switch, image-text
    seed: int

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.max_steps, cfg.text_only_fraction, cfg.image_text_share, cfg.seed)

    @property
    def switch_step(self):
        """The first step that may be image-text (0-based)."""
        return round(self.text_only_fraction * self.max_steps)

    @property
    def uses_images(self):
        return self.switch_step < self.max_steps and self.image_text_share > 0

    @property
    def uses_text(self):
        return self.switch_step > 0 or self.image_text_share < 1

    def phase(self, step):
        return "text_only" if step < self.switch_step else "image_text"

    def kind(self, step):
        """The kind of batch optimizer step `step` (0-based) trains on: "text" or "image_text"."""
        if step < self.switch_step or self.image_text_share <= 0:
            return "text"
        if self.image_text_share >= 1:
            return "image_text"
        draw = np.random.default_rng([self.seed, step, SCHEDULE_STREAM]).random()
        return "image_text" if draw < self.image_text_share else "text"


class ScheduledLoader:
    """Micro-batches from {"text": loader, "image_text": loader} (ResumableLoaders), each optimizer step's
    `accum` micro-batches from the loader its kind names (schedule.kind). Resumable exactly: the state is
    the micro-batches handed out and each loader's own state. pop_mix() gives the training log's fields."""

    def __init__(self, loaders, schedule, accum):
        self.loaders, self.schedule, self.accum = loaders, schedule, accum
        self.micro_batches = 0
        self.steps_of_kind = dict.fromkeys(loaders, 0)

    def state_dict(self):
        return {"micro_batches": self.micro_batches, **{kind: loader.state_dict() for kind, loader in self.loaders.items()}}

    def load_state_dict(self, state):
        self.micro_batches = int(state["micro_batches"])
        for kind, loader in self.loaders.items():
            loader.load_state_dict(state[kind])

    def pop_skipped(self):
        """As ResumableLoader.pop_skipped, over both loaders."""
        reports = [loader.pop_skipped() for loader in self.loaders.values()]
        return sum(count for count, _ in reports), [message for _, messages in reports for message in messages]

    def pop_mix(self):
        """Log fields: the phase of the last step handed out and the optimizer steps (global batches) of each
        kind since the last call."""
        mix = {"phase": self.schedule.phase(max(0, self.micro_batches - 1) // self.accum),
               "image_text_batches": self.steps_of_kind.get("image_text", 0),
               "text_batches": self.steps_of_kind.get("text", 0)}
        self.steps_of_kind = dict.fromkeys(self.loaders, 0)
        return mix

    def __iter__(self):
        streams = {kind: iter(loader) for kind, loader in self.loaders.items()}  # a loader starts on its first batch
        while True:
            step, micro = divmod(self.micro_batches, self.accum)
            kind = self.schedule.kind(step)
            batch = next(streams[kind])
            self.micro_batches += 1
            self.steps_of_kind[kind] += micro == 0
            yield batch


# -----------------------------------------------------------------------------
# 4. Frozen vision feature cache
#
# A frozen vision tower fed images without random augmentation gives every picture the same output in
# every epoch. with_cached_vision_features computes it once, stores it in half precision in a memory-
# mapped .npy file and hands it out instead of the image, so an epoch decodes, resizes and encodes no
# image at all. One file per (tower weights, transform, compute dtype, pictures): the file name is a
# digest of all of them, so a changed tower or transform never reads stale features. Layout:
#   <vision_feature_cache>/<digest>.npy   (pictures, P, D) float16, P the tower's tokens (CLS first)
#   <vision_feature_cache>/<digest>.json  what the file holds, and the pictures that failed; written last
# Size: P * D * 2 bytes a picture (76 KB for DeiT-Tiny at 224, 303 KB for ViT-Base).

FEATURE_CACHE_VERSION = 1


def _caption_parts(dataset):
    """The CaptionDatasets a map-style pretraining dataset is made of (itself, or a ConcatDataset's parts)."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    if not all(isinstance(part, CaptionDataset) for part in parts):
        raise ValueError("vision_feature_cache needs map-style corpora (coco, coco_official, vg, synthetic); "
                         "streamed corpora (cc3m, sbu) cannot be cached")
    return parts


class _Pictures(Dataset):
    """Each distinct picture once, opened and transformed (a load_or_mark stand-in when it is bad)."""

    def __init__(self, pictures):
        self.pictures = pictures  # [(path, transform)]

    def __len__(self):
        return len(self.pictures)

    def __getitem__(self, j):
        path, transform = self.pictures[j]
        return load_or_mark(lambda: transform(open_image(path)))


def _collate_pictures(items):
    """(stacked good images or None, their positions in the batch, {position: message} of the bad ones)."""
    good = [j for j, item in enumerate(items) if not _is_bad(item)]
    images = torch.stack([items[j] for j in good]) if good else None
    return images, good, {j: item[BAD_IMAGE] for j, item in enumerate(items) if _is_bad(item)}


def _weights_digest(module, digest):
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def with_cached_vision_features(dataset, cfg, encoder, device, autocast, local_rank=None, timeout_seconds=86400.0):
    """`dataset` (map-style captions) with each item's image replaced by the frozen vision tower's output,
    computed once into cfg.vision_feature_cache (see the section comment) and reused by every epoch and run.

    encoder: the two-tower encoder (its vision_features and vision_tower); autocast: the training run's
    autocast context, so the cached output is the one training would compute. Local rank 0 computes the
    file while the other local ranks wait for it, as ensure_synthetic_world does (local_rank None reads
    LOCAL_RANK). Refused unless the vision tower is frozen and training images are not augmented."""
    if cfg.model_type != "two_tower" or not cfg.freeze_vision or cfg.augment:
        raise ValueError(f"vision_feature_cache needs model_type='two_tower', freeze_vision=True and augment=False "
                         f"(got {cfg.model_type!r}, {cfg.freeze_vision}, {cfg.augment}): only then is a picture's "
                         "vision-tower output the same in every epoch")
    parts = _caption_parts(dataset)
    item_ids = np.concatenate([part.table.image_ids[part.table.caption_image] + part.image_id_offset for part in parts])
    ids, first_item, item_rows = np.unique(item_ids, return_index=True, return_inverse=True)
    starts = np.cumsum([0] + [len(part) for part in parts])
    pictures = []
    for i in first_item:
        p = np.searchsorted(starts, i, side="right") - 1
        table = parts[p].table
        k = table.caption_image[i - starts[p]]
        pictures.append((os.path.join(table.root, table.image_paths[k]), parts[p].transform))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((FEATURE_CACHE_VERSION, cfg.dtype, cfg.image_mean, cfg.image_std,  # the model normalises
                        [repr(t) for t in dict.fromkeys(t for _, t in pictures)],
                        [path for path, _ in pictures])).encode())
    digest.update(ids.tobytes())
    _weights_digest(encoder.vision_tower, digest)
    root = Path(cfg.vision_feature_cache)
    array_path, marker = root / f"{digest.hexdigest()}.npy", root / f"{digest.hexdigest()}.json"
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if not marker.exists() and local_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _compute_vision_features(pictures, encoder, device, autocast, cfg, array_path, marker)
    deadline = time.monotonic() + timeout_seconds
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_seconds:.0f}s for local rank 0 to compute {marker}")
        time.sleep(1.0)
    bad = {int(row): message for row, message in load_json(marker)["bad_pictures"].items()}
    return CachedVisionFeatures(parts, array_path, item_rows, bad)


@torch.no_grad()
def _compute_vision_features(pictures, encoder, device, autocast, cfg, array_path, marker):
    """Run the frozen tower over every picture once; write the array, then the marker, each atomically."""
    loader = DataLoader(_Pictures(pictures), batch_size=cfg.micro_batch_size, num_workers=cfg.num_workers,
                        collate_fn=_collate_pictures, pin_memory=device.type == "cuda")
    tower_was_training = encoder.vision_tower.training
    encoder.vision_tower.eval()  # frozen parts are already in eval mode; this makes it hold for any caller
    tmp = array_path.with_name(f".{array_path.name}.{os.getpid()}.tmp")
    features, bad, row = None, {}, 0
    start = time.time()
    try:
        for images, good, failed in progress(loader, len(loader), "vision feature cache"):
            if failed and cfg.strict_images:
                raise BadImageError(f"{next(iter(failed.values()))} (strict_images=True stops at the first bad image)")
            bad.update({row + j: message for j, message in failed.items()})
            if images is not None:
                with autocast:
                    out = encoder.vision_features(images.to(device, non_blocking=True))  # (b, P, D)
                if features is None:
                    features = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                         shape=(len(pictures), *out.shape[1:]))
                features[row + np.array(good)] = out.half().cpu().numpy()
            row += len(good) + len(failed)
        if features is None:
            raise BadImageError(f"{array_path}: no picture could be read (first: {next(iter(bad.values()))})")
        features.flush()
        del features
        os.replace(tmp, array_path)
    finally:
        encoder.vision_tower.train(tower_was_training)
        if tmp.exists():
            tmp.unlink()
    info = {"version": FEATURE_CACHE_VERSION, "pictures": len(pictures), "dtype": cfg.dtype,
            "tower": type(encoder.vision_tower).__name__, "seconds": round(time.time() - start, 1),
            "bad_pictures": {str(r): message for r, message in bad.items()}}
    tmp_marker = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    write_json(tmp_marker, info)
    os.replace(tmp_marker, marker)


class CachedVisionFeatures(Dataset):
    """Caption items whose image is the vision tower's cached output: {"image_feats": (P, D) float16,
    "caption", "image_id"}. No image is opened; a picture that failed when the cache was computed raises
    BadImageError, so the loader drops and reports its captions as it would the image's. The array is
    memory-mapped lazily in each process (DataLoader workers share the page cache, never a copy)."""

    def __init__(self, parts, array_path, item_rows, bad):
        self.parts, self.array_path, self.item_rows, self.bad = parts, array_path, item_rows, bad
        self.starts = np.cumsum([0] + [len(part) for part in parts])
        self.features = None

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, i):
        if self.features is None:
            self.features = np.load(self.array_path, mmap_mode="r")
        p = int(np.searchsorted(self.starts, i, side="right") - 1)
        part, local = self.parts[p], i - self.starts[p]
        row = int(self.item_rows[i])
        if row in self.bad:
            raise BadImageError(self.bad[row])
        image_id = int(part.table.image_ids[part.table.caption_image[local]]) + part.image_id_offset
        return {"image_feats": torch.from_numpy(np.array(self.features[row])), "caption": part.table.captions[local],
                "image_id": image_id}


class CachedFeatureCollator(PretrainCollator):
    """PretrainCollator for CachedVisionFeatures items: the batch carries "image_feats" (B, P, D) float16,
    which the pretraining model reads instead of running its vision tower, and no pixel_values."""

    def __call__(self, items):
        batch = super().__call__([{**item, "image": item["image_feats"]} for item in items])
        batch["image_feats"] = batch.pop("pixel_values")
        return batch
