"""Export a trained run to Hugging Face format, so that the model can leave the platform.

    python export.py out/freeze_vision --out exported/freeze_vision      (a run directory: its newest checkpoint)
    python export.py out/nlvr2/ckpt_5000.pt --out exported/nlvr2        (one checkpoint)

Writes DIR (first beside it under a hidden name, renamed onto DIR when complete; an existing DIR is refused):

  text_tower/     save_pretrained output and the run's tokenizer: AutoModel / AutoTokenizer.from_pretrained
  vision_tower/   save_pretrained output and preprocessor_config.json (the run's image_size, image_mean,
                  image_std): AutoModel / AutoImageProcessor.from_pretrained
                  (a one-tower model has one of the two: its stack with its own modality's embeddings)
  tokenizer/      the run's tokenizer (the synthetic one too): tokenizer=DIR/tokenizer in a config
  model.safetensors, vlenc.json   the whole model (fusion layers and heads too) and its resolved config, the
                  towers' Hugging Face configs and a fine-tuned run's labels: model.load_exported(DIR)

The model is rebuilt from the towers' configs recorded in the checkpoint, so the towers' hub names or
directories need not be reachable; the tokenizer is rebuilt from the run's `tokenizer` setting.
"""

import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_model
from transformers import CLIPImageProcessor, ViTImageProcessor

import data
import engine
from config import Config, KEY_TYPES, main_guard
from encoders import hf_towers
from model import EXPORT_CONFIG, EXPORT_WEIGHTS, build_run_model

USAGE = "usage: export.py RUN_DIR|CHECKPOINT --out DIR"


def parse_args(argv):
    """(source, out) from `SOURCE --out DIR` (or --out=DIR), in any order."""
    args, source, out = list(argv), None, None
    while args:
        arg = args.pop(0)
        if arg == "--out" and args:
            out = args.pop(0)
        elif arg.startswith("--out="):
            out = arg.removeprefix("--out=")
        elif not arg.startswith("--") and source is None:
            source = arg
        else:
            raise ValueError(f"unexpected argument {arg!r}; {USAGE}")
    if not source or not out:
        raise ValueError(USAGE)
    return source, out


def image_processor(cfg):
    """The run's evaluation transform as a Hugging Face image processor: data.build_transform's resize
    (image_resize "squash": bilinear to the square; "crop": the shorter side to image_size, bicubic, then the
    centre square), then what the model's PixelNormalize does (scale to [0, 1], normalise with image_mean /
    image_std)."""
    scale = dict(do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(cfg.image_mean),
                 image_std=list(cfg.image_std))
    if cfg.image_resize == "crop":
        return CLIPImageProcessor(do_resize=True, size={"shortest_edge": cfg.image_size}, do_center_crop=True,
                                  crop_size={"height": cfg.image_size, "width": cfg.image_size},
                                  resample=Image.Resampling.BICUBIC, do_convert_rgb=True, **scale)
    return ViTImageProcessor(do_resize=True, size={"height": cfg.image_size, "width": cfg.image_size},
                             resample=Image.Resampling.BILINEAR, **scale)


def load_run(checkpoint):
    """(model with the checkpoint's weights, its config, tokenizer, labels or None, step)."""
    ckpt = engine.read_checkpoint(checkpoint)
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k in KEY_TYPES})
    tokenizer = data.build_tokenizer(cfg)
    labels = None
    if cfg.task:  # a fine-tuned run: what its head's outputs mean lies beside the checkpoint (finetune.py)
        labels_path = Path(checkpoint).parent / "labels.json"
        if not labels_path.is_file():
            raise FileNotFoundError(f"{checkpoint}: a {cfg.task} checkpoint, but {labels_path} is missing")
        labels = json.loads(labels_path.read_text())
    model = build_run_model(cfg, len(tokenizer), ckpt.get("tower_configs"), labels)
    engine.check_same_architecture(checkpoint, model.state_dict(), ckpt["model"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, tokenizer, labels, ckpt["step"]


def export(source, out):
    """Write the export of `source` (a run directory or a checkpoint) to directory `out`; returns its path."""
    checkpoint = engine.resolve_checkpoint(source, "export source")
    out = Path(out)
    if out.exists():
        raise ValueError(f"--out {out} already exists: pick a new directory")
    model, cfg, tokenizer, labels, step = load_run(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for modality, tower in hf_towers(model.encoder).items():
            tower_dir = staging / f"{modality}_tower"
            tower.save_pretrained(tower_dir)
            (tokenizer if modality == "text" else image_processor(cfg)).save_pretrained(tower_dir)
        tokenizer.save_pretrained(staging / "tokenizer")
        save_model(model, str(staging / EXPORT_WEIGHTS))
        saved = {"config": asdict(cfg), "tower_configs": model.tower_configs(), "vocab_size": len(tokenizer),
                 "labels": labels, "step": step, "checkpoint": os.path.abspath(checkpoint)}
        (staging / EXPORT_CONFIG).write_text(json.dumps(saved, indent=2))
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv):
    source, out = parse_args(argv)
    path = export(source, out)
    print(f"exported {source} to {path}")


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
