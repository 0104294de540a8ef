"""Downstream tasks: the registry, every metric against hand-computed cases, batches and heads, and the synthetic
versions read back by the readers (the readers on the publishers' formats: test_task_readers.py)."""

import json
import math
import pickle
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine
import tasks
import world
from config import load_config
from data import synthetic_tokenizer
from encoders import build_encoder
from tasks.cifar10 import CIFAR10Dataset
from tasks.common import Collator
from tasks.glue import GLUE_FORMATS, GLUE_SYNTHETIC_SIZES, GLUEDataset, glue_metrics
from tasks.metrics import accuracy, average_ranks, f1_binary, matthews_corrcoef, pearson, spearman
from tasks.nlvr2 import NLVR2Dataset, nlvr2_consistency, nlvr2_sentence_key
from tasks.refcoco import BoxScoringHead, RefCOCODataset
from tasks.retrieval import (RetrievalModel, RetrievalSplit, load_retrieval_split, retrieval_recall, retrieval_scores,
                             sample_negative_images)
from tasks.scenes import SCENE_ATTRIBUTES, SCENE_COUNTS, SCENE_KINDS, SceneAttributesModel, decode_predictions
from tasks.snli_ve import SNLIVEDataset
from tasks.synthetic import SYNTHETIC_FLICKR_ID, SYNTHETIC_MARKER
from tasks.vqa import (VQADataset, build_answer_vocab, heldout_split_by_image, normalize_answer, read_vqa_annotations,
                       vqa_accuracy, vqa_score, vqa_soft_score)
from test_task_readers import cifar_batch, make_refcoco, pickle_py3, to_tensor, write_cifar, write_vqa
from tiny import tiny_config
from world import SHAPES
# -----------------------------------------------------------------------------
# Registry


def test_registry_names_match_what_the_metrics_return():
    for name, task in tasks.TASKS.items():
        assert task.name == name and task.metrics and task.eval_splits and task.train_splits
        assert task.val_split not in task.train_splits
        assert all(metric.startswith(name.removesuffix("_retrieval")) for metric in task.metrics)
    for name, fmt in GLUE_FORMATS.items():
        task = tasks.TASKS[name]
        preds, labels = ([0.5, 1.5, 2.5], [1.0, 2.0, 2.5]) if name == "stsb" else ([0, 1, 1], [1, 1, 0])
        logged = {}
        for split in task.eval_splits:
            logged.update(glue_metrics(name, preds, labels, split))
        assert tuple(logged) == task.metrics
        assert len(task.label_names(None)) == (1 if fmt.labels is None else len(fmt.labels))
    recalls = retrieval_recall(np.eye(2), [0, 1])
    assert set(tasks.TASKS["coco_retrieval"].metrics) == {f"coco_{k}" for k in recalls}
    assert set(tasks.TASKS["f30k_retrieval"].metrics) == {f"f30k_{k}" for k in recalls}
    with pytest.raises(ValueError, match="task='nlvr' is not a downstream task; choose from nlvr2, snli_ve"):
        tasks.get_task("nlvr")


# -----------------------------------------------------------------------------
# Metrics


def test_accuracy_and_shape_checks():
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    with pytest.raises(ValueError, match="accuracy"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="accuracy"):
        accuracy([], [])


