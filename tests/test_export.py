"""export.py and model.load_exported: a trained tiny model leaves the platform as Hugging Face tower directories
(AutoModel / AutoTokenizer / AutoImageProcessor load them alone) and as one safetensors file that model.py
loads with no access to the original towers; checkpoints rebuild after the towers' directories are deleted."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

import data
import engine
import evaluate
import export
import finetune
import pretrain
from config import Config, main_guard
from encoders import PixelNormalize
from model import PretrainModel, build_pretrain_model, load_exported
from tiny import tiny_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

WORLD = ["--corpora=synthetic", "--tokenizer=synthetic", "--synthetic_images=64", "--synthetic_image_size=32",
         "--image_size=32", "--image_mean=0.48,0.46,0.41", "--image_std=0.27,0.26,0.28", "--num_workers=0",
         "--device=cpu"]
TRAIN = ["--cross_layers=2", "--cross_hidden=32", "--cross_heads=2", "--cross_mlp_ratio=2", "--cross_dropout=0",
         "--max_text_len=16", "--batch_size=4", "--micro_batch_size=4", "--max_steps=1", "--warmup_steps=0",
         "--lr=1e-2", "--log_interval=1", "--eval_interval=1", "--eval_batches=1", "--ckpt_interval=1"]


def save_tower_directories(root):
    """Tiny BERT and ViT saved as a user's local tower directories would be (save_pretrained output)."""
    torch.manual_seed(0)
    vocab = len(data.synthetic_tokenizer())
    text = BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0), add_pooling_layer=False)
    vision = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                      add_pooling_layer=False)
    text.save_pretrained(root / "text")
    vision.save_pretrained(root / "vision")
    return root / "text", root / "vision"


def fixed_batch(cfg, vocab_size):
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, vocab_size, (2, 7), generator=g)
    input_ids[:, 0] = 2
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"pixel_values": torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g), "input_ids": input_ids,
            "attention_mask": mask, "mlm_input_ids": input_ids.clone(), "mlm_labels": input_ids.clone(),
            "itm_image_index": torch.tensor([1, 0]), "itm_labels": torch.tensor([1, 1]),
            "mlm_positions": PretrainModel.mlm_positions(input_ids, torch.tensor([1, 1]), cfg.pretrain_pass)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-tower model from local tower directories, trained one step; then the directories are deleted.
    Returns (run directory, the checkpoint's model rebuilt while the towers existed, its config, data_root)."""
    root = tmp_path_factory.mktemp("export")
    text_dir, vision_dir = save_tower_directories(root / "towers")
    run_dir = root / "run"
    pretrain.main(WORLD + TRAIN + [f"--data_root={root / 'data'}", f"--out_dir={run_dir}", f"--text_tower={text_dir}",
                                   f"--vision_tower={vision_dir}"])
    ckpt = torch.load(engine.latest_checkpoint(run_dir), weights_only=True)
    assert set(ckpt["tower_configs"]) == {"text", "vision"}
    cfg = Config(**ckpt["config"])
    reference = build_pretrain_model(cfg, len(data.synthetic_tokenizer()))
    reference.load_state_dict(ckpt["model"])
    shutil.rmtree(root / "towers")  # from here on, nothing may need the towers' source
    return run_dir, reference.eval(), cfg, root / "data"


def test_towers_load_with_automodel_alone(trained, tmp_path):
    run_dir, reference, cfg, _ = trained
    out = export.export(str(run_dir), tmp_path / "exported")
    batch = fixed_batch(cfg, len(data.synthetic_tokenizer()))
    text = AutoModel.from_pretrained(out / "text_tower").eval()
    vision = AutoModel.from_pretrained(out / "vision_tower").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state,
            reference.encoder.text_tower(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state, rtol=0, atol=0)
        torch.testing.assert_close(vision(pixel_values=batch["pixel_values"]).last_hidden_state,
                                   reference.encoder.vision_tower(pixel_values=batch["pixel_values"]).last_hidden_state,
                                   rtol=0, atol=0)
    # the tokenizer travels with the text tower, and as its own directory for tokenizer=DIR/tokenizer
    caption = "a small red circle left of a blue square"
    for where in ("text_tower", "tokenizer"):
        assert AutoTokenizer.from_pretrained(out / where)(caption)["input_ids"] == \
            data.synthetic_tokenizer()(caption)["input_ids"]
    # the image processor does what the run's evaluation transform does
    processor = AutoImageProcessor.from_pretrained(out / "vision_tower")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.testing.assert_close(processor(picture, return_tensors="pt")["pixel_values"][0],
                               run_pixels(cfg, picture), rtol=0, atol=1e-5)
    assert processor.size == {"height": 32, "width": 32}


def run_pixels(cfg, picture):
    """What the run's model sees: the evaluation transform's uint8 pixels, normalised as PixelNormalize does."""
    return PixelNormalize(cfg.image_mean, cfg.image_std)(data.build_transform(cfg, train=False)(picture)[None])[0]


def test_image_processor_crops_as_the_run_does():
    """image_resize="crop" (the paper configs'): shorter side to image_size, bicubic, centre square, ImageNet
    statistics; the exported processor gives the run's pixels up to resampling rounding (PIL against torchvision's
    bicubic) and shows the same picture: the left and right bands are cut off, as the run's transform cuts them."""
    cfg = tiny_config(image_size=16, image_resize="crop", image_mean=(0.485, 0.456, 0.406),
                      image_std=(0.229, 0.224, 0.225))
    processor = export.image_processor(cfg)
    smooth = np.tile(np.linspace(0, 255, 48, dtype=np.float32)[None, :, None], (24, 1, 3))
    smooth[:, :8] = smooth[:, -8:] = 0  # black bands outside the centre square
    picture = Image.fromarray(smooth.astype(np.uint8))
    ours, theirs = run_pixels(cfg, picture), processor(picture, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 16, 16)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0.15)
    squash = run_pixels(dataclasses.replace(cfg, image_resize="squash"), picture)
    assert (squash - ours).abs().max() > 1.0  # a squashed picture keeps the bands: the test can tell them apart


