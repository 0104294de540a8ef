"""GLUE (text only): the TSV reader of all nine tasks, the regression head for STS-B, the task, its
synthetic version and glue_metrics, the official metric(s) of each task.
"""

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch.nn.functional as F
from torch.utils.data import Dataset

import world
from data import StringArray
from model import TaskModel
from tasks.base import Task
from tasks.common import ClassifierModel, _label, in_float32
from tasks.metrics import accuracy, f1_binary, matthews_corrcoef, pearson, spearman
from tasks.snli_ve import SNLIVEDataset
from tasks.synthetic import _kind, _neutral_statement, _pick, _statement, _world_scenes, _write_lines
from world import COLOURS, SHAPES

# -----------------------------------------------------------------------------
# GLUE (text only)


@dataclass(frozen=True)
class GlueFormat:
    folder: str
    text: str  # column names, as in the files' header
    text_pair: Optional[str]
    label: str
    labels: Optional[dict]  # label string -> class; None = a float score (STS-B, 0 to 5)
    columns: Optional[tuple] = None  # names for train/dev files without a header row (CoLA)
    skip_malformed: bool = False  # QQP: rows with the wrong number of fields are skipped and counted


_BINARY = {"0": 0, "1": 1}
_NLI = {"entailment": 0, "not_entailment": 1}
GLUE_FORMATS = {
    "cola": GlueFormat("CoLA", "sentence", None, "label", _BINARY, columns=("source", "label", "mark", "sentence")),
    "sst2": GlueFormat("SST-2", "sentence", None, "label", _BINARY),
    "mrpc": GlueFormat("MRPC", "#1 String", "#2 String", "Quality", _BINARY),
    "stsb": GlueFormat("STS-B", "sentence1", "sentence2", "score", None),  # columns 7, 8, score last
    "qqp": GlueFormat("QQP", "question1", "question2", "is_duplicate", _BINARY, skip_malformed=True),
    "mnli": GlueFormat("MNLI", "sentence1", "sentence2", "gold_label",  # columns 8, 9, gold_label last
                       {"entailment": 0, "neutral": 1, "contradiction": 2}),
    "qnli": GlueFormat("QNLI", "question", "sentence", "label", _NLI),
    "rte": GlueFormat("RTE", "sentence1", "sentence2", "label", _NLI),
    "wnli": GlueFormat("WNLI", "sentence1", "sentence2", "label", _BINARY),
}


class GLUEDataset(Dataset):
    """`glue_data/<TASK>/<split>.tsv`, split = train, dev, test (MNLI: dev_matched, dev_mismatched,
    test_matched, test_mismatched). Tab-separated with no quoting (sentences contain quote characters).
    Item: {"text", "text_pair" (None for single-sentence tasks), "label"}: a class, a float for STS-B,
    -1 in test files (no labels). QQP's malformed rows are skipped; `malformed_lines` lists their line numbers
    (common.malformed_rows reports them)."""

    def __init__(self, glue_dir, task: str, split: str):
        if task not in GLUE_FORMATS:
            raise ValueError(f"unknown GLUE task '{task}' (tasks: {', '.join(GLUE_FORMATS)})")
        fmt = GLUE_FORMATS[task]
        self.task, self.path = task, Path(glue_dir) / fmt.folder / f"{split}.tsv"
        is_test = split.startswith("test")
        texts, pairs, labels = [], [], []
        self.malformed_lines = []
        try:
            f = open(self.path, encoding="utf-8-sig", newline="")  # utf-8-sig: MRPC's files open with a BOM
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: file not found") from None
        with f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = fmt.columns if fmt.columns and not is_test else next(rows, None)
            if header is None:
                raise ValueError(f"{self.path}: empty file")
            wanted = [fmt.text] + ([fmt.text_pair] if fmt.text_pair else []) + ([] if is_test else [fmt.label])
            for name in wanted:
                if name not in header:
                    raise ValueError(f"{self.path}:1: no column '{name}' in the header {list(header)}")
            column = {name: header.index(name) for name in wanted}
            for row in rows:
                where = f"{self.path}:{rows.line_num}"
                if len(row) != len(header):
                    if fmt.skip_malformed:
                        self.malformed_lines.append(rows.line_num)
                        continue
                    raise ValueError(f"{where}: {len(row)} fields, expected {len(header)} ({', '.join(header)})")
                texts.append(row[column[fmt.text]])
                pairs.append(row[column[fmt.text_pair]] if fmt.text_pair else "")
                labels.append(-1 if is_test else self._parse_label(row[column[fmt.label]], fmt, where))
        self.texts = StringArray(texts)
        self.text_pairs = StringArray(pairs) if fmt.text_pair else None
        self.labels = np.array(labels, dtype=np.float32 if fmt.labels is None else np.int64)  # (N,)

    @staticmethod
    def _parse_label(value: str, fmt: GlueFormat, where: str):
        if fmt.labels is not None:
            return _label(value, fmt.labels, where, fmt.label)
        try:
            score = float(value)
        except ValueError:
            score = float("nan")
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"{where}: {fmt.label} {value!r} is not a number from 0 to 5")
        return score

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"text": self.texts[i], "text_pair": self.text_pairs[i] if self.text_pairs is not None else None,
                "label": self.labels[i].item()}




