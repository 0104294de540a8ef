"""VQAv2: the official answer normalisation and accuracy, the question / annotation reader, the answer
vocabulary, the model, the results file for the evaluation server, and the synthetic version.
"""

import copy
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset

from data import StringArray
from model import TaskModel
from tasks.base import Task
from tasks.common import Transform, _field, _int_field, _read_json, load_image
from tasks.synthetic import _kind, _pick, _where, _world_scenes
from world import COLOURS, SHAPES

# -----------------------------------------------------------------------------
# VQAv2: image + question -> answer, scored against ten human answers

# The official evaluation (VQA PythonEvaluationTools vqaEval.py, VQA v2), rewritten from its code's flow, quirks
# included: a score differing from the evaluation server's would not be comparable with published numbers.
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!")  # not "'" (contractions) and not "." (handled apart: keeps "2.5")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern's look-behind is mistyped as a look-ahead that always holds, so every period not followed
# by a digit goes; and it passes re.UNICODE (32) where sub() takes its count, so at most the first 32 go.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_PERIODS_REMOVED_AT_MOST = 32
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The official map sends each form below with one of its apostrophes left out ("dont", "couldnt've",
# "couldn'tve") back to the full form. Its oddities are kept, since they decide matches: keys with a capital
# ("Im", "I'dve") that can never match a lowercased word, identity entries for "let's" and "she's" (so "lets"
# and "shes" stay as written), and "somebody'd" mapped to "somebodyd" (a full form to a contracted one).
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()
_CONTRACTIONS = {full[:i] + full[i + 1:]: full for full in _CONTRACTED for i, c in enumerate(full) if c == "'"}
_CONTRACTIONS.update({"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"})


def _vqa_strip(text: str) -> str:
    """Newlines and tabs become spaces, then the ends are trimmed: all that ten agreeing answers get."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _vqa_punctuation(text: str) -> str:
    """A mark with a space on either side of it anywhere in the text, or any mark in a text holding a
    digit-comma-digit ("1,000"), is deleted; otherwise the mark becomes a space ("black/white" -> "black white").
    The tests look at the text as given, not as already changed. Then periods not before a digit go."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        out = out.replace(mark, "" if delete_all or mark + " " in text or " " + mark in text else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIODS_REMOVED_AT_MOST)


def _vqa_digits_articles(text: str) -> str:
    """Lowercase, number words to digits ("two" -> "2", "none" -> "0"), articles dropped, contractions
    restored ("dont" -> "don't"), whitespace collapsed."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official normalisation in full (strip, punctuation, digits and articles): "Two dogs!" -> "2 dogs",
    "the 1,000" -> "1000". The official evaluation applies it to both sides only when the ten human answers
    differ (see vqa_accuracy); training applies it to every answer, to build the vocabulary and the targets."""
    return _vqa_digits_articles(_vqa_punctuation(_vqa_strip(answer)))


def vqa_accuracy(pred: str, human_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one answer: the mean, over the human answers, of min(1, matches / 3), where
    matches counts the OTHER human answers equal to the prediction. Both sides are stripped; when the human
    answers are not all identical both sides are then fully normalised (normalize_answer), but when they all
    agree both are compared as stripped, so "two" scores 0 against ten "2" and "Yes" 0 against ten "yes"."""
    if len(human_answers) == 0:
        raise ValueError("vqa_accuracy: no human answers")
    humans, pred = [_vqa_strip(a) for a in human_answers], _vqa_strip(pred)
    if len(set(humans)) > 1:
        humans, pred = [_vqa_digits_articles(_vqa_punctuation(a)) for a in humans], normalize_answer(pred)
    matches = sum(h == pred for h in humans)
    return sum(min(1.0, (matches - (h == pred)) / 3) for h in humans) / len(humans)


def vqa_score(preds: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """The evaluation server's overall accuracy, as a fraction like every other metric: the mean vqa_accuracy
    over questions as a percentage rounded to two decimals (round(100 * mean, 2)), divided by 100."""
    if len(preds) != len(human_answers) or len(preds) == 0:
        raise ValueError(f"vqa_score: {len(preds)} predictions for {len(human_answers)} questions")
    accuracies = [vqa_accuracy(p, h) for p, h in zip(preds, human_answers)]
    return round(100 * sum(accuracies) / len(accuracies), 2) / 100


def vqa_soft_score(count: int) -> float:
    """Training target of an answer given by `count` of the ten annotators: 0, .3, .6, .9, then 1."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def read_vqa_annotations(path) -> list:
    """The `annotations` list of `v2_mscoco_{split}_annotations.json`, each checked for ten answers."""
    path = Path(path)
    annotations = _field(_read_json(path), "annotations", str(path))
    for k, ann in enumerate(annotations):
        where = f"{path}: annotations[{k}]"
        _int_field(ann, "question_id", where), _int_field(ann, "image_id", where)
        _field(ann, "multiple_choice_answer", where)
        answers = _field(ann, "answers", where)
        if len(answers) != 10:
            raise ValueError(f"{where}: {len(answers)} answers, expected 10")
        for a, answer in enumerate(answers):
            _field(answer, "answer", f"{where} answers[{a}]")
    return annotations


def build_answer_vocab(annotations: Iterable[dict], min_count: int = 9) -> list:
    """Answer classes: normalised `multiple_choice_answer`s that are the answer of at least `min_count`
    questions (3,129 on train + val with 9), most frequent first, ties alphabetical."""
    counts = Counter(normalize_answer(ann["multiple_choice_answer"]) for ann in annotations)
    return sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))


