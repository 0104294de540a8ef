"""The synthetic world: procedural scenes rendered with Pillow, their captions and region descriptions, and the
text corpus written from the same grammar. Everything runs offline, so every test and quick start has data.

Sections, top to bottom:
  1. Scenes and captions  sampling, rendering and describing a scene; the grammar's vocabulary
  2. Generating           the world's folders in the COCO-Karpathy and Visual Genome formats (so the real
                          readers in data.py read them), made once across processes (generate_once)
  3. Text corpus          the world's text-only corpus, for text-only MLM

Nothing here imports the rest of the project: data.py and tasks/ build on it.
"""

import io
import itertools
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from files import generate_once, load_json, progress, write_json

# -----------------------------------------------------------------------------
# 1. Scenes and captions
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
SIZES = {"small": 0.22, "large": 0.34}  # side of an object's square box, as a fraction of the image side
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
RELATIONS = ("left of", "right of", "above", "below")  # where a is from b (spatial_relations)
SIZE_RELATIONS = ("larger than", "smaller than")  # a's size against b's (relations)
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above",
                     "larger than": "smaller than", "smaller than": "larger than"}
POSITIONS = ("at the top left", "at the top", "at the top right", "on the left", "in the middle", "on the right",
             "at the bottom left", "at the bottom", "at the bottom right")  # position_phrase's 3x3 grid
# Every other word the caption templates below use; the synthetic tokenizer's vocabulary is built
# from these constants, and a test checks that no caption tokenizes to [UNK].
GRAMMAR_WORDS = ("a", "and", "are", "at", "bottom", "in", "is", "left", "middle", "objects", "of", "on", "right",
                 "the", "there", "top", ",",
                 # the synthetic downstream tasks' statements, hypotheses and questions (tasks/)
                 "both", "colour", "heavy", "how", "image", "images", "many", "moving", "object", "shape",
                 "what", "where", "wooden", "?")
BACKGROUND = (35, 35, 35)
MAX_OBJECTS = 5
MAX_KINDS = 4  # kinds of object, (colour, shape), in one scene
DISTRACTOR_PROBABILITY = 0.7  # that a scene's next kind shares its colour or its shape with a kind already in it
CAPTIONS_PER_IMAGE = 5  # like COCO
RENDER_SCALE = 4  # draw at 4x and downsample: anti-aliased edges without a slow renderer
PLACEMENT_TRIES = 50
WORLD_VERSION = 2  # bump when the generator changes, so an old world on disk is refused, not reused


def sample_scene(rng, image_size):
    """A random scene: list of objects {"shape", "colour", "size", "box": [x, y, w, h]} in pixels.
    1-4 kinds of (shape, colour), each present 1-3 times (at most MAX_OBJECTS in all), boxes apart. Each kind
    after the first is, with DISTRACTOR_PROBABILITY, a distractor sharing its colour or its shape with a kind
    already drawn (a red circle beside a red square and a blue circle), so that naming an object takes both
    its attributes bound together, not either one alone."""
    shape_names, colour_names, size_names = list(SHAPES), list(COLOURS), list(SIZES)
    num_kinds = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.35, 0.3, 0.2]))
    kinds = []
    while len(kinds) < num_kinds:
        if kinds and rng.random() < DISTRACTOR_PROBABILITY:
            colour, shape = kinds[int(rng.integers(len(kinds)))]
            if rng.random() < 0.5:
                colour = colour_names[int(rng.integers(len(colour_names)))]
            else:
                shape = shape_names[int(rng.integers(len(shape_names)))]
        else:
            colour = colour_names[int(rng.integers(len(colour_names)))]
            shape = shape_names[int(rng.integers(len(shape_names)))]
        if (colour, shape) not in kinds:
            kinds.append((colour, shape))
    wanted = []
    for colour, shape in kinds:
        wanted += [(shape, colour)] * int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    objects = []
    for k in rng.permutation(len(wanted))[:MAX_OBJECTS]:  # a random subset when there are too many
        shape, colour = wanted[k]
        size = size_names[int(rng.integers(len(size_names)))]
        side = round(SIZES[size] * image_size)
        corners = rng.integers(0, image_size - side + 1, size=(PLACEMENT_TRIES, 2))  # (tries, 2) x, y
        free = np.ones(PLACEMENT_TRIES, dtype=bool)
        for other in objects:
            free &= ~_boxes_touch(corners, side, other["box"])
        if free.any():  # the first free try; none free: the object is left out
            x, y = (int(v) for v in corners[free.argmax()])
            objects.append({"shape": shape, "colour": colour, "size": size, "box": [x, y, side, side]})
    return objects


