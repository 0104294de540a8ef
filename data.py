"""Data for pretraining: the real caption and text corpora as their publishers ship them, the tokenizer and the
image transforms. The synthetic world is generated in world.py, in the real corpora's formats, and read here by
the same readers; batching, masking and loading are in batching.py.

Sections, top to bottom:
  1. Images and JSON    opening images by content, loading JSON with errors that name file and field;
                        progress, the one progress bar of the project
  2. Caption tables     captions held in flat numpy arrays; the map-style CaptionDataset
  3. Corpus readers     COCO Karpathy, COCO official, Visual Genome (map-style)
  4. Streaming corpora  img2dataset shards (CC3M, SBU), plain-text corpora (TextLines) and CaptionStream,
                        which mixes sources
  5. Pretraining mix    build_pretrain_datasets, build_text_corpora
  6. Tokenizer          build_tokenizer, TokenizerInfo, the synthetic world's tokenizer
  7. Image transforms   build_transform

A caption item is {"image": uint8 tensor (3, H, W), "caption": str, "image_id": int}; image ids are
unique per picture across all corpora of a run (see IMAGE_ID_OFFSETS). A text item is {"text": str}.
"""

import functools
import gzip
import io
import itertools
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, Dataset, IterableDataset, get_worker_info
from torchvision.transforms import v2

from files import load_json, progress
from towers import TEXT_FAMILIES, from_hub_or_directory
from world import ensure_synthetic_text, ensure_synthetic_world, synthetic_vocabulary

# -----------------------------------------------------------------------------
# 1. Images and JSON

class BadImageError(ValueError):
    """An image that is missing, truncated or not an image at all; the message starts with where it is."""


class ImageNotFoundError(BadImageError, FileNotFoundError):
    """A missing image: a BadImageError that is also a FileNotFoundError."""


def open_image(path, name=None):
    """RGB PIL image, fully decoded; the format is detected from the bytes, not the extension (some .png
    files hold JPEG data). path may be a file object, with `name` saying where it came from. Raises
    ImageNotFoundError or BadImageError naming the image: a bad file fails here, never halfway through."""
    name = path if name is None else name
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: PIL opens lazily, so truncation shows only now
    except FileNotFoundError:
        raise ImageNotFoundError(f"{name}: image file not found") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{name}: not an image (no known format)") from None
    except (OSError, Image.DecompressionBombError) as e:  # "image file is truncated", "Truncated File Read", ...
        raise BadImageError(f"{name}: unreadable image ({e})") from None


BAD_IMAGE = "bad_image"  # the one key of the stand-in for an item whose image failed


def load_or_mark(load, *args):
    """load(*args), or the stand-in {BAD_IMAGE: message} when the item's image is missing or unreadable, so
    that a DataLoader worker hands the failure to the main process, which drops the item and reports it
    (or stops, with strict_images): see ResumableLoader."""
    try:
        return load(*args)
    except BadImageError as e:
        return {BAD_IMAGE: str(e)}