def heldout_split_by_image(image_ids, heldout_fraction: float, seed: int = 0):
    """Split rows into (train_rows, heldout_rows) so that no image is in both: the unique image ids are
    shuffled with `seed` and the first `heldout_fraction` of them are held out. For validating when only
    a training split is available, so training never validates on its own questions."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    image_ids = np.asarray(image_ids, dtype=np.int64)  # (N,)
    unique_ids = np.unique(image_ids)  # sorted, so the split does not depend on row order
    shuffled = np.random.default_rng(seed).permutation(unique_ids)
    n_heldout = max(1, round(heldout_fraction * len(unique_ids)))
    is_heldout = np.isin(image_ids, shuffled[:n_heldout])  # (N,)
    return np.flatnonzero(~is_heldout), np.flatnonzero(is_heldout)


class VQADataset(Dataset):
    """`v2_OpenEnded_mscoco_{split}_questions.json` and, except for the unannotated test splits,
    `v2_mscoco_{split}_annotations.json` in `vqa_dir`; split is train2014, val2014, test-dev2015 or test2015. Images:
    `coco_dir/<folder>/COCO_<folder>_<image_id:012d>.jpg`, folder = the split, test2015 for both test splits.
    Item: {"image", "text", "question_id"} plus, with annotations and an answer vocabulary, "target"
    (len(answer_vocab),) of soft scores (vqa_soft_score of the normalised human answers).
    `human_answers(i)` gives the ten raw answers that vqa_accuracy scores against; `select(indices)` a view
    on some questions (see heldout_split_by_image)."""

    def __init__(self, vqa_dir, split: str, coco_dir, transform: Transform,
                 answer_vocab: Optional[Sequence[str]] = None):
        vqa_dir = Path(vqa_dir)
        self.transform = transform
        self.questions_path = vqa_dir / f"v2_OpenEnded_mscoco_{split}_questions.json"
        folder = "test2015" if split.startswith("test") else split
        self.image_pattern = str(Path(coco_dir) / folder / f"COCO_{folder}_{{:012d}}.jpg")
        question_ids, image_ids, questions = [], [], []
        for k, question in enumerate(_field(_read_json(self.questions_path), "questions", str(self.questions_path))):
            where = f"{self.questions_path}: questions[{k}]"
            question_ids.append(_int_field(question, "question_id", where))
            image_ids.append(_int_field(question, "image_id", where))
            questions.append(str(_field(question, "question", where)))
        # Storage is indexed by question row r; item i of this dataset (or of a select() view) is row rows[i].
        self.rows = np.arange(len(question_ids))  # (N,)
        self.question_ids = np.array(question_ids, dtype=np.int64)  # (N,) per item
        self.image_ids = np.array(image_ids, dtype=np.int64)  # (N,) per item
        self.questions = StringArray(questions)
        self.answers = None  # StringArray of 10 raw human answers per row, row r at [10 r, 10 r + 10)
        self.answer_vocab = list(answer_vocab) if answer_vocab is not None else None
        self.targets = None  # (labels, scores, offsets): row r's soft target entries at [off[r], off[r + 1])

        annotations_path = vqa_dir / f"v2_mscoco_{split}_annotations.json"
        if split.startswith("test"):
            return
        by_question = {int(ann["question_id"]): ann for ann in read_vqa_annotations(annotations_path)}
        answers = []
        for k, question_id in enumerate(question_ids):
            if question_id not in by_question:
                raise ValueError(f"{annotations_path}: no annotation for question_id {question_id} "
                                 f"(questions[{k}] of {self.questions_path})")
            answers.extend(str(a["answer"]) for a in by_question[question_id]["answers"])
        self.answers = StringArray(answers)
        if self.answer_vocab is not None:
            self.targets = self._soft_targets(answers)

    def _soft_targets(self, answers: list):
        label_of = {answer: c for c, answer in enumerate(self.answer_vocab)}
        normalized = {}  # raw answers repeat a lot: normalise each distinct one once
        labels, scores, offsets = [], [], [0]
        for r in range(len(self.question_ids)):
            counts = Counter(normalized.setdefault(a, normalize_answer(a)) for a in answers[10 * r:10 * r + 10])
            for answer, count in sorted(counts.items()):
                if answer in label_of:
                    labels.append(label_of[answer])
                    scores.append(vqa_soft_score(count))
            offsets.append(len(labels))
        return (np.array(labels, dtype=np.int64), np.array(scores, dtype=np.float32),
                np.array(offsets, dtype=np.int64))

    def __len__(self):
        return len(self.rows)

    def human_answers(self, i: int) -> list:
        if self.answers is None:
            raise ValueError(f"{self.questions_path}: this split has no annotations")
        r = self.rows[i]
        return [self.answers[10 * r + k] for k in range(10)]

    def select(self, indices) -> "VQADataset":
        """A view on items `indices` of this dataset, sharing its storage."""
        indices = np.asarray(indices, dtype=np.int64)
        view = copy.copy(self)
        view.rows = self.rows[indices]
        view.question_ids, view.image_ids = self.question_ids[indices], self.image_ids[indices]
        return view

    def image_files(self):
        """(path, the question naming it) per item: see common.check_images_exist."""
        for question_id, image_id in zip(self.question_ids.tolist(), self.image_ids.tolist()):
            yield self.image_pattern.format(image_id), f"{self.questions_path}: question_id {question_id}"

    def __getitem__(self, i):
        r, question_id, image_id = self.rows[i], int(self.question_ids[i]), int(self.image_ids[i])
        named_by = f"{self.questions_path}: question_id {question_id}"
        image = load_image(Path(self.image_pattern.format(image_id)), named_by)
        item = {"image": self.transform(image), "text": self.questions[r], "question_id": question_id}
        if self.targets is not None:
            labels, scores, offsets = self.targets
            target = torch.zeros(len(self.answer_vocab))  # (num_answers,)
            span = slice(offsets[r], offsets[r + 1])
            target[torch.from_numpy(labels[span])] = torch.from_numpy(scores[span])
            item["target"] = target
        return item


def write_vqa_results(path, question_ids: Sequence[int], answers: Sequence[str]) -> None:
    """The evaluation server's results file: [{"question_id": int, "answer": str}, ...]."""
    if len(question_ids) != len(answers):
        raise ValueError(f"{path}: {len(question_ids)} question ids for {len(answers)} answers")
    results = [{"question_id": int(q), "answer": str(a)} for q, a in zip(question_ids, answers)]
    Path(path).write_text(json.dumps(results))