def _boxes_touch(corners, side, box, gap=2):
    """(N,) bool: whether each square at corners (N, 2) of the given side overlaps box [x, y, w, h] or comes
    closer to it than `gap` pixels."""
    x, y, w, h = box
    return ((corners[:, 0] < x + w + gap) & (x < corners[:, 0] + side + gap)
            & (corners[:, 1] < y + h + gap) & (y < corners[:, 1] + side + gap))


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
    row = min(2, int(3 * (y + h / 2) / image_size))
    column = min(2, int(3 * (x + w / 2) / image_size))
    return POSITIONS[3 * row + column]


def spatial_relations(a, b):
    """The relations (from RELATIONS) that hold from object a to object b: a is 'left of' b when a's
    box ends before b's begins, and likewise vertically. Apart boxes always satisfy at least one."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
    holds = (ax + aw <= bx, bx + bw <= ax, ay + ah <= by, by + bh <= ay)
    return [relation for relation, true in zip(RELATIONS, holds) if true]


def relations(a, b):
    """spatial_relations, then 'larger than' / 'smaller than' when a and b differ in size."""
    if a["size"] == b["size"]:
        return spatial_relations(a, b)
    return spatial_relations(a, b) + [SIZE_RELATIONS[SIZES[a["size"]] < SIZES[b["size"]]]]


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


# Statements: facts a scene makes true or false, as dicts that statement_text writes out and statement_holds
# checks against a scene's objects. A statement's one-attribute variants (one_attribute_variants) change exactly
# one of its colour, shape, size, position, count or relation: those a scene makes false are the hard negatives
# of the downstream tasks, false captions worded like the true ones, so that only the picture tells them apart.
#   {"type": "object", "colour", "shape": None (any) or a shape, "size": None or a size, "where": None or a POSITIONS
#    phrase}
#   {"type": "count", "colour": None or a colour, "shape": None or a shape, "count": 1-5}   (exactly that many)
#   {"type": "relation", "a": {"colour", "shape"}, "relation": RELATIONS or SIZE_RELATIONS, "b": {"colour", "shape"}}


def statement_text(statement):
    """'there is a large red circle at the top', 'there are two red objects', 'a red circle is left of a blue
    square'."""
    if statement["type"] == "object":
        size = f"{statement['size']} " if statement["size"] else ""
        where = f" {statement['where']}" if statement["where"] else ""
        return f"there is a {size}{statement['colour']} {statement['shape'] or 'object'}{where}"
    if statement["type"] == "count":
        count, colour, shape = statement["count"], statement["colour"], statement["shape"]
        noun = (shape if count == 1 else SHAPES[shape]) if shape else ("object" if count == 1 else "objects")
        colour = f"{colour} " if colour else ""
        return f"there {'is' if count == 1 else 'are'} {NUMBER_WORDS[count]} {colour}{noun}"
    return f"{noun_phrase(statement['a'])} is {statement['relation']} {noun_phrase(statement['b'])}"


def _matches(obj, colour, shape):
    return (colour is None or obj["colour"] == colour) and (shape is None or obj["shape"] == shape)


def statement_holds(statement, objects, image_size):
    """Whether the scene makes the statement true."""
    if statement["type"] == "object":
        return any(_matches(o, statement["colour"], statement["shape"])
                   and statement["size"] in (None, o["size"])
                   and statement["where"] in (None, position_phrase(o, image_size)) for o in objects)
    if statement["type"] == "count":
        return sum(_matches(o, statement["colour"], statement["shape"]) for o in objects) == statement["count"]
    a, b = statement["a"], statement["b"]
    return any(_matches(x, a["colour"], a["shape"]) and _matches(y, b["colour"], b["shape"])
               and statement["relation"] in relations(x, y) for x in objects for y in objects if x is not y)