def _field(entry, key, path, where, kind=None):
    """entry[key], or a ValueError naming the file, the entry and the field. key may be a tuple of
    alternative names (publishers' copies differ), the first one present is used."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} is a {type(entry).__name__}, expected an object")
    names = key if isinstance(key, tuple) else (key,)
    present = [name for name in names if name in entry]
    if not present:
        raise ValueError(f"{path}: {where} has no field '{' or '.join(names)}'")
    key = present[0]
    value = entry[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ValueError(f"{path}: {where}.{key} is {value!r}, expected {kind.__name__}")
    return value


# -----------------------------------------------------------------------------
# 2. Caption tables
#
# Hundreds of thousands of captions as Python lists of dicts would be touched (refcounts) by every
# forked DataLoader worker, copying the pages into each worker; flat numpy arrays are not.

class StringArray:
    """An immutable sequence of strings stored as one UTF-8 byte array plus offsets."""

    def __init__(self, strings):
        encoded = [s.encode("utf-8") for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


@dataclass
class CaptionTable:
    """Captions of pictures: image_paths[k] (relative to root) has id image_ids[k]; caption i describes
    picture caption_image[i]."""
    root: str
    image_paths: StringArray
    image_ids: np.ndarray  # (num_images,) int64, the corpus's own ids
    captions: StringArray
    caption_image: np.ndarray  # (num_captions,) int64 index into image_paths

    @classmethod
    def build(cls, root, images, captions):
        """images: list of (relative path, id); captions: list of (caption, index into images)."""
        return cls(str(root), StringArray([path for path, _ in images]),
                   np.array([image_id for _, image_id in images], dtype=np.int64),
                   StringArray([caption for caption, _ in captions]),
                   np.array([k for _, k in captions], dtype=np.int64))


IMAGE_ID_SPAN = 10**10  # each corpus's own ids must lie in [0, IMAGE_ID_SPAN)
# Offsets that make ids unique across corpora. COCO Karpathy and COCO official share the COCO ids:
# they are the same pictures. Synthetic COCO and VG share the scene ids for the same reason.
IMAGE_ID_OFFSETS = {"coco": 0, "coco_official": 0, "vg": IMAGE_ID_SPAN, "cc3m": 2 * IMAGE_ID_SPAN,
                    "sbu": 3 * IMAGE_ID_SPAN, "synthetic": 4 * IMAGE_ID_SPAN}


class CaptionDataset(Dataset):
    """Map-style dataset of (image, caption) pairs, one item per caption. Images are opened lazily
    (a missing file fails at __getitem__ with its path); the table was validated when it was read."""

    def __init__(self, table, transform, image_id_offset=0):
        if len(table.image_ids) and not (0 <= table.image_ids.min() and table.image_ids.max() < IMAGE_ID_SPAN):
            raise ValueError(f"{table.root}: image ids must lie in [0, {IMAGE_ID_SPAN}) to stay unique across corpora")
        self.table, self.transform, self.image_id_offset = table, transform, image_id_offset

    def __len__(self):
        return len(self.table.caption_image)

    def __getitem__(self, i):
        k = self.table.caption_image[i]
        image = open_image(os.path.join(self.table.root, self.table.image_paths[k]))
        return {"image": self.transform(image), "caption": self.table.captions[i],
                "image_id": int(self.table.image_ids[k]) + self.image_id_offset}

    def part_size(self, part, parts, seed, epoch):
        return len(range(part, len(self), parts))

    def records(self, part, parts, seed, epoch):
        """As a source of a CaptionStream: zero-argument loaders of this part's items, in an order
        shuffled per epoch (the permutation is shared by all parts, so parts never overlap)."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self))[part::parts]
        return (functools.partial(self.__getitem__, int(i)) for i in order)


# -----------------------------------------------------------------------------
# 3. Corpus readers (map-style): each returns CaptionTables of the corpus's own image ids.

KARPATHY_SPLITS = ("train", "restval", "val", "test")
KARPATHY_PRETRAIN_SPLITS = {"train": ("train", "restval"), "val": ("val",)}


def read_karpathy(json_path, image_root, split_sets):
    """Karpathy-split captions (dataset_coco.json; dataset_flickr30k.json, which has no 'filepath' and
    no 'cocoid', works too). split_sets maps a name to the Karpathy splits it gathers, e.g.
    {"train": ("train", "restval"), "val": ("val",)}; returns {name: CaptionTable}. Captions are the
    'raw' sentences, stripped. Image id: 'cocoid', else 'imgid'."""
    data = load_json(json_path)
    entries = _field(data, "images", json_path, "the top level", list)
    gathered = {name: ([], []) for name in split_sets}
    set_of_split = {split: name for name, splits in split_sets.items() for split in splits}
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        split = _field(entry, "split", json_path, where, str)
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"{json_path}: {where}.split is {split!r}, expected one of {KARPATHY_SPLITS}")
        if split not in set_of_split:
            continue
        filename = _field(entry, "filename", json_path, where, str)
        folder = entry.get("filepath", "")
        image_id = _field(entry, ("cocoid", "imgid"), json_path, where, int)
        sentences = _field(entry, "sentences", json_path, where, list)
        images, captions = gathered[set_of_split[split]]
        for j, sentence in enumerate(sentences):
            raw = _field(sentence, "raw", json_path, f"{where}.sentences[{j}]", str)
            captions.append((raw.strip(), len(images)))
        images.append((os.path.join(folder, filename), image_id))
    return {name: CaptionTable.build(image_root, images, captions) for name, (images, captions) in gathered.items()}