def test_matthews_corrcoef_hand_computed():
    # tp=2, tn=1, fp=1, fn=1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6
    assert matthews_corrcoef([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(1 / 6)
    assert matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # constant predictor: undefined -> 0
    with pytest.raises(ValueError, match="0 or 1"):
        matthews_corrcoef([2, 0], [1, 0])


def test_f1_positive_class_is_one():
    # tp=2, fp=1, fn=1 -> 4 / 6; swapping the roles of 0 and 1 gives a different number (tp=1: 2/4)
    assert f1_binary([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)
    assert f1_binary([0, 0, 1, 1, 0], [0, 1, 1, 0, 0]) == pytest.approx(1 / 2)
    assert f1_binary([0, 0], [1, 1]) == 0.0


def test_pearson_hand_computed():
    # x - mean = (-1, 0, 1), y - mean = (-7/3, -1/3, 8/3): r = 5 / sqrt(2 * 114/9)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_spearman_uses_average_ranks_for_ties():
    np.testing.assert_allclose(average_ranks([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(average_ranks([3, 1, 3, 3, 0]), [4, 2, 4, 4, 1])
    # ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4): sum dx*dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 5, 10, 100], [0, 1, 2, 3]) == pytest.approx(1.0)  # monotone, not linear


def test_glue_metrics_dispatch():
    assert glue_metrics("cola", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == {"cola_mcc": pytest.approx(1 / 6)}
    mrpc = glue_metrics("mrpc", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert mrpc == {"mrpc_f1": pytest.approx(2 / 3), "mrpc_acc": pytest.approx(0.6)}
    assert set(glue_metrics("qqp", [1, 0], [1, 0])) == {"qqp_f1", "qqp_acc"}
    assert set(glue_metrics("stsb", [0.1, 2.0, 4.0], [1.0, 2.0, 3.0])) == {"stsb_pearson", "stsb_spearman"}
    assert glue_metrics("mnli", [0, 1], [0, 2], "dev_matched") == {"mnli_m_acc": 0.5}
    assert glue_metrics("mnli", [0, 1], [0, 1], "dev_mismatched") == {"mnli_mm_acc": 1.0}
    assert glue_metrics("rte", [0, 1], [0, 0]) == {"rte_acc": 0.5}
    with pytest.raises(ValueError, match="dev_matched"):
        glue_metrics("mnli", [0], [0])
    with pytest.raises(ValueError, match="unknown GLUE task 'ax'"):
        glue_metrics("ax", [0], [0])


# Expected values below are worked out by hand from the official vqaEval.py flow (strip; if the ten answers
# differ, processPunctuation then processDigitArticle on both sides; leave-one-out min(1, matches / 3)).
@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"), ("none", "0"), ("TEN", "10"), ("two dogs", "2 dogs"), ("eleven", "eleven"),  # number words
    ("the dog", "dog"), ("A Red Car.", "red car"), ("an apple", "apple"), ("theory", "theory"),  # articles
    ("the one", "1"),  # the number word is mapped before articles are dropped: "one" -> "1" survives
    ("dont", "don't"), ("isnt it", "isn't it"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("hes", "he's"), ("twas", "'twas"),  # contractions restored
    ("lets", "lets"), ("shes", "shes"),  # the table maps "let's" and "she's" to themselves, not "lets" / "shes"
    ("somebody'd", "somebodyd"), ("Im", "im"),  # the table's typo entry; its capital keys never match
    ("yes!", "yes"), ("black/white", "black white"),  # a mark with no space beside it becomes a space
    ("black / white", "black white"), ("x-ray -", "xray"),  # a mark with a space beside it goes everywhere
    ("x;-y z-w", "x y z w"),  # the test is on the text as given: "x -y" after ";" does not make "-" go
    ("1,000 black/white", "1000 blackwhite"),  # a digit-comma-digit anywhere deletes every mark
    ("t-shirt", "t shirt"), ("2.5", "2.5"), ("v.2", "v.2"), ("3.14.", "3.14"), ("a.m.", "am"),  # periods
    ("." * 34, ".."),  # at most 32 periods are removed (re.UNICODE passed as sub's count)
    ("  left\tside\n", "left side"), ("men's", "men's"),  # whitespace; the apostrophe is no mark
])
def test_normalize_answer_official_rules(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out():
    # m of ten differing answers match: the m matching answers each see m - 1 matches among the other nine, the
    # 10 - m others see m, so the mean is (m min(1, (m-1)/3) + (10-m) min(1, m/3)) / 10:
    # m=1: 9 (1/3) / 10 = 0.3; m=2: (2 (1/3) + 8 (2/3)) / 10 = 0.6; m=3: (3 (2/3) + 7) / 10 = 0.9; m=4: 1.0
    for matches, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)]:
        humans = ["cat"] * matches + ["dog"] * (10 - matches)
        assert vqa_accuracy("cat", humans) == pytest.approx(expected)
        assert vqa_soft_score(matches) == pytest.approx(expected)  # training targets follow the same curve


def test_vqa_accuracy_all_agreeing_answers_compare_as_stripped():
    # ten identical answers: only stripping, on both sides, then ==
    assert vqa_accuracy("two", ["2"] * 10) == 0.0  # "two" is not normalised to "2"
    assert vqa_accuracy("2", ["2"] * 10) == 1.0  # each answer sees 9 matches: min(1, 9/3) = 1
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # not lowercased
    assert vqa_accuracy("yes.", ["yes."] * 10) == 1.0  # the prediction is not normalised either
    assert vqa_accuracy("dog", ["the dog"] * 10) == 0.0  # no article dropped
    assert vqa_accuracy(" 2\n", ["2\n"] * 9 + ["\t2 "]) == 1.0  # stripped, the ten agree: "2" == "2"


def test_vqa_accuracy_differing_answers_normalise_both_sides():
    # "2", "two" -> "2", eight "3": the prediction "two" -> "2" matches 2 of ten: 0.6 (see the leave-one-out rule)
    assert vqa_accuracy("two", ["2", "two"] + ["3"] * 8) == pytest.approx(0.6)
    # "dog." and "Dog" -> "dog", five of each: all ten match "Dog" -> 1.0; "the dog" -> "dog" too
    assert vqa_accuracy("Dog", ["dog."] * 5 + ["Dog"] * 5) == 1.0
    assert vqa_accuracy("the dog", ["dog."] * 5 + ["Dog"] * 5) == 1.0
    # "black/white" -> "black white" (mark between letters: a space), "black / white" -> "black white" too;
    # against them, the prediction "blackwhite" matches none: 0
    humans = ["black/white"] * 2 + ["black / white"] + ["gray"] * 7
    assert vqa_accuracy("black and white", humans) == 0.0 and vqa_accuracy("blackwhite", humans) == 0.0
    assert vqa_accuracy("black white", humans) == pytest.approx(0.9)  # 3 of ten match
    # "dont" -> "don't" on the human side, "don't" stays: 4 of ten match -> 1.0
    assert vqa_accuracy("don't", ["dont"] * 3 + ["don't"] + ["no"] * 6) == 1.0
    # stray whitespace inside an answer is collapsed once normalised: "left  side" -> "left side"; 1 of 10: 0.3
    assert vqa_accuracy("left\tside", ["left  side"] + ["right"] * 9) == pytest.approx(0.3)


def test_vqa_score_is_the_servers_rounded_overall():
    # per question 1.0 (ten "2"), 0.3 (one "cat" of ten differing) and 0: mean 1.3 / 3 = 0.43333 -> 43.33% -> 0.4333
    humans = [["2"] * 10, ["cat"] + ["dog"] * 9, ["no"] * 10]
    assert vqa_score(["2", "cat", "yes"], humans) == 43.33 / 100
    # 2 / 3 -> 66.666..% -> 66.67
    assert vqa_score(["2", "2", "3"], [["2"] * 10] * 3) == 66.67 / 100


def test_build_answer_vocab_counts_normalised_answers():
    anns = [{"multiple_choice_answer": a} for a in ["Two"] * 3 + ["2"] * 2 + ["yes"] * 5 + ["the cat"] * 4 + ["no"]]
    assert build_answer_vocab(anns, min_count=4) == ["2", "yes", "cat"]  # count 5, 5, 4; ties alphabetical
    assert build_answer_vocab(anns, min_count=1) == ["2", "yes", "cat", "no"]


def test_nlvr2_consistency_groups_by_sentence():
    identifiers = ["dev-1-0-0", "dev-1-1-0", "dev-1-2-0", "dev-1-0-1", "dev-1-3-1", "dev-2-0-0"]
    keys = [nlvr2_sentence_key(i) for i in identifiers]
    assert keys[:3] == ["dev-1--0"] * 3 and keys[3:5] == ["dev-1--1"] * 2 and keys[5] == "dev-2--0"
    labels = [1, 0, 1, 1, 0, 0]
    preds = [1, 0, 1, 1, 1, 0]  # sentence dev-1--1 has one wrong pair
    assert nlvr2_consistency(keys, preds, labels) == pytest.approx(2 / 3)
    assert accuracy(preds, labels) == pytest.approx(5 / 6)


def test_retrieval_recall_hand_computed_with_ties():
    # images 0, 1, 2; captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2
    scores = np.array([
        [0.9, 0.1, 0.9, 0.0, 0.0],  # image 0: best true caption 0 ties with false caption 2 -> rank 1
        [0.2, 0.3, 0.1, 0.8, 0.9],  # image 1: best true caption 3 (0.8) below false caption 4 -> rank 1
        [0.5, 0.5, 0.5, 0.5, 0.5],  # image 2: all equal -> its caption 4 after the 4 false ones -> rank 4
    ])
    caption_image = [0, 0, 1, 1, 2]
    # image ranks per caption: c0 (col 0.9/0.2/0.5): rank 0; c1 (0.1 vs 0.3, 0.5): 2; c2 (0.1 vs 0.9, 0.5): 2;
    # c3 (0.8 vs 0.0, 0.5): 0; c4 (0.5 vs 0.0, 0.9): 1
    r = retrieval_recall(scores, caption_image, ks=(1, 2, 5))
    assert r["tr_r1"] == 0.0 and r["tr_r2"] == pytest.approx(2 / 3) and r["tr_r5"] == 1.0
    assert r["ir_r1"] == pytest.approx(2 / 5) and r["ir_r2"] == pytest.approx(3 / 5) and r["ir_r5"] == 1.0


def test_retrieval_constant_scores_earn_nothing_and_few_candidates_cap_k():
    r = retrieval_recall(np.zeros((4, 8)), np.repeat(np.arange(4), 2))
    assert r["tr_r1"] == 0.0 and r["ir_r1"] == 0.0  # ties never favour the true item
    assert r["ir_r5"] == 1.0 and r["tr_r5"] == 0.0  # 4 candidate images: all within 5; 6 false captions tie
    r = retrieval_recall(np.array([[0.0, 1.0], [1.0, 0.0]]), [0, 1])  # every answer wrong, 2 candidates
    assert r == {"tr_r1": 0.0, "ir_r1": 0.0, "tr_r5": 1.0, "ir_r5": 1.0, "tr_r10": 1.0, "ir_r10": 1.0}


def test_retrieval_rejects_bad_inputs():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_recall(np.zeros((2, 2)), [0, 0])
    with pytest.raises(ValueError, match="shape"):
        retrieval_recall(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(np.full((1, 1), np.nan), [0])


def test_heldout_split_by_image_is_disjoint_and_deterministic():
    image_ids = np.array([5, 5, 7, 9, 9, 9, 11, 13, 13, 2])
    train, heldout = heldout_split_by_image(image_ids, 0.4, seed=3)
    assert sorted(np.r_[train, heldout]) == list(range(10))
    assert not set(image_ids[train]) & set(image_ids[heldout])
    assert len(set(image_ids[heldout])) == 2  # 40% of 6 images
    again = heldout_split_by_image(image_ids[::-1], 0.4, seed=3)[1]
    assert set(image_ids[::-1][again]) == set(image_ids[heldout])  # row order does not matter
    with pytest.raises(ValueError, match="heldout_fraction"):
        heldout_split_by_image(image_ids, 1.0)


# -----------------------------------------------------------------------------
# Batches and heads


def test_collator_pairs_float_labels_and_index():
    collate = Collator(synthetic_tokenizer(), max_text_len=8)
    items = [{"text": "a red circle", "text_pair": "a blue square at the top", "label": 4.5, "index": 7},
             {"text": "two stars", "text_pair": "a star", "label": 0.25, "index": 2}]
    batch = collate(items)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [4.5, 0.25]
    assert batch["index"].tolist() == [7, 2] and batch["input_ids"].shape == (2, 8)  # truncated to max_text_len
    tokenizer = synthetic_tokenizer()
    assert tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()]) == \
        "[CLS] two stars [SEP] a star [SEP]"
    nlvr2 = collate([{"image0": torch.zeros(3, 2, 2), "image1": torch.ones(3, 2, 2), "text": "a", "label": 1}])
    assert nlvr2["pixel_values_left"].sum() == 0 and nlvr2["pixel_values_right"].sum() == 12
    assert nlvr2["labels"].dtype == torch.long


def test_negative_images_never_show_the_captions_picture():
    image_ids = torch.tensor([5, 5, 7, 9, 9, 11])
    candidates, valid = sample_negative_images(image_ids, 3, torch.Generator().manual_seed(0))
    assert candidates.shape == (6, 4) and candidates[:, 0].tolist() == list(range(6)) and valid.all()
    for row in range(6):
        negatives = candidates[row, 1:]
        assert len(set(negatives.tolist())) == 3 and (image_ids[negatives] != image_ids[row]).all()
    # only two other pictures for rows of image 5: the third draw is marked invalid
    candidates, valid = sample_negative_images(torch.tensor([5, 5, 7, 9]), 3, torch.Generator().manual_seed(0))
    assert valid[0].tolist() == [True, True, True, False] and valid[2].all()


def test_box_scoring_pools_the_patches_inside_each_box():
    head = BoxScoringHead(dim=4, pooled_dim=2)
    grid = 4
    patches = torch.zeros(1, grid * grid, 4)
    patches[0, 0] = torch.tensor([1.0, 0, 0, 0])  # top-left patch
    patches[0, 5] = torch.tensor([0, 1.0, 0, 0])  # row 1, column 1
    image_feats = torch.cat([torch.full((1, 1, 4), 9.0), patches], dim=1)  # CLS first, never pooled
    seen = []

    class Recorder(torch.nn.Module):  # stands in for the scoring classifier: keeps its input
        def forward(self, x):
            seen.append(x)
            return x[..., :1]

    head.score = Recorder()
    torch.nn.init.zeros_(head.geometry.weight)
    torch.nn.init.zeros_(head.geometry.bias)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5],  # covers patches 0, 1, 4, 5
                           [0.0, 0.0, 0.1, 0.1],  # covers no patch centre: takes the patch under its centre
                           [0.6, 0.6, 1.0, 1.0]]])  # only empty patches
    head(image_feats, torch.tensor([[7.0, 8.0]]), boxes)
    box_feats = seen[0][0, :, 2:]
    assert box_feats[0].tolist() == pytest.approx([0.25, 0.25, 0, 0])
    assert box_feats[1].tolist() == [1.0, 0, 0, 0] and box_feats[2].abs().sum() == 0
    assert seen[0][0, :, :2].tolist() == [[7.0, 8.0]] * 3  # the pooled output beside every box


# -----------------------------------------------------------------------------
# Synthetic versions: generated in the official layouts and read back by the readers above


def synthetic_cfg(root, **overrides):
    return SimpleNamespace(**{"data_root": str(root), "synthetic_task": True, "synthetic_images": 40,
                              "synthetic_seed": 3, "synthetic_image_size": 32, "task_dir": "", "coco_dir": "",
                              "f30k_dir": "", "train_splits": [], "val_split": "", "eval_splits": [],
                              "vqa_min_answer_count": 2, "vqa_answer_splits": [], "vqa_heldout_fraction": 0.3,
                              "seed": 0, **overrides})


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """Every task's synthetic version, generated once for this module over a 40-picture world."""
    root = tmp_path_factory.mktemp("data")
    cfg = synthetic_cfg(root)
    for task in tasks.TASKS.values():
        task.root(cfg)
    return root


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synthetic_versions_are_deterministic_and_refuse_other_versions(synthetic_root, tmp_path):
    again = tmp_path / "again"
    for task in ("nlvr2", "vqa", "refcocog", "cifar10"):
        tasks.TASKS[task].root(synthetic_cfg(again))
    for folder in ("nlvr2", "vqa", "refcocog", "cifar-10-batches-py"):
        assert files_of(synthetic_root / "synthetic" / folder) == files_of(again / "synthetic" / folder)
    marker = again / "synthetic/vqa" / SYNTHETIC_MARKER
    marker.write_text(json.dumps({"version": 0, "seed": 3}))
    with pytest.raises(ValueError, match=r"vqa/synthetic\.json: generated with .*delete"):
        tasks.TASKS["vqa"].root(synthetic_cfg(again))
    with pytest.raises(ValueError, match="coco_dir='/data/coco' names real data, but synthetic_task=True"):
        tasks.TASKS["vqa"].root(synthetic_cfg(again, coco_dir="/data/coco"))


def test_synthetic_nlvr2_balanced_sentences_and_png_traps(synthetic_root):
    root = synthetic_root / "synthetic/nlvr2"
    train = NLVR2Dataset(root, "train", to_tensor)
    assert len(train) == 8 * 36  # one set per train / restval picture, 4 pairs x 2 sentences
    for split in ("train", "dev", "test1"):
        data = NLVR2Dataset(root, split, to_tensor)
        by_sentence = {}
        for i in range(len(data)):
            by_sentence.setdefault(nlvr2_sentence_key(data.identifiers[i]), []).append(data.labels[i])
        assert all(sorted(labels) == [0, 0, 1, 1] for labels in by_sentence.values())  # text alone tells nothing
    pngs = list((root / "images/train").rglob("*.png"))
    jpeg_bytes = sum(p.read_bytes()[:2] == b"\xff\xd8" for p in pngs)
    assert 0 < jpeg_bytes < len(pngs) and all(p.parent.name.isdigit() for p in pngs)
    item = train[0]
    assert item["image0"].shape == (3, 32, 32)
    assert item["text"].startswith(("in the left image ", "in the right image "))
    words = set(synthetic_tokenizer().vocab)
    assert all(w in words for i in range(len(train)) for w in train.sentences[i].split())


def test_synthetic_snli_ve_both_key_spellings_and_labels(synthetic_root):
    root = synthetic_root / "synthetic"
    first_train = json.loads((root / "snli_ve/snli_ve_train.jsonl").read_text().splitlines()[0])
    first_dev = json.loads((root / "snli_ve/snli_ve_dev.jsonl").read_text().splitlines()[0])
    assert first_train["Flikr30kID"].endswith(".jpg") and "Flickr30K_ID" in first_dev
    for split in ("train", "dev", "test"):
        data = SNLIVEDataset(root / "snli_ve", split, root / "f30k/flickr30k-images", to_tensor)
        assert np.bincount(data.labels).tolist() == [len(data) // 3] * 3
    assert data[0]["image"].shape == (3, 32, 32)
    f30k = load_retrieval_split(root / "f30k/karpathy/dataset_flickr30k.json", root / "f30k/flickr30k-images",
                                      "test", to_tensor)
    assert len(f30k) == 2 and len(f30k.captions) == 10 and f30k.images[0]["image"].shape == (3, 32, 32)


@pytest.mark.parametrize("task", ["refcoco", "refcoco_plus", "refcocog"])
def test_synthetic_refcoco_expressions_pick_one_object(synthetic_root, task):
    refer_dir = synthetic_root / "synthetic" / tasks.TASKS[task].folder
    refs = pickle.loads((refer_dir / ("refs(umd).p" if task == "refcocog" else "refs(unc).p")).read_bytes())
    assert {r["split"] for r in refs} <= set(tasks.TASKS[task].eval_splits) | {"train"}
    data = RefCOCODataset(refer_dir, "train", synthetic_root / "synthetic/coco/train2014", to_tensor,
                                "umd" if task == "refcocog" else "unc")
    assert len(data) > 20 and all(len(data[i]["boxes"]) >= 2 for i in range(5))
    location_words = {"left", "right", "top", "bottom", "middle", "above", "below"}
    for i in range(len(data)):
        has_location = bool(location_words & set(data.texts[i].split()))
        assert not has_location if task == "refcoco_plus" else True
    if task == "refcocog":
        assert any(len(data.texts[i].split()) > 6 for i in range(len(data)))  # relational expressions


def test_synthetic_vqa_answers_normalise_to_the_answer(synthetic_root):
    root = synthetic_root / "synthetic"
    annotations = read_vqa_annotations(root / "vqa/v2_mscoco_train2014_annotations.json")
    humans = [[a["answer"] for a in ann["answers"]] for ann in annotations]
    answers = [ann["multiple_choice_answer"] for ann in annotations]
    assert vqa_score(answers, humans) > 0.95  # most annotators agree
    written_differently = sum(h != a and normalize_answer(h) == a for a, hs in zip(answers, humans) for h in hs)
    assert written_differently > 0.1 * 10 * len(answers)
    types = Counter(ann["answer_type"] for ann in annotations)
    assert set(types) == {"other", "number", "yes/no"}
    data = VQADataset(root / "vqa", "val2014", root / "coco", to_tensor, answer_vocab=["yes", "no", "1"])
    assert data[0]["image"].shape == (3, 32, 32) and data[0]["target"].shape == (3,)


def test_synthetic_glue_all_nine_tasks_read(synthetic_root):
    glue = synthetic_root / "synthetic/glue_data"
    for name, fmt in GLUE_FORMATS.items():
        mnli_splits = ["train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched"]
        for split in mnli_splits if name == "mnli" else ["train", "dev", "test"]:
            data = GLUEDataset(glue, name, split)
            assert len(data) == GLUE_SYNTHETIC_SIZES[split.split("_")[0]]
            assert (data.text_pairs is not None) == (fmt.text_pair is not None)
        if fmt.labels is not None:
            assert len(set(GLUEDataset(glue, name, "train").labels.tolist())) == len(fmt.labels)
    assert len(GLUEDataset(glue, "qqp", "train").malformed_lines) == 1
    stsb = GLUEDataset(glue, "stsb", "train").labels
    assert stsb.min() >= 0 and stsb.max() == 5 and len(set(stsb.tolist())) > 3


def test_synthetic_cifar10_shapes_with_bytes_keys(synthetic_root):
    root = synthetic_root / "synthetic/cifar-10-batches-py"
    assert all(isinstance(k, bytes) for k in pickle.loads((root / "test_batch").read_bytes()))
    train = CIFAR10Dataset(root, "train", to_tensor)
    assert train.label_names == list(SHAPES) and len(train) == 5 * 20
    assert tasks.TASKS["cifar10"].label_names(synthetic_cfg(synthetic_root)) == list(SHAPES)
    assert train[0]["image"].shape == (3, 32, 32) and len(set(train.labels.tolist())) > 3


def test_vqa_validation_holds_out_images_of_a_trained_split(synthetic_root):
    vqa = tasks.TASKS["vqa"]
    cfg = synthetic_cfg(synthetic_root, train_splits=["train2014", "val2014"], val_split="val2014")
    vocab = vqa.label_names(cfg)
    train = vqa.train_dataset(cfg, to_tensor, vocab)
    heldout = vqa.eval_dataset(cfg, "val2014", to_tensor, vocab)
    trained_val = train.datasets[1]
    assert len(heldout) and not set(heldout.image_ids.tolist()) & set(trained_val.image_ids.tolist())
    full = VQADataset(synthetic_root / "synthetic/vqa", "val2014", synthetic_root / "synthetic/coco", to_tensor)
    assert len(heldout) + len(trained_val) == len(full)
    with pytest.raises(ValueError, match="'train2014' is a training split"):
        vqa.eval_dataset(cfg, "train2014", to_tensor, vocab)
    with pytest.raises(ValueError, match="val_split='dev' is also in train_splits"):
        tasks.TASKS["nlvr2"].validation_split(synthetic_cfg(synthetic_root, train_splits=["train", "dev"],
                                                            val_split="dev"))


def test_vqa_answer_vocabulary_source(synthetic_root):
    vqa = tasks.TASKS["vqa"]
    folder = synthetic_root / "synthetic/vqa"
    train = read_vqa_annotations(folder / "v2_mscoco_train2014_annotations.json")
    val = read_vqa_annotations(folder / "v2_mscoco_val2014_annotations.json")
    # the original's rule: both splits whole, whatever is trained on or held out
    both = synthetic_cfg(synthetic_root, vqa_answer_splits=["train2014", "val2014"], vqa_min_answer_count=3)
    assert vqa.label_names(both) == build_answer_vocab(train + val, 3)
    # the default: the training splits only
    alone = synthetic_cfg(synthetic_root, vqa_min_answer_count=3)
    assert vqa.label_names(alone) == build_answer_vocab(train, 3) != vqa.label_names(both)
    # the paper config asks for the original's vocabulary
    cfg = load_config(["configs/vqa.py"])
    assert (cfg.vqa_answer_splits, cfg.vqa_min_answer_count) == (["train2014", "val2014"], 9)


def test_integer_fields_that_are_not_integers_name_file_record_and_field(tmp_path):
    vqa = tmp_path / "vqa"
    write_vqa(vqa, "val2014", [(1, 5, "Q?"), ("q2", 5, "Q2?")], [(1, 5, "yes", ["yes"] * 10)])
    with pytest.raises(ValueError, match=r"questions\.json: questions\[1\]: field 'question_id' is 'q2', not an "
                                         r"integer"):
        VQADataset(vqa, "val2014", tmp_path, to_tensor)
    write_vqa(vqa, "val2014", [(1, "five", "Q?")])
    with pytest.raises(ValueError, match=r"questions\[0\]: field 'image_id' is 'five', not an integer"):
        VQADataset(vqa, "val2014", tmp_path, to_tensor)
    write_vqa(vqa, "val2014", [("7", 5, "Q?")], [(None, 5, "yes", ["yes"] * 10)])
    with pytest.raises(ValueError, match=r"annotations\.json: annotations\[0\]: field 'question_id' is None"):
        VQADataset(vqa, "val2014", tmp_path, to_tensor)
    write_vqa(vqa, "val2014", [("7", 5, "Q?")], [("7", 5, "yes", ["yes"] * 10)])  # ids written as digits are ids
    assert VQADataset(vqa, "val2014", tmp_path, to_tensor).question_ids.tolist() == [7]

    refer_dir, image_dir = make_refcoco(tmp_path)
    instances = json.loads((refer_dir / "instances.json").read_text())
    instances["images"][1]["width"] = "wide"
    (refer_dir / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=r"instances\.json: images\[1\]: field 'width' is 'wide', not an integer"):
        RefCOCODataset(refer_dir, "train", image_dir, to_tensor)
    instances["images"][1]["width"] = 5
    instances["annotations"][2]["id"] = 1.5
    (refer_dir / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=r"instances\.json: annotations\[2\]: field 'id' is 1\.5, not an integer"):
        RefCOCODataset(refer_dir, "train", image_dir, to_tensor)

    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root, pickle_py3, str)
    batch, _ = cifar_batch(str, [1, 2], seed=0)
    pickle_py3(root / "test_batch", {**batch, "labels": ["cat", "dog"]})
    with pytest.raises(ValueError, match=r"test_batch: field 'labels' does not hold int64 numbers"):
        CIFAR10Dataset(root, "test", to_tensor)


def float32_head_of(head, run):
    """run() under bfloat16 autocast, and what `head` gives in float32, autocast off, on the features it saw."""
    seen = []
    hook = head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = run()
    hook.remove()
    return scores, head(torch.cat(seen).float()).squeeze(-1)


def test_bfloat16_evaluation_scores_come_from_a_float32_layer(one_thread):
    """Retrieval scores and STS-B outputs leave their head in float32 even under bfloat16 autocast, so their ranks
    are those of float32 scores on the same features. The bias puts every score near 1e4, where bfloat16's
    spacing is 64: a bfloat16 head would make them all ties (counted as misses by retrieval). The encoder's own
    bfloat16 rounding is not in question here: it moves the features, not the layer that ranks them."""
    tokenizer = synthetic_tokenizer()
    cfg = tiny_config(micro_batch_size=4, eval_pairs_batch=8, num_workers=0)
    dist = engine.Dist(rank=0, local_rank=0, world_size=1, master=True, device=torch.device("cpu"), is_ddp=False)
    torch.manual_seed(0)
    images = [{"image": torch.rand(3, 32, 32)} for _ in range(3)]
    captions = ["a red circle", "two blue squares", "a green triangle left", "one small star", "big yellow"]
    split = RetrievalSplit(images, np.arange(3), captions, np.array([0, 0, 1, 2, 2]))
    retrieval = RetrievalModel(build_encoder(cfg, len(tokenizer))).eval()
    with torch.no_grad():
        retrieval.head.weight.mul_(100)  # scores spread over a few units, resolved by float32 at 1e4 (spacing 1e-3)
        retrieval.head.bias.fill_(1e4)
        bf16, fp32 = float32_head_of(retrieval.head, lambda: retrieval_scores(retrieval, split, tokenizer, cfg, dist))
    assert bf16.dtype == np.float32 and len(np.unique(bf16)) == bf16.size  # no ties
    assert np.array_equal(bf16.ravel(), fp32.numpy())  # pairs are scored image-major, as the matrix is laid out

    stsb = tasks.TASKS["stsb"]
    regression = stsb.build_model(build_encoder(cfg, len(tokenizer)), stsb.label_names(cfg)).eval()
    batch = Collator(tokenizer, 16)([{"text": c, "text_pair": "a shape", "label": 1.0} for c in captions])
    with torch.no_grad():
        regression.head.net[-1].weight.mul_(100)
        regression.head.net[-1].bias.fill_(1e4)
        bf16, fp32 = float32_head_of(regression.head, lambda: regression.predict(batch))
    assert bf16.dtype == torch.float32 and len(bf16.unique()) == len(captions)
    assert torch.equal(bf16, fp32)


def test_scene_attributes_targets_predictions_and_scores(synthetic_root):
    """The vision tower's objective: every kind present and the total count, from scenes.json; predictions travel
    as bitmasks and are scored per picture (all right), per kind (F1) and by count."""
    world_root = synthetic_root / "synthetic"
    task = tasks.TASKS["scenes"]
    train = task.train_dataset(synthetic_cfg(synthetic_root), to_tensor)
    scenes = json.loads((world_root / "scenes.json").read_text())["scenes"]
    assert len(train) == sum(s["split"] in ("train", "restval") for s in scenes)
    item = train[0]
    objects = train.scenes[0]["objects"]
    named = {SCENE_ATTRIBUTES[k] for k in np.flatnonzero(item["target"].numpy())}
    assert named == {f"{o['colour']} {o['shape']}" for o in objects} | {o["colour"] for o in objects} | \
        {o["shape"] for o in objects} | {SCENE_COUNTS[len(objects) - 1]}
    assert item["image"].shape == (3, 32, 32)
    test = task.eval_dataset(synthetic_cfg(synthetic_root), "test", to_tensor)
    truth = test.targets.astype(np.int64)
    as_bits = (truth << np.arange(truth.shape[1])).sum(1).astype(np.float64)  # as predict_items returns them
    assert (decode_predictions(as_bits, truth.shape[1]) == truth).all()
    assert task.score(as_bits, test, "test") == {"scenes_acc": 1.0, "scenes_present_f1": 1.0, "scenes_kind_f1": 1.0,
                                                 "scenes_count_acc": 1.0}
    one_kind_missed = truth.copy()
    one_kind_missed[0, SCENE_KINDS.start + np.flatnonzero(truth[0, SCENE_KINDS])[0]] = 0
    scores = task.score((one_kind_missed << np.arange(truth.shape[1])).sum(1).astype(np.float64), test, "test")
    present = truth[:, SCENE_KINDS].sum()
    assert scores["scenes_acc"] == 1 - 1 / len(test) and scores["scenes_count_acc"] == 1.0
    assert scores["scenes_kind_f1"] == pytest.approx(2 * (present - 1) / (2 * present - 1))
    all_present = truth[:, :SCENE_KINDS.stop].sum()
    assert scores["scenes_present_f1"] == pytest.approx(2 * (all_present - 1) / (2 * all_present - 1))
    with pytest.raises(ValueError, match="task=scenes reads a synthetic world"):
        task.train_dataset(synthetic_cfg(synthetic_root, synthetic_task=False), to_tensor)


def test_scene_attributes_model_predicts_presences_and_one_count():
    """Presences are the positive logits, the count the largest of the count logits; the bitmask carries both."""
    encoder = build_encoder(tiny_config(), vocab_size=40)
    model = SceneAttributesModel(encoder, len(SCENE_ATTRIBUTES)).eval()
    counts = len(SCENE_ATTRIBUTES) - len(SCENE_COUNTS)
    targets = torch.zeros(3, len(SCENE_ATTRIBUTES))
    targets[:, counts + 1] = 1.0
    batch = {"pixel_values": torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), "targets": targets}
    with torch.no_grad():
        logits = model.logits(batch)
        bits = decode_predictions(model.predict(batch).double().numpy(), len(SCENE_ATTRIBUTES))
        out = model(batch)
    assert (bits[:, :counts] == (logits[:, :counts] > 0).numpy()).all()
    assert (bits[:, counts:].sum(1) == 1).all()
    assert (bits[:, counts:].argmax(1) == logits[:, counts:].argmax(1).numpy()).all()
    assert out["acc"].item() == float((bits == targets.numpy()).all(1).mean())
    expected = F.binary_cross_entropy_with_logits(logits[:, :counts], targets[:, :counts]) * counts + \
        F.cross_entropy(logits[:, counts:], torch.full((3,), 1))
    assert torch.allclose(out["loss"], expected)