def test_load_exported_gives_the_same_model(trained, tmp_path):
    run_dir, reference, cfg, _ = trained
    main_guard(lambda: export.main([str(run_dir), "--out", str(tmp_path / "exported")]))
    model, saved_config = load_exported(tmp_path / "exported")
    assert saved_config["text_tower"] == cfg.text_tower and not model.training
    batch = fixed_batch(cfg, len(data.synthetic_tokenizer()))
    with torch.no_grad():
        a = reference.encoder(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        b = model.encoder(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        for field in ("text_feats", "image_feats", "pooled"):
            torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=0)
        losses_a, losses_b = reference(batch), model(batch)  # the heads came along
    assert losses_a.keys() == losses_b.keys() == {"loss", "mlm_loss", "mlm_acc", "itm_loss", "itm_acc"}
    for name in losses_a:
        torch.testing.assert_close(losses_b[name], losses_a[name], rtol=0, atol=0)


@pytest.mark.parametrize("stack", ["text", "vision"])
def test_one_tower_stack_exports_as_its_hugging_face_model(stack, tmp_path):
    """A one-tower model's stack leaves as the Hugging Face model it came from, its weights being the encoder's."""
    cfg = tiny_config(model_type="one_tower", onetower_stack=stack)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, len(data.synthetic_tokenizer()))
    (tmp_path / "run").mkdir()
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "step": 0,
                "tower_configs": model.tower_configs()}, tmp_path / "run" / "ckpt_0.pt")
    out = export.export(str(tmp_path / "run" / "ckpt_0.pt"), tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted([f"{stack}_tower", "tokenizer"])
    tower = AutoModel.from_pretrained(out / f"{stack}_tower").state_dict()
    encoder = model.encoder.state_dict()
    embeddings = "text_embeddings." if stack == "text" else "image_embeddings."
    mapped = {"embeddings.": embeddings, "encoder.layer.": "layers.", "layers.": "layers.", "layernorm.": "final_norm."}
    checked = 0
    for key, value in tower.items():
        prefix = next((p for p in mapped if key.startswith(p)), None)
        if prefix is None:
            assert key.startswith("pooler."), key  # AutoModel adds the pooler the project never builds
            continue
        torch.testing.assert_close(value, encoder[mapped[prefix] + key.removeprefix(prefix)], rtol=0, atol=0)
        checked += 1
    assert checked == len([k for k in encoder if k.startswith((embeddings, "layers.", "final_norm."))])
    exported, _ = load_exported(out)
    batch = fixed_batch(cfg, len(data.synthetic_tokenizer()))
    with torch.no_grad():
        torch.testing.assert_close(exported(batch)["loss"], model.eval()(batch)["loss"], rtol=0, atol=0)


def test_fine_tuning_and_evaluation_need_no_tower_source(trained, tmp_path):
    """init_from a checkpoint whose tower directories are gone, then evaluate.py on the fine-tuned run, then
    export of the fine-tuned run with its labels."""
    run_dir, reference, _, data_root = trained
    out = tmp_path / "snli_ve"
    finetune.main(WORLD + TRAIN + [f"--data_root={data_root}", f"--out_dir={out}", "--task=snli_ve",
                                   "--synthetic_task=True", f"--init_from={run_dir}"])
    weights = torch.load(engine.latest_checkpoint(out), weights_only=True)
    assert weights["tower_configs"]["text"]["hidden_size"] == 32
    records = evaluate.main([str(out), "--eval_splits=dev"])
    assert [r["split"] for r in records] == ["dev"] and "snli_ve_acc" in records[0]["metrics"]
    exported = export.export(str(out), tmp_path / "exported")
    model, saved_config = load_exported(exported)
    assert saved_config["task"] == "snli_ve"
    assert json.loads((exported / "vlenc.json").read_text())["labels"] == json.loads((out / "labels.json").read_text())
    state = weights["model"]
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_pretraining_resumes_without_tower_source(trained, tmp_path):
    run_dir, *_ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    text_tower = json.loads((resumed / "config.json").read_text())["text_tower"]
    assert not Path(text_tower).exists()
    pretrain.main(WORLD + TRAIN + [f"--data_root={trained[3]}", f"--out_dir={resumed}", f"--text_tower={text_tower}",
                                   f"--vision_tower={text_tower.removesuffix('text')}vision", "--max_steps=2"])
    assert [json.loads(line)["step"] for line in open(resumed / "log.jsonl")] == [1, 1, 2, 2]


def test_export_refuses_bad_input_in_one_line(trained, tmp_path, capsys):
    run_dir, *_ = trained
    done = subprocess.run([sys.executable, "export.py", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no such checkpoint file" in done.stderr
    (tmp_path / "taken").mkdir()
    for argv, message in (([str(run_dir), f"--out={tmp_path / 'taken'}"], "already exists"),
                          ([str(run_dir)], "usage: export.py"), ([str(run_dir), "--out"], "usage: export.py")):
        with pytest.raises(SystemExit) as exit_status:
            main_guard(lambda: export.main(argv))
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_status.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "a").exists() and not list((tmp_path / "taken").iterdir())
