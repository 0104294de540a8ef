"""Data for pretraining: a synthetic world, the real caption corpora, tokenizer, transforms, batches.

Sections, top to bottom:
  1. Synthetic world    procedural scenes rendered with Pillow, written in the COCO-Karpathy and
                        Visual Genome formats so the real readers below read them
  2. Images and JSON    opening images by content, loading JSON with errors that name file and field;
                        progress, the one progress bar of the project
  3. Caption tables     captions held in flat numpy arrays; the map-style CaptionDataset
  4. Corpus readers     COCO Karpathy, COCO official, Visual Genome (map-style)
  5. Streaming corpora  img2dataset shards (CC3M, SBU), plain-text corpora (TextLines) and CaptionStream,
                        which mixes sources
  6. Pretraining mix    build_pretrain_datasets, build_text_corpora
  7. Tokenizer          build_tokenizer, TokenizerInfo
  8. Image transforms   build_transform
  9. Collator           PretrainCollator
 10. MLM and ITM        mask_tokens, sample_itm_pairs (pure functions, run in the main process)
 11. Sampling, loading  MicroBatchSampler, ResumableLoader, build_loader; ImageTextSchedule and ScheduledLoader
                        (text-only batches before image-text data starts, and mixed in after)
 12. Feature cache      the frozen vision tower's output, computed once: with_cached_vision_features

A caption item is {"image": uint8 tensor (3, H, W), "caption": str, "image_id": int}; image ids are
unique per picture across all corpora of a run (see IMAGE_ID_OFFSETS). A text item is {"text": str}.
"""

import functools
import gzip
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from torchvision.transforms import v2
from tqdm import tqdm

# -----------------------------------------------------------------------------
# 1. Synthetic world
#
# Scenes of a few flat shapes on a plain dark background. Every caption is generated from the scene's
# object list, so it is true of its picture: a model can learn image-text matching from it. Colours
# are far apart in RGB and shapes are at least ~14 px at 64x64 so that a tiny model can see them.
# Layout under root:
#   coco/karpathy/dataset_coco.json, coco/train2014/*.jpg, coco/val2014/*.jpg   (Karpathy schema)
#   vg/region_descriptions.json, vg/image_data.json, vg/images/VG_100K{,_2}/<id>.jpg
#   scenes.json (every picture's objects: the facts downstream tasks are built from), world.json
# A scene's image id is its COCO id and its VG id: the two folders hold the same pictures, and VG
# holds only the train + restval scenes so that the held-out val scenes are never trained on.

SHAPES = {  # singular -> plural
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "star": "stars", "diamond": "diamonds", "cross": "crosses",
}
COLOURS = {
    "red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 100, 245),
    "yellow": (245, 225, 40), "purple": (175, 70, 235), "white": (245, 245, 245),
}
SIZES = {"small": 0.22, "large": 0.36}  # side of an object's square box, as a fraction of the image side
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
# Every other word the caption templates below use; the synthetic tokenizer's vocabulary is built
# from these constants, and a test checks that no caption tokenizes to [UNK].
GRAMMAR_WORDS = ("a", "and", "are", "at", "bottom", "in", "is", "left", "middle", "of", "on", "right",
                 "the", "there", "top", ",",
                 # the synthetic downstream tasks' statements, hypotheses and questions (tasks/)
                 "both", "colour", "heavy", "how", "image", "images", "many", "moving", "object", "shape",
                 "what", "where", "wooden", "?")
BACKGROUND = (35, 35, 35)
MAX_OBJECTS = 4
CAPTIONS_PER_IMAGE = 5  # like COCO
RENDER_SCALE = 4  # draw at 4x and downsample: anti-aliased edges without a slow renderer
PLACEMENT_TRIES = 50
WORLD_VERSION = 1  # bump when the generator changes, so an old world on disk is refused, not reused