def sample_statement(objects, image_size, rng, types=("object", "count", "relation")):
    """A statement the scene makes true, of a type drawn from `types` (a relation needs two objects)."""
    if len(objects) < 2:
        types = [t for t in types if t != "relation"] or ["object"]
    kind = types[int(rng.integers(len(types)))]
    obj = objects[int(rng.integers(len(objects)))]
    if kind == "object":
        return {"type": "object", "colour": obj["colour"], "shape": obj["shape"],
                "size": obj["size"] if rng.random() < 0.5 else None,
                "where": position_phrase(obj, image_size) if rng.random() < 0.5 else None}
    if kind == "count":
        colour, shape = [(obj["colour"], obj["shape"]), (obj["colour"], None), (None, obj["shape"]),
                         (None, None)][int(rng.choice(4, p=[0.4, 0.25, 0.25, 0.1]))]
        return {"type": "count", "colour": colour, "shape": shape,
                "count": sum(_matches(o, colour, shape) for o in objects)}
    pairs = [(a, b, r) for a in objects for b in objects if a is not b for r in relations(a, b)]
    a, b, relation = pairs[int(rng.integers(len(pairs)))]
    return {"type": "relation", "relation": relation, "a": {"colour": a["colour"], "shape": a["shape"]},
            "b": {"colour": b["colour"], "shape": b["shape"]}}


def one_attribute_variants(statement):
    """Every statement differing from `statement` in exactly one attribute, as (attribute, statement):
    attribute is one of "colour", "shape", "size", "position", "count", "relation"."""
    variants = []

    def vary(attribute, path, values):
        for value in values:
            changed = {**statement, **({k: dict(v) for k, v in statement.items() if isinstance(v, dict)})}
            target = changed if len(path) == 1 else changed[path[0]]
            if target[path[-1]] != value:
                target[path[-1]] = value
                variants.append((attribute, changed))

    if statement["type"] == "relation":
        for side in ("a", "b"):
            vary("colour", (side, "colour"), COLOURS)
            vary("shape", (side, "shape"), SHAPES)
        spatial = statement["relation"] in RELATIONS
        vary("relation", ("relation",), RELATIONS if spatial else SIZE_RELATIONS)
        return variants
    if statement["colour"] is not None:
        vary("colour", ("colour",), COLOURS)
    if statement["shape"] is not None:
        vary("shape", ("shape",), SHAPES)
    if statement["type"] == "count":
        vary("count", ("count",), NUMBER_WORDS)
        return variants
    if statement["size"] is not None:
        vary("size", ("size",), SIZES)
    if statement["where"] is not None:
        vary("position", ("where",), POSITIONS)
    return variants


def false_variant(statement, objects, image_size, rng):
    """(attribute, variant): a one-attribute variant of `statement` that the scene makes false, drawn with
    every changed attribute equally likely; None if the scene makes every variant true."""
    by_attribute = {}
    for attribute, variant in one_attribute_variants(statement):
        if not statement_holds(variant, objects, image_size):
            by_attribute.setdefault(attribute, []).append(variant)
    if not by_attribute:
        return None
    attribute = list(by_attribute)[int(rng.integers(len(by_attribute)))]
    choices = by_attribute[attribute]
    return attribute, choices[int(rng.integers(len(choices)))]