class VQAModel(TaskModel):
    """Encoder + classifier over the answer vocabulary, trained with binary cross-entropy on the soft scores."""

    def forward(self, batch):
        logits = self.logits(batch).float()  # (B, A)
        targets = batch["targets"]  # (B, A)
        # mean over answers times their number (ViLT's scaling): the gradient does not shrink as the vocabulary grows
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        return {"loss": loss, "score": targets.gather(1, logits.argmax(-1, keepdim=True)).mean()}

    def predict(self, batch):  # -> (B,) answer class
        return self.logits(batch).argmax(-1)


class VQATask(Task):
    """VQAv2. The answer vocabulary comes from the annotations of vqa_answer_splits (the paper config: train2014 and
    val2014, as the original), or else of the training splits (see label_names). Validation never scores
    training questions: with the default splits it is val2014; when val_split is also a training split (as when
    training on train2014 + val2014 for a test-dev submission), vqa_heldout_fraction of its images, drawn with
    the run's seed, are kept out of training, and that held-out part is what validation and evaluate.py score."""

    def __init__(self):
        super().__init__("vqa", "vqa", ("vqa_score",), ("train2014",), "val2014", ("val2014",))

    def synthetic_parts(self):
        return [("vqa", generate_synthetic_vqa)]

    def validation_split(self, cfg):
        return cfg.val_split or self.val_split

    def _heldout_images(self, cfg, image_ids) -> set:
        _, heldout = heldout_split_by_image(image_ids, cfg.vqa_heldout_fraction, seed=cfg.seed)
        return set(np.asarray(image_ids)[heldout].tolist())

    def _read(self, cfg, split, transform, label_names):
        return VQADataset(self.folder_of(cfg), split, self.folder_of(cfg, "coco_dir", "coco"), transform,
                          answer_vocab=label_names)

    def _heldout(self, cfg, dataset) -> np.ndarray:
        """(N,) bool: the questions on the held-out images of the validation split."""
        return np.isin(dataset.image_ids, list(self._heldout_images(cfg, dataset.image_ids)))

    def train_dataset(self, cfg, transform, label_names=None):
        parts = []
        for split in self.training_splits(cfg):
            dataset = self._read(cfg, split, transform, label_names)
            if split == self.validation_split(cfg):
                dataset = dataset.select(np.flatnonzero(~self._heldout(cfg, dataset)))
            parts.append(dataset)
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def eval_dataset(self, cfg, split, transform, label_names=None):
        dataset = self._read(cfg, split, transform, label_names)
        if split not in self.training_splits(cfg):
            return dataset
        if split != self.validation_split(cfg):
            raise ValueError(f"VQA split {split!r} is a training split: scoring it would score training questions")
        return dataset.select(np.flatnonzero(self._heldout(cfg, dataset)))

    def label_names(self, cfg):
        """The answer vocabulary: normalised multiple_choice_answers of at least vqa_min_answer_count questions of
        vqa_answer_splits, whole (the original's rule with train2014,val2014 and 9: 3,129 answers), or, when that
        is empty, of the training splits without the images held out for validation."""
        annotations = []
        for split in cfg.vqa_answer_splits or self.training_splits(cfg):
            anns = read_vqa_annotations(self.folder_of(cfg) / f"v2_mscoco_{split}_annotations.json")
            if not cfg.vqa_answer_splits and split == self.validation_split(cfg):
                heldout = self._heldout_images(cfg, [ann["image_id"] for ann in anns])
                anns = [ann for ann in anns if ann["image_id"] not in heldout]
            annotations += anns
        vocab = build_answer_vocab(annotations, cfg.vqa_min_answer_count)
        if not vocab:
            splits = cfg.vqa_answer_splits or self.training_splits(cfg)
            raise ValueError(f"VQA: no answer is given to {cfg.vqa_min_answer_count} questions (vqa_min_answer_count) "
                             f"of {splits}: the answer vocabulary would be empty")
        return vocab

    def build_model(self, encoder, label_names):
        return VQAModel(encoder, len(label_names))

    def score(self, preds, dataset, split):
        if dataset.answers is None:  # test-dev / test: answers only on the evaluation server
            return {}
        answers = [dataset.answer_vocab[int(p)] for p in preds]
        return {"vqa_score": vqa_score(answers, [dataset.human_answers(i) for i in range(len(preds))])}

    def write_predictions(self, preds, dataset, label_names, path_stem):
        path = path_stem.with_suffix(".json")
        write_vqa_results(path, dataset.question_ids[:len(preds)], [label_names[int(p)] for p in preds])
        return path


