"""zeroshot.py and the contrastive configs: retrieval by the similarity matrix, two-stage re-ranking, prompt-ensemble
classification, evaluate.py --zero_shot on real pretraining runs, and every contrastive config, run or refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import engine
import evaluate
import pretrain
import tasks
from config import load_config
import test_pretrain
import zeroshot
from model import build_pretrain_model
from tasks.retrieval import RETRIEVAL_METRICS, RetrievalSplit
from tiny import DUAL_ENCODER as DUAL, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
VOCAB = len(data.synthetic_tokenizer())  # the synthetic captions' ids must fit
CPU = engine.Dist(0, 0, 1, True, torch.device("cpu"), False)
# the tiny run of test_pretrain, each process's micro-batch one step's whole batch
TINY_RUN = test_pretrain.TINY_RUN + ["--micro_batch_size=8", "--max_steps=2", "--eval_interval=2",
                                     "--eval_batches=1", "--ckpt_interval=2", "--embed_dim=16"]


def test_rerank_rescores_exactly_each_querys_top_k():
    similarity = torch.tensor([[0.9, 0.1, 0.5, -0.2], [0.3, 0.8, 0.7, 0.0], [0.2, 0.6, -0.5, 0.4]])  # (3, 4)
    itm = torch.tensor([[1.0, 5.0, -2.0, 7.0], [4.0, -1.0, 3.0, 9.0], [0.0, 2.0, 6.0, 8.0]])  # the second stage
    asked = []

    def pair_scores(images, captions):
        asked.extend(zip(images.tolist(), captions.tolist()))
        return itm[images, captions]

    text_scores, image_scores = zeroshot.rerank(similarity, 2, pair_scores)
    assert len(asked) == len(set(asked))  # each pair scored once
    top_rows = {(i, j) for i in range(3) for j in similarity[i].topk(2).indices.tolist()}
    top_columns = {(i, j) for j in range(4) for i in similarity[:, j].topk(2).indices.tolist()}
    assert set(asked) == top_rows | top_columns
    for i in range(3):  # captions for picture i: its top 2 by similarity, ordered by ITM, then the rest by similarity
        top = similarity[i].topk(2).indices.tolist()
        rest = [j for j in similarity[i].argsort(descending=True).tolist() if j not in top]
        assert text_scores[i].argsort(descending=True).tolist() == sorted(top, key=lambda j: -itm[i, j]) + rest
    for j in range(4):
        top = similarity[:, j].topk(2).indices.tolist()
        rest = [i for i in similarity[:, j].argsort(descending=True).tolist() if i not in top]
        assert image_scores[:, j].argsort(descending=True).tolist() == sorted(top, key=lambda i: -itm[i, j]) + rest
    full, _ = zeroshot.rerank(similarity, 4, lambda images, captions: itm[images, captions])
    assert torch.equal(full.argsort(1), itm.argsort(1))  # k >= candidates: the full ITM ranking


class Pictures(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": 0}


def test_similarity_and_prompt_ensemble_are_the_embeddings_products():
    cfg = tiny_config(**DUAL, micro_batch_size=2, num_workers=0)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, VOCAB).eval()
    tokenizer = data.synthetic_tokenizer()
    images = torch.randn(5, 3, 32, 32)
    captions = ["a red circle", "two blue squares", "a star", "a green cross at the top", "a white diamond",
                "a red star"]
    split = RetrievalSplit(Pictures(images), np.arange(5), captions, np.array([0, 1, 2, 3, 4, 4]))
    with torch.no_grad():
        similarity = zeroshot.similarity_matrix(model, split, tokenizer, cfg, CPU)
        tokens = tokenizer(captions, padding="longest", return_tensors="pt")
        text = model.embed_text(tokens["input_ids"], tokens["attention_mask"])
        image = model.embed_image(images)
    torch.testing.assert_close(similarity, image @ text.T, rtol=1e-5, atol=1e-6)
    classes, prompts = ["circle", "star", "cross"], ["a red {}", "a {}"]
    with torch.no_grad():
        preds = zeroshot.zero_shot_classify(model, Pictures(images), classes, prompts, tokenizer, cfg, CPU)
        manual = []
        for name in classes:
            tokens = tokenizer([p.format(name) for p in prompts], padding="longest", return_tensors="pt")
            manual.append(F.normalize(model.embed_text(tokens["input_ids"], tokens["attention_mask"]).mean(0), dim=-1))
    assert preds.tolist() == (image @ torch.stack(manual).T).argmax(-1).tolist()
    with pytest.raises(ValueError, match="zero_shot_prompts"):
        zeroshot.zero_shot_classify(model, Pictures(images), classes, ["a photo"], tokenizer, cfg, CPU)
    with pytest.raises(ValueError, match="itc_weight > 0"):
        zeroshot.embedders(build_pretrain_model(tiny_config(), VOCAB))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def test_zero_shot_evaluation_of_a_dual_encoder_run(tmp_path, data_root):
    out = str(tmp_path / "dual")
    pretrain.main([str(ROOT / "configs" / "synthetic_dual_full.py"), *TINY_RUN, f"--data_root={data_root}",
                   f"--out_dir={out}"])
    val = [json.loads(line) for line in open(Path(out) / "log.jsonl") if '"split"' in line]
    assert {"itc_acc", "itc_loss"} <= set(val[-1])
    records = evaluate.main([out, "--zero_shot=true", "--task=coco_retrieval", "--synthetic_task=true"])
    assert set(records[0]["metrics"]) == {f"coco_{m}" for m in RETRIEVAL_METRICS}
    saved = json.loads((Path(out) / "eval" / "coco_retrieval_test_zero_shot_metrics.json").read_text())
    assert saved["metrics"] == records[0]["metrics"] and saved["zero_shot"]
    records = evaluate.main([out, "--zero_shot=true", "--task=cifar10", "--synthetic_task=true"])
    assert set(records[0]["metrics"]) == {"cifar10_acc"} and records[0]["items"] == 20
    config = tmp_path / "zero_shot_cifar10.py"  # a config file naming the run by init_from, writing elsewhere
    config.write_text(f"zero_shot = True\ninit_from = {out!r}\ntask = 'cifar10'\nsynthetic_task = True\n"
                      f"data_root = {data_root!r}\nsynthetic_images = 64\nsynthetic_image_size = 32\nimage_size = 32\n"
                      f"out_dir = {str(tmp_path / 'zs')!r}\n")
    again = evaluate.main([str(config), "--num_workers=0", "--device=cpu"])
    assert again[0]["metrics"] == records[0]["metrics"] and again[0]["run"] == str(tmp_path / "zs")
    assert (tmp_path / "zs" / "eval" / "cifar10_test_zero_shot_metrics.json").exists()
    with pytest.raises(ValueError, match="zero_shot: task='snli_ve'"):
        evaluate.main([out, "--zero_shot=true", "--task=snli_ve", "--synthetic_task=true"])


def test_two_stage_retrieval_of_a_two_tower_run_with_itc(tmp_path, data_root):
    """rerank_k = 0 ranks every pair with ITM; k at least the candidates gives exactly that ranking again.
    (Pretrained with hard ITM negatives: pretrain.py hands the model the draws they need.)"""
    out = str(tmp_path / "itc")
    pretrain.main([str(ROOT / "configs" / "synthetic_twotower_itc.py"), *TINY_RUN, f"--data_root={data_root}",
                   f"--out_dir={out}", "--itm_hard_negatives=true"])
    args = [out, "--zero_shot=true", "--task=coco_retrieval", "--synthetic_task=true"]
    full = evaluate.main(args)[0]["metrics"]
    everything = evaluate.main(args + ["--retrieval_rerank_k=1000"])[0]["metrics"]
    assert everything == full
    two_stage = evaluate.main(args + ["--retrieval_rerank_k=1"])[0]
    assert two_stage["retrieval_rerank_k"] == 1 and set(two_stage["metrics"]) == set(full)


SYNTHETIC_CONFIGS = ["synthetic_dual_full.py", "synthetic_dual_lit.py", "synthetic_dual_lilt.py",
                     "synthetic_twotower_itc.py"]


@pytest.mark.parametrize("config", SYNTHETIC_CONFIGS[1:3])
def test_synthetic_contrastive_configs_run(config, tmp_path, data_root):
    out = str(tmp_path / "run")
    pretrain.main([str(ROOT / "configs" / config), f"--data_root={data_root}", f"--out_dir={out}",
                   "--synthetic_images=64", "--synthetic_image_size=32", "--max_steps=1", "--batch_size=8",
                   "--micro_batch_size=8",
                   "--warmup_steps=1", "--eval_interval=1", "--eval_batches=1", "--num_workers=0", "--device=cpu"])
    assert (Path(out) / "ckpt_1.pt").exists()


@pytest.mark.parametrize("config", ["dual_full.py", "dual_lit.py", "dual_lilt.py", "twotower_itc.py"])
def test_contrastive_paper_configs_fail_offline_with_one_line(config, tmp_path):
    with pytest.raises(ValueError) as err:
        pretrain.main([str(ROOT / "configs" / config), f"--data_root={tmp_path}", f"--out_dir={tmp_path / 'run'}"])
    assert "\n" not in str(err.value) and "could not load" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_lilt_trains_under_seven_percent_of_its_towers():
    """configs/dual_lilt.py at its towers' exact sizes (BERT-base, ViT-B/16), built from random init on the meta
    device (no download, no memory): under 7% of the parameters train, some in each tower."""
    from model import apply_freezing, parameter_summary
    cfg = load_config([str(ROOT / "configs" / "dual_lilt.py"), "--random_init_towers=true"])
    with torch.device("meta"):
        model = build_pretrain_model(cfg, 30522)  # bert-base-uncased's vocabulary
    apply_freezing(model, cfg)
    rows = {name: (trainable, total) for name, trainable, total in parameter_summary(model)}
    assert 190e6 < rows["total"][1] < 215e6
    assert rows["total"][0] / rows["total"][1] < 0.07
    assert 0 < rows["text_tower"][0] < 0.07 * rows["text_tower"][1]
    assert 0 < rows["vision_tower"][0] < 0.07 * rows["vision_tower"][1]


def test_fine_tuning_a_dual_encoder_on_retrieval_is_refused_in_one_line():
    """A pair head over a dual encoder's two separate embeddings would score w·t + u·v, which cannot rank
    captions against pictures: fine-tuning refuses it and points to zero-shot evaluation."""
    from encoders import build_encoder
    encoder = build_encoder(tiny_config(**DUAL), 60)
    for name in ("coco_retrieval", "f30k_retrieval"):
        with pytest.raises(ValueError, match="zero_shot=true") as err:
            tasks.get_task(name).build_model(encoder, [])
        assert "\n" not in str(err.value) and f"task={name}" in str(err.value)