def describe_scene(objects, image_size, rng, num_captions=CAPTIONS_PER_IMAGE):
    """num_captions true captions of the scene: the summary first, then distinct ones drawn from
    attribute, position, count (of a kind, a colour, a shape, every object), spatial-relation and
    size-relation templates (repeats only when too few exist)."""
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
    for colour in dict.fromkeys(obj["colour"] for obj in objects):
        candidates.append(statement_text({"type": "count", "colour": colour, "shape": None,
                                          "count": sum(obj["colour"] == colour for obj in objects)}))
    candidates.append(statement_text({"type": "count", "colour": None, "shape": None, "count": len(objects)}))
    for a, b in itertools.permutations(objects, 2):
        for relation in relations(a, b):
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
        relations_ab = relations(a, b)
        if relations_ab:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            x, y = min(ax, bx), min(ay, by)
            box = [x, y, max(ax + aw, bx + bw) - x, max(ay + ah, by + bh) - y]
            regions.append((f"{noun_phrase(a)} {relations_ab[0]} {noun_phrase(b)}", box))
    return regions


def synthetic_vocabulary():
    """Every word the grammar can produce (sorted), for the synthetic WordPiece tokenizer."""
    words = {*SHAPES, *SHAPES.values(), *COLOURS, *SIZES, *NUMBER_WORDS.values(), *GRAMMAR_WORDS}
    for phrase in (*RELATIONS, *SIZE_RELATIONS, *POSITIONS):
        words.update(phrase.split())
    return sorted(words)


# -----------------------------------------------------------------------------
# 2. Generating the world, once across processes


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
    write_json(root / "coco/karpathy/dataset_coco.json", {"images": karpathy_images, "dataset": "coco"})
    write_json(root / "vg/region_descriptions.json", vg_regions)
    write_json(root / "vg/image_data.json", vg_image_data)
    write_json(root / "scenes.json", {"image_size": image_size, "scenes": scenes})
    write_json(root / "world.json", _world_params(num_images, seed, image_size))  # last: marks it complete


def _world_params(num_images, seed, image_size):
    return {"num_images": num_images, "seed": seed, "image_size": image_size, "version": WORLD_VERSION}


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
    found = load_json(marker)
    if found != wanted:
        raise ValueError(f"{marker}: world generated with {found}, config asks for {wanted} "
                         f"(synthetic_images, synthetic_seed, synthetic_image_size); delete {root} or match them")
    return root


# The synthetic world's text-only corpus: one line per random scene (scenes drawn as the world draws them, never
# rendered), each a few clauses long: the scene's summary, then where objects are and how they relate. Only
# grammar words are used, so the synthetic tokenizer covers it. Layout: data_root/synthetic_text/corpus.txt and
# text.json (its parameters, written last).
SYNTHETIC_TEXT_CLAUSES = (1, 3)  # clauses after the summary, drawn uniformly from this closed range


# -----------------------------------------------------------------------------
# 3. Text corpus: the world's grammar as plain text


def definite(phrase):
    """'a red circle' -> 'the red circle'."""
    return "the " + phrase.removeprefix("a ")


def describe_scene_text(objects, image_size, rng):
    """One line of synthetic text about a scene: 'there are two red circles and a blue square, a large red
    circle is at the top left, there are two red objects and the red circle is larger than a blue square'
    (2 to 4 clauses: where objects are, how many of a colour there are, how they relate)."""
    verb = "is" if len(objects) == 1 else "are"
    clauses = []
    for obj in objects:
        clauses.append(f"{noun_phrase(obj, bool(rng.integers(2)))} is {position_phrase(obj, image_size)}")
    for colour in dict.fromkeys(obj["colour"] for obj in objects):
        clauses.append(statement_text({"type": "count", "colour": colour, "shape": None,
                                       "count": sum(obj["colour"] == colour for obj in objects)}))
    for a, b in itertools.permutations(objects, 2):
        if (a["colour"], a["shape"]) != (b["colour"], b["shape"]):  # 'the red circle is left of a red circle' is no help
            clauses += [f"{definite(noun_phrase(a))} is {relation} {noun_phrase(b)}"
                        for relation in relations(a, b)]
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
    write_json(root / "text.json", _text_params(num_lines, seed, image_size))  # last: marks it complete


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
    found = load_json(marker)
    if found != wanted:
        raise ValueError(f"{marker}: text generated with {found}, config asks for {wanted} (synthetic_text_lines, "
                         f"synthetic_seed, synthetic_image_size); delete {root} or match them")
    return root / "corpus.txt"