POSITIONS = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")
_DIGIT_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}


def _vqa_questions(objects, image_size, rng) -> list:
    """Questions about a scene: (question, answer, question_type, answer_type, other plausible answers)."""
    found = []
    colours_of, shapes_of = {}, {}
    for obj in objects:
        colours_of.setdefault(obj["shape"], set()).add(obj["colour"])
        shapes_of.setdefault(obj["colour"], set()).add(obj["shape"])
    one_colour = [s for s, colours in colours_of.items() if len(colours) == 1]
    if one_colour:
        shape = _pick(rng, one_colour)
        colour = next(iter(colours_of[shape]))
        found.append((f"what colour is the {shape} ?", colour, "what color is the", "other",
                      [c for c in COLOURS if c != colour]))
    one_shape = [c for c, shapes in shapes_of.items() if len(shapes) == 1]
    if one_shape:
        colour = _pick(rng, one_shape)
        shape = next(iter(shapes_of[colour]))
        found.append((f"what shape is the {colour} object ?", shape, "what shape is the", "other",
                      [s for s in SHAPES if s != shape]))
    shape = _pick(rng, [o["shape"] for o in objects]) if rng.random() < 0.7 else _pick(rng, list(SHAPES))
    count = sum(o["shape"] == shape for o in objects)
    found.append((f"how many {SHAPES[shape]} are there ?", str(count), "how many", "number",
                  [str(n) for n in (count - 1, count + 1) if n >= 0]))
    kinds = Counter(_kind(o) for o in objects)
    if rng.random() < 0.5:
        colour, shape = _pick(rng, list(kinds))
    else:
        colour, shape = _pick(rng, [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in kinds])
    present = "yes" if (colour, shape) in kinds else "no"
    found.append((f"is there a {colour} {shape} ?", present, "is there a", "yes/no",
                  ["no" if present == "yes" else "yes"]))
    alone = [o for o in objects if kinds[_kind(o)] == 1]
    if alone:
        obj = _pick(rng, alone)
        where = _where(obj, image_size)
        found.append((f"where is the {obj['colour']} {obj['shape']} ?", where, "where is the", "other",
                      [p for p in POSITIONS if p != where]))
    return found