class RegressionModel(TaskModel):
    """Encoder + one output trained with mean squared error (STS-B's similarity from 0 to 5). The head runs in
    float32 outside autocast: bfloat16 would round its outputs to 2-3 significant digits."""

    def logits(self, batch):  # -> (B, 1) float32
        out = self.encoder(batch.get("input_ids"), batch.get("attention_mask"), batch.get("pixel_values"))
        return in_float32(self.head, out.pooled)

    def forward(self, batch):
        return {"loss": F.mse_loss(self.logits(batch).float().squeeze(-1), batch["labels"].float())}

    def predict(self, batch):  # -> (B,) score
        return self.logits(batch).squeeze(-1)


GLUE_METRICS = {"cola": ("cola_mcc",), "sst2": ("sst2_acc",), "mrpc": ("mrpc_f1", "mrpc_acc"),
                "stsb": ("stsb_pearson", "stsb_spearman"), "qqp": ("qqp_f1", "qqp_acc"),
                "mnli": ("mnli_m_acc", "mnli_mm_acc"), "qnli": ("qnli_acc",), "rte": ("rte_acc",),
                "wnli": ("wnli_acc",)}


class GLUETask(Task):
    """One GLUE task, text only, through the text side of either model type (task_dir: the glue_data folder)."""

    inputs = "text"

    def __init__(self, name):
        eval_splits = ("dev_matched", "dev_mismatched") if name == "mnli" else ("dev",)
        super().__init__(name, "glue_data", GLUE_METRICS[name], ("train",), eval_splits[0], eval_splits)
        self.format = GLUE_FORMATS[name]

    def synthetic_parts(self):
        return [("glue_data", generate_synthetic_glue)]

    def dataset(self, cfg, split, transform, label_names=None):
        return GLUEDataset(self.folder_of(cfg), self.name, split)

    def label_names(self, cfg):
        labels = self.format.labels
        return ["score"] if labels is None else sorted(labels, key=labels.get)

    def build_model(self, encoder, label_names):
        if self.format.labels is None:
            return RegressionModel(encoder, 1, unimodal=True)
        return ClassifierModel(encoder, len(label_names), unimodal=True)

    def score(self, preds, dataset, split):
        if split.startswith("test"):  # GLUE's test files carry no labels
            return {}
        preds = preds if self.format.labels is None else preds.astype(np.int64)
        return glue_metrics(self.name, preds, dataset.labels[:len(preds)], split)

    def write_predictions(self, preds, dataset, label_names, path_stem):
        """`index<TAB>prediction` rows under a header, the GLUE server's format."""
        path = path_stem.with_suffix(".tsv")
        rows = [f"{i}\t{p:.3f}" if self.format.labels is None else f"{i}\t{label_names[int(p)]}"
                for i, p in enumerate(preds)]
        _write_lines(path, ["index\tprediction"] + rows)
        return path


GLUE_SYNTHETIC_SIZES = {"train": 400, "dev": 100, "test": 50}