def read_coco_official(coco_dir, split="train"):
    """COCO's own captions file annotations/captions_<split><year>.json, images <split><year>/<file_name>.
    2014 is preferred when both years are present: 2017 train holds most of val2014, which includes
    the Karpathy test images used for retrieval evaluation."""
    candidates = [Path(coco_dir) / "annotations" / f"captions_{split}{year}.json" for year in ("2014", "2017")]
    found = [path for path in candidates if path.exists()]
    if not found:
        raise FileNotFoundError(f"annotation file not found: {candidates[0]} (nor {candidates[1].name})")
    json_path = found[0]
    folder = json_path.stem.removeprefix("captions_")  # train2014
    data = load_json(json_path)
    images, index_of_id = [], {}
    for i, entry in enumerate(_field(data, "images", json_path, "the top level", list)):
        image_id = _field(entry, "id", json_path, f"images[{i}]", int)
        index_of_id[image_id] = len(images)
        images.append((os.path.join(folder, _field(entry, "file_name", json_path, f"images[{i}]", str)), image_id))
    captions = []
    for i, entry in enumerate(_field(data, "annotations", json_path, "the top level", list)):
        image_id = _field(entry, "image_id", json_path, f"annotations[{i}]", int)
        if image_id not in index_of_id:
            raise ValueError(f"{json_path}: annotations[{i}].image_id {image_id} is not in 'images'")
        captions.append((_field(entry, "caption", json_path, f"annotations[{i}]", str).strip(), index_of_id[image_id]))
    return CaptionTable.build(coco_dir, images, captions)


def read_visual_genome(vg_dir):
    """Visual Genome regions as captions: every region phrase describes the whole picture. The outer
    key of region_descriptions.json entries is 'id' or 'image_id' (both copies exist). The image
    folder (VG_100K or VG_100K_2) comes from the url in image_data.json, as the publisher split
    images.zip and images2.zip. Empty phrases carry no text and are skipped."""
    vg_dir = Path(vg_dir)
    data_path, regions_path = vg_dir / "image_data.json", vg_dir / "region_descriptions.json"
    folder_of = {}
    for i, entry in enumerate(_as_list(load_json(data_path), data_path)):
        image_id = _field(entry, ("image_id", "id"), data_path, f"[{i}]", int)
        url = _field(entry, "url", data_path, f"[{i}]", str)
        folder = url.rstrip("/").split("/")[-2] if url.count("/") >= 1 else ""
        if folder not in ("VG_100K", "VG_100K_2"):
            raise ValueError(f"{data_path}: [{i}].url {url!r} does not name VG_100K or VG_100K_2")
        folder_of[image_id] = folder
    images, captions = [], []
    for i, entry in enumerate(_as_list(load_json(regions_path), regions_path)):
        image_id = _field(entry, ("id", "image_id"), regions_path, f"[{i}]", int)
        if image_id not in folder_of:
            raise ValueError(f"{regions_path}: [{i}] image {image_id} is not in {data_path}")
        for j, region in enumerate(_field(entry, "regions", regions_path, f"[{i}]", list)):
            phrase = _field(region, "phrase", regions_path, f"[{i}].regions[{j}]", str).strip()
            if phrase:
                captions.append((phrase, len(images)))
        images.append((os.path.join("images", folder_of[image_id], f"{image_id}.jpg"), image_id))
    return CaptionTable.build(vg_dir, images, captions)


def _as_list(data, path):
    if not isinstance(data, list):
        raise ValueError(f"{path}: top level is a {type(data).__name__}, expected a list")
    return data