def _human_answers(answer, alternatives, rng) -> list:
    """Ten annotators: most give the answer, some write it another way ("two" for "2", "Red", "red."), which
    the official normalisation reconciles, and a few disagree."""
    def written_differently(a):
        if a in _DIGIT_WORDS:
            return _DIGIT_WORDS[a]
        return a.capitalize() if rng.random() < 0.5 else a + "."
    answers = []
    for _ in range(10):
        draw = rng.random()
        if draw < 0.1:
            answers.append(_pick(rng, alternatives))
        else:
            answers.append(written_differently(answer) if draw < 0.3 else answer)
    return answers


def generate_synthetic_vqa(out: Path, world_root: Path, rng) -> None:
    """VQAv2 on the world's pictures: questions about colour, shape, count, presence and position, each with
    ten human answers. train2014 holds the world's train scenes and val2014 the others, whose pictures the
    world already files as COCO_train2014_* / COCO_val2014_*; question ids are image id * 100 + k."""
    scenes, image_size = _world_scenes(world_root)
    for split, world_splits in (("train2014", ("train",)), ("val2014", ("restval", "val", "test"))):
        questions, annotations = [], []
        for scene in scenes:
            if scene["split"] not in world_splits:
                continue
            for k, (question, answer, question_type, answer_type, others) in enumerate(
                    _vqa_questions(scene["objects"], image_size, rng)):
                question_id = scene["image_id"] * 100 + k
                questions.append({"image_id": scene["image_id"], "question": question, "question_id": question_id})
                answers = [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                           for j, a in enumerate(_human_answers(answer, others, rng))]
                annotations.append({"question_id": question_id, "image_id": scene["image_id"],
                                    "question_type": question_type, "answer_type": answer_type,
                                    "multiple_choice_answer": answer, "answers": answers})
        info = {"description": "synthetic VQA", "version": "2.0"}
        (out / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(
            {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
             "questions": questions, "license": {}}))
        (out / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(
            {"info": info, "data_type": "mscoco", "data_subtype": split, "annotations": annotations, "license": {}}))