def generate_synthetic_glue(out: Path, world_root: Path, rng) -> None:
    """All nine GLUE tasks as TSV files in their real layouts (CoLA's train and dev without a header, MNLI's
    matched and mismatched dev and test files, a malformed row in QQP's train), over sentences about random
    scenes of the world's kind: acceptable vs. shuffled word order (CoLA), one object vs. several (SST-2),
    the same objects in another order vs. another scene (MRPC), the same question reworded (QQP), overlap of
    the objects described (STS-B, 0-5), entailment / neutral / contradiction (MNLI, RTE, WNLI), a sentence
    that answers the question or not (QNLI). Each example is a row keyed by the real files' column names."""
    _, image_size = _world_scenes(world_root)

    def scene(at_least=1):
        while len(objects := world.sample_scene(rng, image_size)) < at_least:
            pass
        return objects

    def listing(objects, reverse=False):  # 'two red circles and a blue star', in either order
        phrases = [world.count_phrase(n, c, s) for (c, s), n in Counter(_kind(o) for o in objects).items()]
        phrases = phrases[::-1] if reverse else phrases
        return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]

    def placed(objects):  # mismatched MNLI premises: another register, every object with its size and place
        return ", ".join(f"{world.noun_phrase(o, True)} {world.position_phrase(o, image_size)}" for o in objects)

    def nli(premise_of=listing):
        objects, label = scene(), _pick(rng, list(SNLIVEDataset.LABELS))
        hypothesis = _neutral_statement(objects, rng) if label == "neutral" else \
            _statement(objects, image_size, rng, true=label == "entailment")
        return {"sentence1": premise_of(objects), "sentence2": hypothesis, "label": label}

    def cola():
        words = _pick(rng, world.describe_scene(scene(), image_size, rng)).split()
        shuffled = [words[i] for i in rng.permutation(len(words))]
        bad = rng.random() < 0.5 and shuffled != words
        return {"source": "syn", "label": int(not bad), "mark": "*" if bad else "",
                "sentence": " ".join(shuffled if bad else words)}

    def sst2():
        several = rng.random() < 0.5
        while (len(objects := scene()) > 1) != several:
            pass
        return {"sentence": listing(objects), "label": int(several)}

    def mrpc():
        objects = scene()
        if rng.random() < 0.5:
            kinds = len({_kind(o) for o in objects})
            reworded = listing(objects, reverse=True) if kinds > 1 else \
                f"there {'is' if len(objects) == 1 else 'are'} {listing(objects)}"
            return {"#1 String": listing(objects), "#2 String": reworded, "Quality": 1}
        while listing(other := scene()) == listing(objects):
            pass
        return {"#1 String": listing(objects), "#2 String": listing(other), "Quality": 0}

    def qqp():
        colour, shape = _kind(_pick(rng, scene()))
        duplicate = rng.random() < 0.5
        first = f"is there a {colour} {shape} ?"
        if not duplicate:
            colour, shape = _pick(rng, [(c, s) for c in COLOURS for s in SHAPES if (c, s) != (colour, shape)])
        return {"question1": first, "question2": f"is there a {colour} {shape} in the image ?",
                "is_duplicate": int(duplicate)}

    def stsb():
        first = scene()
        second = [o for o in first if rng.random() < 0.5] + scene()[:int(rng.integers(0, 3))] or scene()
        a, b = {_kind(o) for o in first}, {_kind(o) for o in second}
        return {"sentence1": listing(first), "sentence2": listing(second),
                "score": f"{5 * len(a & b) / len(a | b):.3f}"}

    def qnli():
        obj = _pick(rng, scene())
        others = [o for o in scene() if o["shape"] != obj["shape"]]
        answers = rng.random() < 0.5 or not others
        sentence = f"{world.noun_phrase(obj)} {world.position_phrase(obj, image_size)}" if answers else \
            world.noun_phrase(_pick(rng, others))
        return {"question": f"what colour is the {obj['shape']} ?", "sentence": sentence,
                "label": "entailment" if answers else "not_entailment"}

    def mnli(premise_of):
        row = nli(premise_of)
        row.update({f"label{k}": row["label"] for k in range(1, 6)}, gold_label=row.pop("label"),
                   promptID=0, pairID=0, genre="placements" if premise_of is placed else "scenes")
        row.update({f"sentence{k}_binary_parse": f"( {row[f'sentence{k}']} )" for k in (1, 2)})
        row.update({f"sentence{k}_parse": f"(ROOT {row[f'sentence{k}']})" for k in (1, 2)})
        return row

    def write(folder, name, columns, make, n, header=True):
        rows = [{"index": i, "id": i, "#1 ID": 2 * i, "#2 ID": 2 * i + 1, "qid1": 2 * i, "qid2": 2 * i + 1,
                 "genre": "synthetic", "filename": "scenes", "year": "2024", "old_index": i, "source1": "none",
                 "source2": "none", **make()} for i in range(n)]
        lines = ["\t".join(columns)] if header else []
        lines += ["\t".join(str(row[c]) for c in columns) for row in rows]
        if folder == "QQP" and name == "train":
            lines.append("\t".join(map(str, [n, 2 * n, 2 * n + 1, "a row cut short"])))
        _write_lines(out / folder / f"{name}.tsv", lines)

    mnli_columns = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    stsb_columns = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    for split, n in GLUE_SYNTHETIC_SIZES.items():
        test = split == "test"
        write("CoLA", split, ["index", "sentence"] if test else ["source", "label", "mark", "sentence"], cola, n,
              header=test)
        write("SST-2", split, ["index", "sentence"] if test else ["sentence", "label"], sst2, n)
        write("MRPC", split, ["index" if test else "Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], mrpc, n)
        write("QQP", split, ["id", "question1", "question2"] if test else
              ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], qqp, n)
        write("STS-B", split, stsb_columns + ([] if test else ["score"]), stsb, n)
        write("QNLI", split, ["index", "question", "sentence"] + ([] if test else ["label"]), qnli, n)
        for folder, entailed, not_entailed in (("RTE", "entailment", "not_entailment"), ("WNLI", 1, 0)):
            write(folder, split, ["index", "sentence1", "sentence2"] + ([] if test else ["label"]),
                  lambda: {**(row := nli()), "label": entailed if row["label"] == "entailment" else not_entailed}, n)
        if split == "train":
            write("MNLI", "train", mnli_columns + ["label1", "gold_label"], lambda: mnli(listing), n)
            continue
        labels = [] if test else [f"label{k}" for k in range(1, 6)] + ["gold_label"]
        write("MNLI", f"{split}_matched", mnli_columns + labels, lambda: mnli(listing), n)
        write("MNLI", f"{split}_mismatched", mnli_columns + labels, lambda: mnli(placed), n)


def glue_metrics(task: str, preds, labels, split: str = "dev") -> dict:
    """GLUE's metric(s) for one evaluated split, named as logged: cola_mcc; stsb_pearson, stsb_spearman;
    mrpc_f1, mrpc_acc; qqp_f1, qqp_acc; mnli_m_acc (split dev_matched) or mnli_mm_acc (dev_mismatched);
    <task>_acc for sst2, qnli, rte, wnli. preds are classes (STS-B: scores)."""
    if task == "cola":
        return {"cola_mcc": matthews_corrcoef(preds, labels)}
    if task == "stsb":
        return {"stsb_pearson": pearson(preds, labels), "stsb_spearman": spearman(preds, labels)}
    if task in ("mrpc", "qqp"):
        return {f"{task}_f1": f1_binary(preds, labels), f"{task}_acc": accuracy(preds, labels)}
    if task == "mnli":
        names = {"dev_matched": "mnli_m_acc", "dev_mismatched": "mnli_mm_acc"}
        if split not in names:
            raise ValueError(f"glue_metrics: mnli split must be dev_matched or dev_mismatched, got '{split}'")
        return {names[split]: accuracy(preds, labels)}
    if task in ("sst2", "qnli", "rte", "wnli"):
        return {f"{task}_acc": accuracy(preds, labels)}
    raise ValueError(f"glue_metrics: unknown GLUE task '{task}' (tasks: {', '.join(GLUE_FORMATS)})")