# -----------------------------------------------------------------------------
# 4. Streaming corpora
#
# CC3M and SBU come as img2dataset output: shard folders 00000/ of <key>.jpg + <key>.txt (caption)
# (+ <key>.json), or 00000.tar shards with the same members, beside 00000_stats.json. Row -> image
# mapping: img2dataset names sample r of its input (Train_GCC-training.tsv with a "caption<TAB>url"
# header added, or SBU's url/caption files) with key = shard * 10**d + index in shard, d the digits of
# number_sample_per_shard; with the default 10000 (any power of ten) int(key) == r, the 0-based row.
# Failed downloads are simply absent keys. The image id is int(key).

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class Img2DatasetShards:
    """One img2dataset output folder, read as a stream and split by shard. Shards are listed and
    counted eagerly (folder: number of .txt files; tar: 'successes' from its _stats.json, else a scan
    of the member headers); images and captions are read lazily."""

    def __init__(self, root, transform, image_id_offset=0):
        self.root, self.transform, self.image_id_offset = Path(root), transform, image_id_offset
        if not self.root.is_dir():
            raise FileNotFoundError(f"img2dataset folder not found: {self.root}")
        # img2dataset numbers its shards (00000/, 00001.tar, ...): anything else here is not a shard
        self.shards = sorted(p for p in self.root.iterdir()
                             if (p.is_dir() and p.name.isdigit()) or (p.suffix == ".tar" and p.stem.isdigit()))
        if not self.shards:
            others = sorted(p.name + "/" for p in self.root.iterdir() if p.is_dir())
            raise ValueError(f"{self.root}: no img2dataset shards found here (a shard is a numbered folder such as "
                             f"00000/ of <key>.jpg + <key>.txt files, or a numbered .tar such as 00000.tar)"
                             + (f"; it has the folders {', '.join(others[:5])}: give the folder that holds the "
                                "shards" if others else ""))
        self.shard_sizes = np.array([self._count(shard) for shard in
                                     progress(self.shards, len(self.shards), f"indexing {self.root.name}")],
                                    dtype=np.int64)

    def __len__(self):
        return int(self.shard_sizes.sum())

    def _image_id(self, key, where):
        if not key.isdigit() or int(key) >= IMAGE_ID_SPAN:
            raise ValueError(f"{where}: key {key!r} is not an img2dataset key (digits, below {IMAGE_ID_SPAN})")
        return int(key) + self.image_id_offset

    def _count(self, shard):
        if shard.is_dir():
            keys = [name[:-4] for name in os.listdir(shard) if name.endswith(".txt")]
            for key in keys:
                self._image_id(key, shard / f"{key}.txt")
            return len(keys)
        stats = shard.with_name(f"{shard.stem}_stats.json")
        if stats.exists():
            return _field(load_json(stats), "successes", stats, "the top level", int)
        with tarfile.open(shard) as tar:
            return sum(1 for member in tar if member.name.endswith(".txt"))

    def _shards_of(self, part, parts, seed, epoch):
        """This part's shards: every part applies the same per-epoch permutation, then takes every
        parts-th shard, so the parts partition the shards."""
        return np.random.default_rng([seed, epoch]).permutation(len(self.shards))[part::parts]

    def part_size(self, part, parts, seed, epoch):
        return int(self.shard_sizes[self._shards_of(part, parts, seed, epoch)].sum())

    def records(self, part, parts, seed, epoch):
        """Zero-argument loaders of this part's items, shard by shard, in key order within a shard.
        A loader must be called before the next one is drawn (a tar shard stays open meanwhile)."""
        for s in self._shards_of(part, parts, seed, epoch):
            shard = self.shards[s]
            yield from (self._folder_records(shard) if shard.is_dir() else self._tar_records(shard))

    def _item(self, image, caption, key, where):
        return {"image": self.transform(image), "caption": caption.strip(), "image_id": self._image_id(key, where)}

    def _folder_records(self, shard):
        names = sorted(os.listdir(shard))
        present = set(names)
        for name in names:
            if not name.endswith(".txt"):
                continue
            key = name[:-4]
            image_names = [f"{key}.{ext}" for ext in IMAGE_EXTENSIONS if f"{key}.{ext}" in present]
            image_path = shard / (image_names[0] if image_names else f"{key}.jpg")  # missing: fails in open_image
            yield functools.partial(self._load_file_pair, image_path, shard / name, key)

    def _load_file_pair(self, image_path, caption_path, key):
        return self._item(open_image(image_path), caption_path.read_text(encoding="utf-8"), key, caption_path)

    def _tar_records(self, shard):
        with tarfile.open(shard) as tar:
            # webdataset convention: a sample's members are adjacent and share the name before the first dot
            members = (m for m in tar if m.isfile())
            for key, group in itertools.groupby(members, key=lambda m: os.path.basename(m.name).partition(".")[0]):
                by_extension = {os.path.basename(m.name).partition(".")[2]: m for m in group}
                if "txt" in by_extension:
                    yield functools.partial(self._load_tar_pair, tar, shard, key, by_extension)

    def _load_tar_pair(self, tar, shard, key, by_extension):
        image_members = [by_extension[ext] for ext in IMAGE_EXTENSIONS if ext in by_extension]
        if not image_members:
            raise ImageNotFoundError(f"{shard}: sample {key} has no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        member = image_members[0]
        image = open_image(io.BytesIO(tar.extractfile(member).read()), f"{shard}:{member.name}")
        caption = tar.extractfile(by_extension["txt"]).read().decode("utf-8")
        return self._item(image, caption, key, f"{shard}:{key}.txt")


# Plain-text corpora, as distributed: one sentence or document a line, in .txt or .txt.gz files. WikiText-103's raw
# files (wiki.train.raw) are such files: an article is a title line ' = Title = ', section lines ' = = Section = = ',
# paragraphs one a line (each starting with a space), and blank lines between them all. Blank lines and those
# heading lines are skipped; WikiText's own tokenisation inside paragraphs (' @-@ ', ' @,@ ') is kept as it is.

TEXT_SUFFIXES = (".txt", ".txt.gz")
TEXT_SHUFFLE_BUFFER = 8192  # lines a text part is shuffled within (corpora are streamed, not held in memory)


def is_text_heading(line):
    """True for a WikiText heading line (stripped): '= Title =', '= = Section = ='."""
    return line.startswith("= ") and line.endswith(" =")


class TextLines:
    """A plain-text corpus as a CaptionStream source: one file (.txt, .txt.gz, or any other name, read as plain
    text unless it ends in .gz, e.g. WikiText's wiki.train.raw) or a folder of .txt / .txt.gz files (its own, not
    its sub-folders'). One item per kept line: {"text": the line, stripped}. Lines are counted and checked to be
    UTF-8 once, when the corpus is opened, so a bad file fails at start naming its line.
    Split: the kept lines of an epoch (files in a per-epoch shuffled order) are numbered g = 0, 1, ... and part p
    of P takes every g with g % P == p, so the parts partition the lines; each part is then shuffled within a
    buffer of TEXT_SHUFFLE_BUFFER lines by a generator of (seed, epoch, part), so a resumed part replays it."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            self.files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            if not self.files:
                raise ValueError(f"{path}: no {' or '.join(TEXT_SUFFIXES)} files in this text corpus folder")
        elif path.is_file():
            self.files = [path]
        else:
            raise FileNotFoundError(f"text corpus not found: {path}")
        self.line_counts = np.array([sum(1 for _ in self._lines(file)) for file in self.files], dtype=np.int64)
        if not self.line_counts.sum():
            raise ValueError(f"{path}: no text in this corpus (every line is blank or a heading)")

    def __len__(self):
        return int(self.line_counts.sum())

    @staticmethod
    def _lines(path):
        """The kept lines of one file, stripped; a line that is not UTF-8 raises ValueError naming it."""
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8").strip()
                    except UnicodeDecodeError:
                        raise ValueError(f"{path}: line {number} is not UTF-8 text") from None
                    if line and not is_text_heading(line):
                        yield line
        except (gzip.BadGzipFile, EOFError) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from None

    def part_size(self, part, parts, seed, epoch):
        return len(range(part, len(self), parts))

    def records(self, part, parts, seed, epoch):
        order = np.random.default_rng([seed, epoch]).permutation(len(self.files))
        lines = itertools.chain.from_iterable(self._lines(self.files[f]) for f in order)
        mine = itertools.islice(lines, part, None, parts)
        rng = np.random.default_rng([seed, epoch, part])
        return (functools.partial(dict, text=line) for line in _shuffled(mine, rng, TEXT_SHUFFLE_BUFFER))


def _shuffled(items, rng, buffer_size):
    """The iterator `items` in an order decided by rng, holding about 2 * buffer_size of them: each new item
    takes the place of a uniformly drawn held one, which is handed out; the last held ones come out shuffled."""
    held = list(itertools.islice(items, buffer_size))
    while block := list(itertools.islice(items, buffer_size)):
        for slot, item in zip(rng.integers(len(held), size=len(block)), block):
            yield held[slot]
            held[slot] = item
    yield from (held[i] for i in rng.permutation(len(held)))


class CaptionStream(IterableDataset):
    """A training stream over several sources (Img2DatasetShards and/or map-style CaptionDatasets).

    Split: process `rank` of `world_size` with W DataLoader workers is made of parts
    rank * W + worker out of world_size * W; each source partitions its data across parts (shards for
    img2dataset, a shared per-epoch permutation for map-style corpora). Mixing: each part draws its
    sources in a random order in proportion to their sizes in that part, which is a uniform shuffle
    of the sources' sequences (sizes of tar shards without stats are exact from their header scan).
    Resume: the DataLoader takes batches from workers in turn, so after b batches of size B the worker
    in role r has produced ceil((b - r) / W) of them; on resume each worker takes the role whose turn
    comes next and skips those samples without decoding images. This is exact until a worker runs out
    near the end of an epoch, approximate after that.
    The loader sets the partition, the epoch and the resume point before each epoch, and mark_bad_images
    (an item whose image fails becomes a load_or_mark stand-in instead of an error). A source has
    len() and part_size / records(part, parts, seed, epoch), the latter yielding zero-argument loaders
    of items, so that skipped samples are never decoded."""

    def __init__(self, sources):
        self.sources = sources
        self.rank, self.world_size, self.seed = 0, 1, 0
        self.epoch, self.batches_done, self.batch_size = 0, 0, 1
        self.mark_bad_images = False

    def __len__(self):
        """Samples in one epoch over all processes."""
        return sum(len(source) for source in self.sources)

    def set_partition(self, rank, world_size, seed):
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def set_position(self, epoch, batches_done, batch_size):
        self.epoch, self.batches_done, self.batch_size = epoch, batches_done, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the DataLoader asks worker 0 first; on resume, worker 0 must play the worker whose turn was next
        role = (worker + self.batches_done) % workers
        part, parts = self.rank * workers + role, self.world_size * workers
        batches_from_role = max(0, -(-(self.batches_done - role) // workers))  # ceil((b - role) / W)
        rng = np.random.default_rng([self.seed, self.epoch, part])
        sizes = [source.part_size(part, parts, self.seed, self.epoch) for source in self.sources]
        streams = [source.records(part, parts, self.seed, self.epoch) for source in self.sources]
        order = rng.permutation(np.repeat(np.arange(len(streams)), sizes))
        drawn = (next(streams[s], None) for s in order)
        leftovers = itertools.chain.from_iterable(streams)  # non-empty only if a size was underestimated
        loaders = (loader for loader in itertools.chain(drawn, leftovers) if loader is not None)
        for loader in itertools.islice(loaders, batches_from_role * self.batch_size, None):
            yield load_or_mark(loader) if self.mark_bad_images else loader()


# -----------------------------------------------------------------------------
# 5. Pretraining mix

STREAMING_CORPORA = ("cc3m", "sbu")
CORPORA = ("coco", "coco_official", "vg", "cc3m", "sbu", "synthetic")


def corpus_dir(cfg, name):
    """cfg.<name>_dir, or data_root/<name> when that key is empty."""
    return Path(getattr(cfg, f"{name}_dir") or Path(cfg.data_root) / name)


def build_pretrain_datasets(cfg, transform, val_transform=None):
    """(train_dataset, val_dataset) over cfg.corpora.

    Training: COCO Karpathy train + restval, COCO official train captions, all of VG, CC3M and SBU
    (img2dataset), synthetic (its COCO train + restval and its VG). Held out: the Karpathy val split
    of COCO and/or synthetic; val_dataset is None (with a printed note) when neither is used.
    Without a streaming corpus the training set is map-style (a ConcatDataset); with one, everything
    is read as a CaptionStream (map-style corpora become shuffled sources of the stream), so a single
    loader path handles any mix. val_transform defaults to transform."""
    val_transform = transform if val_transform is None else val_transform
    if not cfg.corpora:
        raise ValueError(f"corpora is empty; choose from {', '.join(CORPORA)}")
    for name in cfg.corpora:
        if name not in CORPORA:
            raise ValueError(f"corpora: unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    if len(set(cfg.corpora)) != len(cfg.corpora):
        raise ValueError(f"corpora lists a corpus twice: {cfg.corpora}")
    train_parts, streams, val_parts = [], [], []

    def add_karpathy(json_path, image_root, offset):
        tables = read_karpathy(json_path, image_root, KARPATHY_PRETRAIN_SPLITS)
        train_parts.append(CaptionDataset(tables["train"], transform, offset))
        val_parts.append(CaptionDataset(tables["val"], val_transform, offset))

    for name in cfg.corpora:
        offset = IMAGE_ID_OFFSETS[name]
        if name == "coco":
            add_karpathy(corpus_dir(cfg, "coco") / "karpathy" / "dataset_coco.json", corpus_dir(cfg, "coco"), offset)
        elif name == "coco_official":
            train_parts.append(CaptionDataset(read_coco_official(corpus_dir(cfg, "coco")), transform, offset))
        elif name == "vg":
            train_parts.append(CaptionDataset(read_visual_genome(corpus_dir(cfg, "vg")), transform, offset))
        elif name in STREAMING_CORPORA:
            streams.append(Img2DatasetShards(corpus_dir(cfg, name), transform, offset))
        elif name == "synthetic":
            root = ensure_synthetic_world(cfg)
            add_karpathy(root / "coco" / "karpathy" / "dataset_coco.json", root / "coco", offset)
            train_parts.append(CaptionDataset(read_visual_genome(root / "vg"), transform, offset))
    train = CaptionStream(train_parts + streams) if streams else _concat(train_parts)
    if not val_parts:
        print(f"note: no held-out split: none of corpora {list(cfg.corpora)} has one "
              "(only coco and synthetic have a Karpathy val split); val_dataset is None")
    return train, (_concat(val_parts) if val_parts else None)


def build_text_corpora(cfg):
    """The text-only training stream over cfg.text_corpora: "synthetic" (the synthetic world's text corpus,
    generated on first use) or paths of TextLines corpora, relative ones under data_root. A CaptionStream, so it is
    split across ranks and workers, mixed and resumed as the caption streams are."""
    if not cfg.text_corpora:
        raise ValueError("text_corpora is empty: name text files or folders (under data_root), or 'synthetic'")
    if len(set(cfg.text_corpora)) != len(cfg.text_corpora):
        raise ValueError(f"text_corpora lists a corpus twice: {cfg.text_corpora}")
    return CaptionStream([TextLines(ensure_synthetic_text(cfg) if name == "synthetic" else Path(cfg.data_root) / name)
                          for name in cfg.text_corpora])


def _concat(datasets):
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


# -----------------------------------------------------------------------------
# 6. Tokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def synthetic_tokenizer():
    """A BERT WordPiece tokenizer whose vocabulary is the special tokens plus every grammar word."""
    from transformers import BertTokenizerFast
    vocabulary = list(SPECIAL_TOKENS) + synthetic_vocabulary()
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocabulary)})


def build_tokenizer(cfg):
    """cfg.tokenizer: "synthetic" (grammar vocabulary, no download), a hub name or local directory,
    or "" for the text tower's own tokenizer (cfg.text_tower must then be a hub name or directory)."""
    if cfg.tokenizer == "synthetic":
        return synthetic_tokenizer()
    name = cfg.tokenizer or cfg.text_tower
    if not cfg.tokenizer and cfg.text_tower in TEXT_FAMILIES:
        raise ValueError(f"text_tower={cfg.text_tower!r} is a family name (random init) and brings no tokenizer: "
                         "set tokenizer to a hub name, a local directory or 'synthetic'")
    from transformers import AutoTokenizer

    tokenizer = from_hub_or_directory(AutoTokenizer.from_pretrained, name, "tokenizer",
                                      "give a local directory (save_pretrained output) or tokenizer='synthetic'")
    if not tokenizer.is_fast:
        raise ValueError(f"tokenizer {name!r} is not a fast tokenizer; whole-word masking needs its word_ids")
    return tokenizer


@dataclass(frozen=True)
class TokenizerInfo:
    """What mask_tokens needs to know about the tokenizer."""
    mask_token_id: int
    vocab_size: int
    special_ids: tuple  # never drawn as random replacement tokens

    @classmethod
    def from_tokenizer(cls, tokenizer):
        if tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no mask token, which MLM needs")
        return cls(tokenizer.mask_token_id, len(tokenizer), tuple(sorted(tokenizer.all_special_ids)))


# -----------------------------------------------------------------------------
# 7. Image transforms

def build_transform(cfg, train=True):
    """PIL image -> uint8 tensor (3, image_size, image_size). The model normalises it with image_mean and
    image_std on its device (encoders.PixelNormalize), so loader workers do no float work and send a quarter of the
    bytes. With cfg.augment (training only): a mild random resized crop and no horizontal flip, because a flip
    would make captions with 'left of' / 'on the right' false. Otherwise cfg.image_resize: "squash" resizes to
    the square, "crop" resizes the shorter side bicubically and centre-crops the square (the original's)."""
    size = (cfg.image_size, cfg.image_size)
    if cfg.augment and train:
        resize = v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True)
    elif cfg.image_resize == "crop":
        resize = v2.Compose([v2.Resize(cfg.image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                             v2.CenterCrop(size)])
    else:
        resize = v2.Resize(size, antialias=True)
    return v2.Compose([v2.ToImage(), resize, v2.ToPureTensor()])