def every_statement():
    """{text: statement} over every statement the world's templates can make (about 11,000)."""
    kinds = [(c, s) for c in world.COLOURS for s in SHAPES]
    found = [{"type": "object", "colour": c, "shape": s, "size": size, "where": where}
             for c, s in kinds + [(c, None) for c in world.COLOURS]
             for size in (None, *world.SIZES) for where in (None, *world.POSITIONS)]
    found += [{"type": "count", "colour": c, "shape": s, "count": n} for c in (None, *world.COLOURS)
              for s in (None, *SHAPES) for n in world.NUMBER_WORDS]
    found += [{"type": "relation", "a": {"colour": a[0], "shape": a[1]}, "relation": r,
               "b": {"colour": b[0], "shape": b[1]}} for a in kinds for b in kinds
              for r in (*world.RELATIONS, *world.SIZE_RELATIONS)]
    return {world.statement_text(s): s for s in found}


def test_synthetic_statements_are_true_or_false_of_their_pictures(synthetic_root):
    """NLVR2's label is the truth of its statement in the picture it names; SNLI-VE's entailments are true of
    the picture and its contradictions false."""
    root = synthetic_root / "synthetic"
    scenes = json.loads((root / "scenes.json").read_text())
    objects_of, image_size = {s["image_id"]: s["objects"] for s in scenes["scenes"]}, scenes["image_size"]
    statements = every_statement()
    for split in ("train", "dev"):
        for line in (root / f"nlvr2/{split}.json").read_text().splitlines():
            record = json.loads(line)
            side, phrase = record["sentence"].removeprefix("in the ").split(" image ", 1)
            image_id = int(record[f"{side}_url"].removeprefix("synthetic://"))
            truth = world.statement_holds(statements[phrase], objects_of[image_id], image_size)
            assert record["label"] == str(truth), record
    labels = Counter()
    for line in (root / "snli_ve/snli_ve_train.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["gold_label"] != "neutral":
            image_id = int(record["Flikr30kID"].removesuffix(".jpg")) - SYNTHETIC_FLICKR_ID
            truth = world.statement_holds(statements[record["sentence2"]], objects_of[image_id], image_size)
            assert truth == (record["gold_label"] == "entailment"), record
            labels[record["gold_label"]] += 1
    assert labels["entailment"] == labels["contradiction"] > 0