def sample_scene(rng, image_size):
    """A random scene: list of objects {"shape", "colour", "size", "box": [x, y, w, h]} in pixels.
    1-3 kinds of (shape, colour), each present 1-3 times (at most MAX_OBJECTS in all), boxes apart."""
    shape_names, colour_names, size_names = list(SHAPES), list(COLOURS), list(SIZES)
    num_kinds = int(rng.integers(1, 4))
    kinds = rng.choice(len(shape_names) * len(colour_names), size=num_kinds, replace=False)
    wanted = []
    for kind in kinds:
        count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        wanted += [(shape_names[kind % len(shape_names)], colour_names[kind // len(shape_names)])] * count
    objects = []
    for shape, colour in wanted[:MAX_OBJECTS]:
        size = size_names[int(rng.integers(len(size_names)))]
        side = round(SIZES[size] * image_size)
        for _ in range(PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
            box = [x, y, side, side]
            if not any(_boxes_touch(box, other["box"]) for other in objects):
                objects.append({"shape": shape, "colour": colour, "size": size, "box": box})
                break
    return objects


def _boxes_touch(a, b, gap=2):
    """True when boxes [x, y, w, h] overlap or come closer than `gap` pixels."""
    return (a[0] < b[0] + b[2] + gap and b[0] < a[0] + a[2] + gap
            and a[1] < b[1] + b[3] + gap and b[1] < a[1] + a[3] + gap)


def render_scene(objects, image_size):
    """The scene as an RGB PIL image of image_size x image_size."""
    canvas = Image.new("RGB", (image_size * RENDER_SCALE,) * 2, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        x, y, w, h = (v * RENDER_SCALE for v in obj["box"])
        _draw_shape(draw, obj["shape"], COLOURS[obj["colour"]], x, y, w, h)
    return canvas.reduce(RENDER_SCALE)


def _draw_shape(draw, shape, fill, x, y, w, h):
    right, bottom, cx, cy = x + w - 1, y + h - 1, x + w / 2, y + h / 2
    if shape == "circle":
        draw.ellipse([x, y, right, bottom], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, right, bottom], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y), (right, bottom), (x, bottom)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y), (right, cy), (cx, bottom), (x, cy)], fill=fill)
    elif shape == "star":
        outer, inner = w / 2, w / 2 * 0.45
        points = []
        for k in range(10):
            radius, angle = (outer if k % 2 == 0 else inner), np.pi * (k / 5 - 0.5)
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        half_bar = w / 6
        draw.rectangle([x, cy - half_bar, right, cy + half_bar], fill=fill)
        draw.rectangle([cx - half_bar, y, cx + half_bar, bottom], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def noun_phrase(obj, with_size=False):
    """'a red circle' or 'a large red circle'."""
    size = f"{obj['size']} " if with_size else ""
    return f"a {size}{obj['colour']} {obj['shape']}"


def position_phrase(obj, image_size):
    """Where the object's centre falls on a 3x3 grid: 'at the top left', 'on the right', 'in the middle'."""
    x, y, w, h = obj["box"]
    row = ("top", "middle", "bottom")[min(2, int(3 * (y + h / 2) / image_size))]
    column = ("left", "middle", "right")[min(2, int(3 * (x + w / 2) / image_size))]
    if row == "middle" and column == "middle":
        return "in the middle"
    if row == "middle":
        return f"on the {column}"
    if column == "middle":
        return f"at the {row}"
    return f"at the {row} {column}"


def spatial_relations(a, b):
    """The relations (from RELATIONS) that hold from object a to object b: a is 'left of' b when a's
    box ends before b's begins, and likewise vertically. Apart boxes always satisfy at least one."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
    holds = (ax + aw <= bx, bx + bw <= ax, ay + ah <= by, by + bh <= ay)
    return [relation for relation, true in zip(RELATIONS, holds) if true]


def count_phrase(count, colour, shape):
    """'a red circle', 'two green triangles'; colour may be '' for shape-only counts."""
    colour = f"{colour} " if colour else ""
    return f"a {colour}{shape}" if count == 1 else f"{NUMBER_WORDS[count]} {colour}{SHAPES[shape]}"


def scene_summary(objects):
    """Every object with exact counts: 'two green triangles and a red circle'."""
    groups = {}
    for obj in objects:
        groups[(obj["colour"], obj["shape"])] = groups.get((obj["colour"], obj["shape"]), 0) + 1
    phrases = [count_phrase(n, colour, shape) for (colour, shape), n in groups.items()]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe_scene(objects, image_size, rng, num_captions=CAPTIONS_PER_IMAGE):
    """num_captions true captions of the scene: the summary first, then distinct ones drawn from
    attribute, position, count and spatial-relation templates (repeats only when too few exist)."""
    summary = scene_summary(objects)
    candidates = []
    for obj in objects:
        where = position_phrase(obj, image_size)
        candidates += [noun_phrase(obj), noun_phrase(obj, True),
                       f"{noun_phrase(obj)} {where}", f"{noun_phrase(obj, True)} {where}"]
    for key in dict.fromkeys((obj["colour"], obj["shape"]) for obj in objects):
        count = sum((obj["colour"], obj["shape"]) == key for obj in objects)
        verb = "is" if count == 1 else "are"
        candidates.append(f"there {verb} {count_phrase(count, *key)}")
    for shape in dict.fromkeys(obj["shape"] for obj in objects):
        count = sum(obj["shape"] == shape for obj in objects)
        if count > 1:
            candidates.append(count_phrase(count, "", shape))
    for a, b in itertools.permutations(objects, 2):
        for relation in spatial_relations(a, b):
            candidates += [f"{noun_phrase(a)} {relation} {noun_phrase(b)}",
                           f"{noun_phrase(a)} is {relation} {noun_phrase(b)}"]
    candidates = [c for c in dict.fromkeys(candidates) if c != summary]  # dedupe, keep order
    wanted = num_captions - 1
    picks = rng.choice(len(candidates), size=wanted, replace=len(candidates) < wanted)
    return [summary] + [candidates[i] for i in picks]


def region_descriptions(objects):
    """Visual-Genome-style regions: one per object ('a large red circle', its box) and one per related
    pair of objects ('a red circle left of a blue square', the union of their boxes)."""
    regions = [(noun_phrase(obj, True), obj["box"]) for obj in objects]
    for a, b in itertools.combinations(objects, 2):
        relations = spatial_relations(a, b)
        if relations:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            x, y = min(ax, bx), min(ay, by)
            box = [x, y, max(ax + aw, bx + bw) - x, max(ay + ah, by + bh) - y]
            regions.append((f"{noun_phrase(a)} {relations[0]} {noun_phrase(b)}", box))
    return regions


def synthetic_vocabulary():
    """Every word the grammar can produce (sorted), for the synthetic WordPiece tokenizer."""
    words = {*SHAPES, *SHAPES.values(), *COLOURS, *SIZES, *NUMBER_WORDS.values(), *GRAMMAR_WORDS}
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)


def synthetic_split(index, num_images):
    """Karpathy-style split of scene `index`: ~80% train, 10% restval, 5% val, 5% test (val and test
    at least one scene each). Train pictures go to train2014/, the others to val2014/, as in COCO."""
    held_out = max(1, num_images // 20)
    restval = num_images // 10
    train = num_images - restval - 2 * held_out
    if index < train:
        return "train"
    if index < train + restval:
        return "restval"
    return "val" if index < train + restval + held_out else "test"


def generate_synthetic_world(root, num_images, seed, image_size=64):
    """Write a synthetic world of num_images scenes under root (layout above). Scene i depends only on
    (seed, i), and every file is a deterministic function of (num_images, seed, image_size)."""
    if num_images < 4:
        raise ValueError(f"synthetic world: num_images={num_images}, need at least 4 (train, restval, val, test)")
    root = Path(root)
    for folder in ("coco/karpathy", "coco/train2014", "coco/val2014", "vg/images/VG_100K", "vg/images/VG_100K_2"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    karpathy_images, vg_regions, vg_image_data, scenes = [], [], [], []
    sentence_id, region_id = 0, 0
    for index in progress(range(num_images), num_images, "synthetic world"):
        rng = np.random.default_rng([seed, index])
        image_id = index + 1  # COCO and VG ids start at 1
        objects = sample_scene(rng, image_size)
        captions = describe_scene(objects, image_size, rng)
        split = synthetic_split(index, num_images)
        buffer = io.BytesIO()
        # 4:4:4 chroma keeps the colours of 14-pixel shapes clean.
        render_scene(objects, image_size).save(buffer, format="JPEG", quality=95, subsampling=0)
        jpeg = buffer.getvalue()
        folder = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{folder}_{image_id:012d}.jpg"
        (root / "coco" / folder / filename).write_bytes(jpeg)
        sentences = []
        for caption in captions:
            sentences.append({"tokens": caption.replace(",", "").split(), "raw": caption,
                              "imgid": index, "sentid": sentence_id})
            sentence_id += 1
        karpathy_images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences],
                                "filename": filename, "imgid": index, "split": split,
                                "sentences": sentences, "cocoid": image_id})
        scenes.append({"image_id": image_id, "split": split, "objects": objects})
        if split in ("train", "restval"):
            vg_folder = "VG_100K" if index < num_images // 2 else "VG_100K_2"  # as VG ships: two zips
            (root / "vg/images" / vg_folder / f"{image_id}.jpg").write_bytes(jpeg)
            regions = []
            for phrase, (x, y, w, h) in region_descriptions(objects):
                region_id += 1
                regions.append({"region_id": region_id, "width": w, "height": h, "image_id": image_id,
                                "phrase": phrase, "y": y, "x": x})
            vg_regions.append({"regions": regions, "id": image_id})
            vg_image_data.append({"width": image_size, "url": f"https://cs.stanford.edu/people/rak248/"
                                  f"{vg_folder}/{image_id}.jpg", "height": image_size, "image_id": image_id,
                                  "coco_id": image_id, "flickr_id": None})
    _write_json(root / "coco/karpathy/dataset_coco.json", {"images": karpathy_images, "dataset": "coco"})
    _write_json(root / "vg/region_descriptions.json", vg_regions)
    _write_json(root / "vg/image_data.json", vg_image_data)
    _write_json(root / "scenes.json", {"image_size": image_size, "scenes": scenes})
    _write_json(root / "world.json", _world_params(num_images, seed, image_size))  # last: marks it complete


def _world_params(num_images, seed, image_size):
    return {"num_images": num_images, "seed": seed, "image_size": image_size, "version": WORLD_VERSION}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def generate_once(target, marker, generate, local_rank, timeout_seconds, what):
    """Make folder `target` (complete once it holds `marker`) exactly once across processes and nodes: local
    rank 0 runs generate(staging) into a hidden temporary folder beside it and renames that onto `target` in
    one atomic step (if two nodes race, the first rename wins and the loser discards its copy); every rank then
    waits for `marker`. A `target` without `marker` is refused: it is not `what` this code generates."""
    target, marker = Path(target), Path(marker)
    if target.exists() and not marker.exists():
        raise ValueError(f"{target} exists but holds no {marker.name}, so it is not {what}; delete it")
    if not target.exists() and local_rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            generate(staging)
            os.rename(staging, target)
        except OSError:
            if not marker.exists():  # not a lost race with another node: a real failure
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    deadline = time.monotonic() + timeout_seconds
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_seconds:.0f}s for local rank 0 to generate {target}")
        time.sleep(0.2)


def ensure_synthetic_world(cfg, dist=None, timeout_seconds=3600.0):
    """Path of data_root/synthetic, generating it first if missing (cfg.synthetic_images scenes of
    cfg.synthetic_image_size pixels from cfg.synthetic_seed).

    Concurrency (torchrun ranks, several nodes on one filesystem, crashes): only LOCAL_RANK 0 generates,
    into a hidden temporary folder beside the target that is renamed onto it in one atomic step, so
    data_root/synthetic either does not exist or is complete. The other local ranks poll for its
    world.json (no torch.distributed needed, so this works before or without init_process_group). If two
    nodes race, the first rename wins and the loser discards its copy. A world generated with other
    parameters is refused rather than silently reused. dist: anything with .local_rank (engine.Dist);
    None reads the LOCAL_RANK environment variable that torchrun sets."""
    root = Path(cfg.data_root) / "synthetic"
    marker = root / "world.json"
    wanted = _world_params(cfg.synthetic_images, cfg.synthetic_seed, cfg.synthetic_image_size)
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if dist is None else dist.local_rank
    generate_once(root, marker, lambda staging: generate_synthetic_world(
        staging, cfg.synthetic_images, cfg.synthetic_seed, cfg.synthetic_image_size), local_rank, timeout_seconds,
        "a synthetic world")
    found = _load_json(marker)
    if found != wanted:
        raise ValueError(f"{marker}: world generated with {found}, config asks for {wanted} "
                         f"(synthetic_images, synthetic_seed, synthetic_image_size); delete {root} or match them")
    return root


# The synthetic world's text-only corpus: one line per random scene (scenes drawn as the world draws them, never
# rendered), each a few clauses long: the scene's summary, then where objects are and how they relate. Only
# grammar words are used, so the synthetic tokenizer covers it. Layout: data_root/synthetic_text/corpus.txt and
# text.json (its parameters, written last).
SYNTHETIC_TEXT_CLAUSES = (1, 3)  # clauses after the summary, drawn uniformly from this closed range


def definite(phrase):
    """'a red circle' -> 'the red circle'."""
    return "the " + phrase.removeprefix("a ")


def describe_scene_text(objects, image_size, rng):
    """One line of synthetic text about a scene: 'there are two red circles and a blue square, a large red
    circle is at the top left and the red circle is left of the blue square' (2 to 4 clauses)."""
    verb = "is" if len(objects) == 1 else "are"
    clauses = []
    for obj in objects:
        clauses.append(f"{noun_phrase(obj, bool(rng.integers(2)))} is {position_phrase(obj, image_size)}")
    for a, b in itertools.permutations(objects, 2):
        if (a["colour"], a["shape"]) != (b["colour"], b["shape"]):  # 'the red circle is left of a red circle' is no help
            clauses += [f"{definite(noun_phrase(a))} is {relation} {noun_phrase(b)}"
                        for relation in spatial_relations(a, b)]
    clauses = list(dict.fromkeys(clauses))
    low, high = SYNTHETIC_TEXT_CLAUSES
    picks = rng.choice(len(clauses), size=min(int(rng.integers(low, high + 1)), len(clauses)), replace=False)
    parts = [f"there {verb} {scene_summary(objects)}"] + [clauses[i] for i in picks]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def generate_synthetic_text(root, num_lines, seed, image_size=64):
    """Write num_lines lines of synthetic text to root/corpus.txt; line i depends only on (seed, i), and on
    streams apart from the world's scenes (which use (seed, i) alone)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.txt", "w", encoding="utf-8") as f:
        for i in range(num_lines):
            rng = np.random.default_rng([seed, i, 1])
            f.write(describe_scene_text(sample_scene(rng, image_size), image_size, rng) + "\n")
    _write_json(root / "text.json", _text_params(num_lines, seed, image_size))  # last: marks it complete


def _text_params(num_lines, seed, image_size):
    return {"num_lines": num_lines, "seed": seed, "image_size": image_size, "version": WORLD_VERSION}


def ensure_synthetic_text(cfg, dist=None, timeout_seconds=3600.0):
    """Path of data_root/synthetic_text/corpus.txt, generating it first if missing (cfg.synthetic_text_lines
    lines from cfg.synthetic_seed), once across processes exactly as ensure_synthetic_world does."""
    root = Path(cfg.data_root) / "synthetic_text"
    marker = root / "text.json"
    wanted = _text_params(cfg.synthetic_text_lines, cfg.synthetic_seed, cfg.synthetic_image_size)
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if dist is None else dist.local_rank
    generate_once(root, marker, lambda staging: generate_synthetic_text(
        staging, cfg.synthetic_text_lines, cfg.synthetic_seed, cfg.synthetic_image_size), local_rank,
        timeout_seconds, "a synthetic text corpus")
    found = _load_json(marker)
    if found != wanted:
        raise ValueError(f"{marker}: text generated with {found}, config asks for {wanted} (synthetic_text_lines, "
                         f"synthetic_seed, synthetic_image_size); delete {root} or match them")
    return root / "corpus.txt"


# -----------------------------------------------------------------------------
# 2. Images and JSON

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


def progress(iterable, total, desc, enabled=True):
    """`iterable` with a tqdm bar on stderr (`desc`, done/total, rate, eta) for a long step. Quiet, a plain
    pass-through, unless `enabled`, stderr is a terminal (a log file gets no carriage-return noise) and this is
    the process of global rank 0 (RANK, as torchrun sets it; read here so that it works before or without a
    process group)."""
    shown = enabled and sys.stderr.isatty() and int(os.environ.get("RANK", "0")) == 0
    return tqdm(iterable, total=total, desc=desc, disable=not shown, file=sys.stderr, dynamic_ncols=True)


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


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
# 3. Caption tables
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
# 4. Corpus readers (map-style): each returns CaptionTables of the corpus's own image ids.

KARPATHY_SPLITS = ("train", "restval", "val", "test")
KARPATHY_PRETRAIN_SPLITS = {"train": ("train", "restval"), "val": ("val",)}


def read_karpathy(json_path, image_root, split_sets):
    """Karpathy-split captions (dataset_coco.json; dataset_flickr30k.json, which has no 'filepath' and
    no 'cocoid', works too). split_sets maps a name to the Karpathy splits it gathers, e.g.
    {"train": ("train", "restval"), "val": ("val",)}; returns {name: CaptionTable}. Captions are the
    'raw' sentences, stripped. Image id: 'cocoid', else 'imgid'."""
    data = _load_json(json_path)
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
    data = _load_json(json_path)
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
    for i, entry in enumerate(_as_list(_load_json(data_path), data_path)):
        image_id = _field(entry, ("image_id", "id"), data_path, f"[{i}]", int)
        url = _field(entry, "url", data_path, f"[{i}]", str)
        folder = url.rstrip("/").split("/")[-2] if url.count("/") >= 1 else ""
        if folder not in ("VG_100K", "VG_100K_2"):
            raise ValueError(f"{data_path}: [{i}].url {url!r} does not name VG_100K or VG_100K_2")
        folder_of[image_id] = folder
    images, captions = [], []
    for i, entry in enumerate(_as_list(_load_json(regions_path), regions_path)):
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
# 5. Streaming corpora
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
            return _field(_load_json(stats), "successes", stats, "the top level", int)
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
# 6. Pretraining mix

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
# 7. Tokenizer

TEXT_FAMILIES = ("bert", "electra", "roberta")
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

    from model import from_hub_or_directory
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
# 8. Image transforms

def build_transform(cfg, train=True):
    """PIL image -> uint8 tensor (3, image_size, image_size). The model normalises it with image_mean and
    image_std on its device (model.PixelNormalize), so loader workers do no float work and send a quarter of the
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


# -----------------------------------------------------------------------------
# 9. Collator

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
# 10. MLM and ITM: pure functions of their inputs and a torch.Generator (on the tensors' device),
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
# 11. Sampling and loading

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
# 12. Frozen vision feature cache
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
    bad = {int(row): message for row, message in _load_json(marker)["bad_pictures"].items()}
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
    _write_json(tmp_marker, info)
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
