"""Downstream tasks' readers: every reader on tiny files in the publisher's format (written into tmp_path),
including the traps each format sets."""

import io
import json
import pickle
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset

import tasks
from data import synthetic_tokenizer
from tasks.cifar10 import CIFAR10Dataset
from tasks.common import Collator, format_malformed_rows, malformed_rows
from tasks.glue import GLUEDataset
from tasks.nlvr2 import NLVR2Dataset
from tasks.refcoco import RefCOCODataset
from tasks.retrieval import load_retrieval_split
from tasks.snli_ve import SNLIVEDataset
from tasks.vqa import VQADataset, build_answer_vocab, read_vqa_annotations, vqa_score, write_vqa_results


def to_tensor(image):  # PIL RGB -> (3, H, W) uint8, so tests can check pixels
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def save_image(path, color, fmt="PNG", size=(4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


class Py2Pickler(pickle._Pickler):
    """Writes bytes with the protocol-2 string opcodes Python 2 used for its str, so a dict built with bytes
    keys and values pickles exactly as Python 2 pickled its str-keyed dicts (numpy arrays included)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def write_py2_pickle(path, obj):
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# -----------------------------------------------------------------------------
# Readers


def nlvr2_record(identifier, sentence, label, directory=None):
    record = {"identifier": identifier, "sentence": sentence, "label": label, "left_url": "http://x/l.jpg",
              "right_url": "http://x/r.jpg", "writer": "w1", "validation": {}, "synset": "n1", "query": "dogs 1"}
    if directory is not None:
        record["directory"] = directory
    return json.dumps(record)


def test_nlvr2_train_numbered_folders_and_jpeg_bytes_in_png(tmp_path):
    root = tmp_path / "nlvr2"
    write_lines(root / "train.json", [nlvr2_record("train-10-0-0", "Two dogs.", "True", directory=7),
                                      nlvr2_record("train-10-0-1", "One cat.", "False", directory=7),
                                      nlvr2_record("train-22-3-0", "A bird.", "False", directory="12")])
    save_image(root / "images/train/7/train-10-0-img0.png", (255, 0, 0))
    save_image(root / "images/train/7/train-10-0-img1.png", (0, 0, 255), fmt="JPEG")  # JPEG bytes, .png name
    save_image(root / "images/train/12/train-22-3-img0.png", (0, 255, 0))
    save_image(root / "images/train/12/train-22-3-img1.png", (0, 255, 0))
    assert (root / "images/train/7/train-10-0-img1.png").read_bytes()[:2] == b"\xff\xd8"

    data = NLVR2Dataset(root, "train", to_tensor)
    assert len(data) == 3
    item = data[1]
    assert item["text"] == "One cat." and item["label"] == 0 and item["identifier"] == "train-10-0-1"
    assert item["sentence_key"] == "train-10--1"
    assert item["image0"].shape == (3, 4, 4) and item["image0"][:, 0, 0].tolist() == [255, 0, 0]
    assert item["image1"][2, 0, 0] > 200 and item["image1"][0, 0, 0] < 50  # blue, decoded from JPEG bytes
    assert data[2]["label"] == 0 and data[2]["image0"][:, 0, 0].tolist() == [0, 255, 0]


@pytest.mark.parametrize("image_dir", ["dev", "images/dev"])
def test_nlvr2_dev_image_folder_either_layout(tmp_path, image_dir):
    root = tmp_path / "nlvr2"
    write_lines(root / "dev.json", [nlvr2_record("dev-850-0-0", "S.", "True")])
    save_image(root / image_dir / "dev-850-0-img0.png", (1, 2, 3))
    save_image(root / image_dir / "dev-850-0-img1.png", (4, 5, 6))
    item = NLVR2Dataset(root, "dev", to_tensor)[0]
    assert item["label"] == 1 and item["image1"][:, 0, 0].tolist() == [4, 5, 6]


def test_nlvr2_errors_name_file_line_and_field(tmp_path):
    root = tmp_path / "nlvr2"
    (root / "dev").mkdir(parents=True)
    write_lines(root / "dev.json", [nlvr2_record("dev-1-0-0", "S.", "True"), '{"identifier": "dev-1-0-1", '])
    with pytest.raises(ValueError, match=r"dev\.json:2: malformed JSON"):
        NLVR2Dataset(root, "dev", to_tensor)
    write_lines(root / "dev.json", [nlvr2_record("dev-1-0-0", "S.", "True"), nlvr2_record("dev-1-0-1", "S.", "yes")])
    with pytest.raises(ValueError, match=r"dev\.json:2: label 'yes' is not one of"):
        NLVR2Dataset(root, "dev", to_tensor)
    write_lines(root / "dev.json", [nlvr2_record("dev-1-0-0", "S.", "True")])
    data = NLVR2Dataset(root, "dev", to_tensor)
    with pytest.raises(FileNotFoundError, match=r"dev-1-0-img0\.png: image not found \(named by .*dev\.json:1\)"):
        data[0]
    write_lines(root / "train.json", [nlvr2_record("train-1-0-0", "S.", "True")])
    (root / "images/train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"train\.json:1: missing field 'directory'"):
        NLVR2Dataset(root, "train", to_tensor)


def snli_ve_record(image_key, image_value, hypothesis, label):
    return json.dumps({"gold_label": label, "sentence1": "A premise.", "sentence2": hypothesis,
                       "captionID": "3416050480.jpg#4", "pairID": "3416050480.jpg#4r1n",
                       "annotator_labels": [label], image_key: image_value})


def test_snli_ve_accepts_both_image_key_spellings(tmp_path):
    images = tmp_path / "f30k/flickr30k-images"
    save_image(images / "3416050480.jpg", (200, 10, 10), fmt="JPEG")
    save_image(images / "12345.jpg", (10, 200, 10), fmt="JPEG")
    write_lines(tmp_path / "snli_ve/snli_ve_dev.jsonl", [
        snli_ve_record("Flickr30K_ID", "3416050480", "A man sleeps.", "contradiction"),
        snli_ve_record("Flikr30kID", "12345.jpg", "Grass.", "entailment"),
        snli_ve_record("Flikr30kID", "12345.jpg", "A park.", "neutral")])
    data = SNLIVEDataset(tmp_path / "snli_ve", "dev", images, to_tensor)
    assert [data[i]["label"] for i in range(3)] == [2, 0, 1]
    assert data[0]["text"] == "A man sleeps." and data[0]["image"][0, 0, 0] > 150
    assert data[1]["image"][1, 0, 0] > 150
    assert data.image_ids.tolist() == [3416050480, 12345, 12345]


def test_snli_ve_label_outside_set_and_missing_image(tmp_path):
    write_lines(tmp_path / "snli_ve_train.jsonl", [snli_ve_record("Flickr30K_ID", "1", "H.", "entailment"),
                                                   snli_ve_record("Flickr30K_ID", "1", "H.", "-")])
    with pytest.raises(ValueError, match=r"snli_ve_train\.jsonl:2: gold_label '-' is not one of"):
        SNLIVEDataset(tmp_path, "train", tmp_path, to_tensor)
    write_lines(tmp_path / "snli_ve_train.jsonl", [snli_ve_record("Flickr30K_ID", "1", "H.", "entailment")])
    data = SNLIVEDataset(tmp_path, "train", tmp_path / "missing", to_tensor)
    with pytest.raises(FileNotFoundError, match=r"1\.jpg: image not found .*snli_ve_train\.jsonl:1"):
        data[0]


def make_refcoco(tmp_path):
    refer_dir, image_dir = tmp_path / "refcoco", tmp_path / "coco/train2014"
    refer_dir.mkdir(parents=True)
    save_image(image_dir / "COCO_train2014_000000000042.jpg", (9, 9, 9), fmt="JPEG", size=(8, 6))
    save_image(image_dir / "COCO_train2014_000000000043.jpg", (9, 9, 9), fmt="JPEG", size=(5, 5))
    # Python 2 wrote refs as dicts of str: bytes here, through the Python-2 string opcodes
    refs = [
        {b"ref_id": 0, b"ann_id": 301, b"image_id": 42, b"category_id": 1, b"split": b"train",
         b"sent_ids": [0, 1], b"file_name": b"COCO_train2014_000000000042_301.jpg",
         b"sentences": [{b"sent": b"left man", b"raw": b"Left man", b"tokens": [b"left", b"man"], b"sent_id": 0},
                        {b"sent": b"caf\xe9 sign", b"raw": b"Caf\xe9 sign", b"tokens": [], b"sent_id": 1}]},
        {b"ref_id": 1, b"ann_id": 500, b"image_id": 43, b"category_id": 1, b"split": b"testA",
         b"sent_ids": [2], b"file_name": b"COCO_train2014_000000000043_500.jpg",
         b"sentences": [{b"sent": b"the dog", b"raw": b"The dog", b"tokens": [], b"sent_id": 2}]},
        {b"ref_id": 2, b"ann_id": 100, b"image_id": 42, b"category_id": 1, b"split": b"train",
         b"sent_ids": [3], b"file_name": b"COCO_train2014_000000000042_100.jpg",
         b"sentences": [{b"sent": b"right one", b"raw": b"Right one", b"tokens": [], b"sent_id": 3}]},
    ]
    write_py2_pickle(refer_dir / "refs(unc).p", refs)
    instances = {
        "images": [{"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "width": 8, "height": 6},
                   {"id": 43, "file_name": "COCO_train2014_000000000043.jpg", "width": 5, "height": 5}],
        "annotations": [{"id": 301, "image_id": 42, "bbox": [1, 1, 2, 2], "category_id": 1},
                        {"id": 500, "image_id": 43, "bbox": [0, 0, 5, 5], "category_id": 1},
                        {"id": 100, "image_id": 42, "bbox": [4, 0, 3, 5], "category_id": 1},
                        {"id": 205, "image_id": 42, "bbox": [0, 3, 8, 3], "category_id": 2}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "sign"}]}
    (refer_dir / "instances.json").write_text(json.dumps(instances))
    return refer_dir, image_dir


def test_refcoco_python2_pickle_boxes_and_collate(tmp_path):
    refer_dir, image_dir = make_refcoco(tmp_path)
    with open(refer_dir / "refs(unc).p", "rb") as f, pytest.raises(UnicodeDecodeError):
        pickle.load(f)  # the fixture is a real Python-2 pickle: only latin1 reads it

    data = RefCOCODataset(refer_dir, "train", image_dir, to_tensor)
    assert len(data) == 3  # (ref, sentence) pairs of the split
    assert [data[i]["text"] for i in range(3)] == ["left man", "café sign", "right one"]
    expected_boxes = [[4, 0, 3, 5], [0, 3, 8, 3], [1, 1, 2, 2]]  # annotations 100, 205, 301 of image 42
    for i, target in [(0, 2), (1, 2), (2, 0)]:
        assert data[i]["boxes"].tolist() == expected_boxes and data[i]["label"] == target
    assert data[0]["image_size"].tolist() == [8, 6] and data[0]["image"].shape == (3, 6, 8)
    assert data.box_of(0, 2) == (301, [1, 1, 2, 2]) and data.sent_ids.tolist() == [0, 1, 3]
    assert data.ref_ids.tolist() == [0, 0, 2]

    def resize(image):  # images of different sizes, as a real transform makes them equal before batching
        return to_tensor(image.resize((4, 4)))

    train = RefCOCODataset(refer_dir, "train", image_dir, resize)
    test_a = RefCOCODataset(refer_dir, "testA", image_dir, resize)
    batch = Collator(synthetic_tokenizer(), 16)([train[0], test_a[0]])
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    # boxes as x0, y0, x1, y1 fractions of each image's own width and height: they survive the resize
    expected = torch.tensor([[4 / 8, 0, 7 / 8, 5 / 6], [0, 3 / 6, 1, 1], [1 / 8, 1 / 6, 3 / 8, 3 / 6]])
    torch.testing.assert_close(batch["boxes"][0], expected)
    assert batch["boxes"][1, 0].tolist() == [0, 0, 1, 1] and batch["boxes"][1, 1:].abs().sum() == 0
    assert batch["box_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["labels"].tolist() == [2, 0] and batch["input_ids"].shape[0] == 2

    with pytest.raises(ValueError, match=r"no refs in split 'val' \(splits: testA, train\)"):
        RefCOCODataset(refer_dir, "val", image_dir, to_tensor)
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p: file not found"):
        RefCOCODataset(refer_dir, "val", image_dir, to_tensor, split_by="umd")


def karpathy_image(split, filename, sentences, **extra):
    return {"split": split, "filename": filename, "imgid": 0, "sentids": [],
            "sentences": [{"raw": s, "tokens": s.split(), "imgid": 0, "sentid": 0} for s in sentences], **extra}


def test_retrieval_split_coco_and_flickr(tmp_path):
    coco = tmp_path / "coco"
    save_image(coco / "val2014/COCO_val2014_1.jpg", (255, 0, 0), fmt="JPEG")
    save_image(coco / "val2014/COCO_val2014_2.jpg", (0, 255, 0), fmt="JPEG")
    save_image(coco / "train2014/COCO_train2014_3.jpg", (0, 0, 255), fmt="JPEG")
    images = [karpathy_image("test", "COCO_val2014_1.jpg", [f"red {k} " for k in range(6)], filepath="val2014",
                             cocoid=1),
              karpathy_image("train", "COCO_train2014_3.jpg", ["blue a", "blue b"], filepath="train2014", cocoid=3),
              karpathy_image("test", "COCO_val2014_2.jpg", [f"green {k}" for k in range(5)], filepath="val2014",
                             cocoid=2),
              karpathy_image("restval", "COCO_val2014_2.jpg", ["green again"], filepath="val2014", cocoid=2)]
    (coco / "karpathy").mkdir()
    (coco / "karpathy/dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))

    split = load_retrieval_split(coco / "karpathy/dataset_coco.json", coco, "test", to_tensor)
    assert len(split) == 2 and len(split.captions) == 10  # first five captions per image
    assert split.captions[0] == "red 0" and split.captions[5] == "green 0"  # trailing space stripped
    assert split.caption_image.tolist() == [0] * 5 + [1] * 5 and split.image_ids.tolist() == [1, 2]
    assert split.images[1]["image"][1, 0, 0] > 200
    first = split.first_images(1)
    assert len(first) == 1 and first.captions == [f"red {k}" for k in range(5)] and len(first.images) == 1
    everything = load_retrieval_split(coco / "karpathy/dataset_coco.json", coco, "test", to_tensor, None)
    assert len(everything.captions) == 11 and everything.caption_image.tolist() == [0] * 6 + [1] * 5

    cfg = SimpleNamespace(synthetic_task=False, data_root=str(tmp_path), coco_dir="", train_splits=[],
                          retrieval_negatives=1, micro_batch_size=2)
    train = tasks.TASKS["coco_retrieval"].train_dataset(cfg, to_tensor)  # train + restval, as pretraining items
    assert [train[i]["caption"] for i in range(3)] == ["blue a", "blue b", "green again"]
    assert [train[i]["image_id"] for i in range(3)] == [3, 3, 2] and train[0]["image"][2, 0, 0] > 200
    with pytest.raises(ValueError, match="retrieval_negatives=2 must be at least 1 and below micro_batch_size=2"):
        tasks.TASKS["coco_retrieval"].train_dataset(SimpleNamespace(**{**vars(cfg), "retrieval_negatives": 2}),
                                                    to_tensor)

    f30k = tmp_path / "f30k"
    save_image(f30k / "flickr30k-images/1000.jpg", (7, 7, 7), fmt="JPEG")
    (f30k / "dataset_flickr30k.json").write_text(json.dumps(
        {"images": [karpathy_image("test", "1000.jpg", ["a", "b", "c", "d", "e"])], "dataset": "flickr30k"}))
    split = load_retrieval_split(f30k / "dataset_flickr30k.json", f30k / "flickr30k-images", "test", to_tensor)
    assert split.images[0]["image"].shape == (3, 4, 4) and split.captions == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match="no images in split"):
        load_retrieval_split(f30k / "dataset_flickr30k.json", f30k, "val", to_tensor)


def write_vqa(vqa_dir, split, questions, annotations=None):
    vqa_dir.mkdir(parents=True, exist_ok=True)
    (vqa_dir / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
         "questions": [{"image_id": i, "question": q, "question_id": qid} for qid, i, q in questions]}))
    if annotations is not None:
        (vqa_dir / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": [
            {"question_id": qid, "image_id": i, "question_type": "what", "answer_type": "other",
             "multiple_choice_answer": mc, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                                       for k, a in enumerate(answers)]}
            for qid, i, mc, answers in annotations]}))


def test_vqa_reader_soft_targets_select_and_results(tmp_path):
    vqa, coco = tmp_path / "vqa", tmp_path / "coco"
    save_image(coco / "train2014/COCO_train2014_000000000009.jpg", (3, 3, 3), fmt="JPEG")
    save_image(coco / "train2014/COCO_train2014_000000000010.jpg", (3, 3, 3), fmt="JPEG")
    write_vqa(vqa, "train2014", [(90, 9, "How many?"), (100, 10, "What color?")], [
        (90, 9, "2", ["two"] * 2 + ["2"] * 3 + ["3"] * 4 + ["Four"]),
        (100, 10, "red", ["red"] * 9 + ["blue"])])
    annotations = read_vqa_annotations(vqa / "v2_mscoco_train2014_annotations.json")
    vocab = build_answer_vocab(annotations, min_count=1)
    assert vocab == ["2", "red"]
    data = VQADataset(vqa, "train2014", coco, to_tensor, answer_vocab=["3", "2", "blue", "red", "4"])
    item = data[0]
    assert item["text"] == "How many?" and item["question_id"] == 90 and item["image"].shape == (3, 4, 4)
    # "two" and "2" count together (5 -> 1.0), "3" four times (1.0), "Four" once (0.3)
    assert item["target"].tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0, 0.3])
    assert data[1]["target"].tolist() == pytest.approx([0.0, 0.0, 0.3, 1.0, 0.0])
    assert data.human_answers(1) == ["red"] * 9 + ["blue"]
    # question 90: the answers differ, so "two" counts as "2": 5 of ten match "2" -> 1.0; question 100: 1 of ten -> 0.3
    assert vqa_score(["2", "blue"], [data.human_answers(0), data.human_answers(1)]) == pytest.approx(0.65)

    second = data.select([1])
    assert len(second) == 1 and second[0]["question_id"] == 100 and second.human_answers(0)[-1] == "blue"
    assert second[0]["target"].tolist() == pytest.approx([0.0, 0.0, 0.3, 1.0, 0.0])
    first = data.select([1, 0]).select([1])  # a view of a view
    assert first.question_ids.tolist() == [90] and first[0]["text"] == "How many?"
    assert first.human_answers(0)[0] == "two" and first[0]["target"][4] == pytest.approx(0.3)

    write_vqa(vqa, "test-dev2015", [(7, 9, "Why?")])
    save_image(coco / "test2015/COCO_test2015_000000000009.jpg", (3, 3, 3), fmt="JPEG")
    test = VQADataset(vqa, "test-dev2015", coco, to_tensor, answer_vocab=vocab)
    assert set(test[0]) == {"image", "text", "question_id"}
    write_vqa_results(tmp_path / "results.json", test.question_ids, ["yes"])
    assert json.loads((tmp_path / "results.json").read_text()) == [{"question_id": 7, "answer": "yes"}]


def test_vqa_reader_errors(tmp_path):
    vqa = tmp_path / "vqa"
    write_vqa(vqa, "val2014", [(1, 5, "Q?"), (2, 5, "Q2?")], [(1, 5, "yes", ["yes"] * 10)])
    with pytest.raises(ValueError, match=r"no annotation for question_id 2 \(questions\[1\]"):
        VQADataset(vqa, "val2014", tmp_path, to_tensor)
    write_vqa(vqa, "val2014", [(1, 5, "Q?")], [(1, 5, "yes", ["yes"] * 9)])
    with pytest.raises(ValueError, match=r"annotations\[0\]: 9 answers, expected 10"):
        VQADataset(vqa, "val2014", tmp_path, to_tensor)
    write_vqa(vqa, "val2014", [(1, 5, "Q?")], [(1, 5, "yes", ["yes"] * 10)])
    with pytest.raises(FileNotFoundError, match=r"COCO_val2014_000000000005\.jpg: image not found .*question_id 1"):
        VQADataset(vqa, "val2014", tmp_path, to_tensor)[0]


def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


def test_glue_cola_without_header_and_quote_characters(tmp_path):
    write_tsv(tmp_path / "CoLA/train.tsv", [["gj04", "1", "", 'He said "hi" to her.'],
                                            ["gj04", "0", "*", "Bill's \"book they read."]])
    write_tsv(tmp_path / "CoLA/test.tsv", [["index", "sentence"], ["0", '"Quoted" start.']])
    train = GLUEDataset(tmp_path, "cola", "train")
    assert [train[i] for i in range(2)] == [{"text": 'He said "hi" to her.', "text_pair": None, "label": 1},
                                            {"text": "Bill's \"book they read.", "text_pair": None, "label": 0}]
    assert GLUEDataset(tmp_path, "cola", "test")[0] == {"text": '"Quoted" start.', "text_pair": None,
                                                              "label": -1}


def test_glue_pair_tasks_columns(tmp_path):
    write_tsv(tmp_path / "STS-B/dev.tsv", [
        ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
        ["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none", "A man.", "A \"man\".", "4.750"]])
    item = GLUEDataset(tmp_path, "stsb", "dev")[0]
    assert item["text"] == "A man." and item["text_pair"] == 'A "man".' and item["label"] == pytest.approx(4.75)

    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    labels = ["label1", "label2", "label3", "label4", "label5", "gold_label"]
    write_tsv(tmp_path / "MNLI/dev_matched.tsv", [
        mnli_header + labels,
        ["0", "1", "1n", "gov", "( x )", "( y )", "(ROOT x)", "(ROOT y)", "Premise.", "Hypo.",
         "neutral", "neutral", "entailment", "neutral", "neutral", "neutral"]])
    item = GLUEDataset(tmp_path, "mnli", "dev_matched")[0]
    assert item == {"text": "Premise.", "text_pair": "Hypo.", "label": 1}

    write_tsv(tmp_path / "MRPC/train.tsv", [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                                            ["1", "1", "2", "He's \"in\".", "He is in."]])
    mrpc = tmp_path / "MRPC/train.tsv"
    mrpc.write_bytes(b"\xef\xbb\xbf" + mrpc.read_bytes())  # MRPC's files open with a byte-order mark
    assert GLUEDataset(tmp_path, "mrpc", "train")[0] == {"text": 'He\'s "in".', "text_pair": "He is in.",
                                                              "label": 1}
    write_tsv(tmp_path / "RTE/test.tsv", [["index", "sentence1", "sentence2"], ["0", "A.", "B."]])
    assert GLUEDataset(tmp_path, "rte", "test")[0]["label"] == -1


def test_glue_qqp_skips_and_counts_malformed_rows(tmp_path):
    write_tsv(tmp_path / "QQP/train.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                                           ["1", "1", "2", "How?", "Why \"so\"?", "0"],
                                           ["2", "3", "4", "Broken row with no second question"],
                                           ["3", "5", "6", "Is it?", "Is it not?", "1"]])
    data = GLUEDataset(tmp_path, "qqp", "train")
    assert len(data) == 2 and data.malformed_lines == [3]  # the header is line 1
    assert data[1] == {"text": "Is it?", "text_pair": "Is it not?", "label": 1}
    path = str(tmp_path / "QQP/train.tsv")
    found = malformed_rows(data, GLUEDataset(tmp_path, "qqp", "train"))
    assert found == {path: {"count": 1, "first_lines": [3]}}
    assert format_malformed_rows(found) == [f"{path}: 1 malformed rows skipped (lines 3)"]
    many = [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]] + [["1", "broken"]] * 7
    write_tsv(tmp_path / "QQP/dev.tsv", many)
    dev = GLUEDataset(tmp_path, "qqp", "dev")
    assert format_malformed_rows(malformed_rows(ConcatDataset([data, dev]))) == [
        f"{path}: 1 malformed rows skipped (lines 3)",
        f"{tmp_path / 'QQP/dev.tsv'}: 7 malformed rows skipped (lines 2, 3, 4, 5, 6, ...)"]


def test_glue_errors_name_file_line_and_label(tmp_path):
    write_tsv(tmp_path / "RTE/train.tsv", [["index", "sentence1", "sentence2", "label"],
                                           ["0", "A.", "B.", "entailment"], ["1", "A.", "B.", "contradiction"]])
    with pytest.raises(ValueError, match=r"RTE/train\.tsv:3: label 'contradiction' is not one of"):
        GLUEDataset(tmp_path, "rte", "train")
    write_tsv(tmp_path / "SST-2/dev.tsv", [["sentence", "label"], ["fine", "1"], ["a\ttab too many", "0"]])
    with pytest.raises(ValueError, match=r"SST-2/dev\.tsv:3: 3 fields, expected 2"):
        GLUEDataset(tmp_path, "sst2", "dev")
    write_tsv(tmp_path / "STS-B/train.tsv", [["sentence1", "sentence2", "score"], ["a", "b", "5.5"]])
    with pytest.raises(ValueError, match=r"STS-B/train\.tsv:2: score '5.5' is not a number from 0 to 5"):
        GLUEDataset(tmp_path, "stsb", "train")
    write_tsv(tmp_path / "QNLI/dev.tsv", [["index", "question", "label"], ["0", "q", "entailment"]])
    with pytest.raises(ValueError, match=r"QNLI/dev\.tsv:1: no column 'sentence'"):
        GLUEDataset(tmp_path, "qnli", "dev")


def cifar_batch(key_type, labels, seed):
    data = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return {key_type("batch_label"): key_type("batch"), key_type("labels"): labels, key_type("data"): data}, data


def write_cifar(root, writer, key_type):
    root.mkdir(parents=True, exist_ok=True)
    writer(root / "batching.meta", {key_type("label_names"): [key_type(f"class{k}") for k in range(10)],
                                   key_type("num_vis"): 3072})
    written = {}
    for k, name in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
        batch, data = cifar_batch(key_type, [k % 10, (k + 3) % 10], seed=k)
        writer(root / name, batch)
        written[name] = data
    return written


def pickle_py3(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("writer, key_type", [
    (write_py2_pickle, lambda s: s.encode()),  # a Python 2 pickle: str keys and a byte-string array
    (pickle_py3, lambda s: s.encode()),  # re-pickled after loading with encoding="bytes": bytes keys
    (pickle_py3, str),  # re-pickled with str keys
], ids=["python2", "bytes-keys", "str-keys"])
def test_cifar10_pickles_and_pixel_layout(tmp_path, writer, key_type):
    written = write_cifar(tmp_path / "cifar-10-batches-py", writer, key_type)
    train = CIFAR10Dataset(tmp_path / "cifar-10-batches-py", "train", to_tensor)
    test = CIFAR10Dataset(tmp_path / "cifar-10-batches-py", "test", to_tensor)
    assert len(train) == 10 and len(test) == 2 and train.label_names[3] == "class3"
    assert [train[i]["label"] for i in range(4)] == [0, 3, 1, 4] and test[1]["label"] == 8
    row = written["data_batch_2"][1]  # train item 3: R plane, then G, then B, each 32x32 row-major
    image = train[3]["image"]
    assert image.shape == (3, 32, 32)
    assert image[:, 0, 1].tolist() == [row[1], row[1024 + 1], row[2048 + 1]]
    assert image[0, 2, 5] == row[2 * 32 + 5]


def test_cifar10_label_outside_set(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root, pickle_py3, str)
    batch, _ = cifar_batch(str, [1, 10], seed=0)
    pickle_py3(root / "test_batch", batch)
    with pytest.raises(ValueError, match=r"test_batch: labels\[1\] = 10 is not a class 0..9"):
        CIFAR10Dataset(root, "test", to_tensor)
