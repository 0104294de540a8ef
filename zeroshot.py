"""Evaluation of contrastively trained encoders as they are, with no fine-tuning.

  retrieval     a dual encoder embeds each picture and caption once and ranks by the full similarity matrix;
                a two-tower model trained with ITC ranks by ITC and re-scores each query's top retrieval_rerank_k
                candidates with its ITM head (two-stage); retrieval_rerank_k = 0, or no ITC, scores every pair
                with the ITM head (full cross-encoder ranking)
  classification  CIFAR-10 (and its synthetic version) from class-name prompts: each class is the normalised
                mean of its prompts' embeddings, each picture takes the class of highest cosine similarity

evaluate.py runs them for `zero_shot=True` (evaluate_zero_shot): on a pretraining run directory, or on the
checkpoint init_from names, writing metrics to out_dir/eval/ and a line to out_dir/log.jsonl.
"""

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader, Subset

import data
import engine
import tasks
import tasks.retrieval
import world
from contrastive import DualEncoder, ITCHead
from encoders import Embedded
from model import build_pretrain_model
from tasks.retrieval import RetrievalModel, RetrievalSplit

# CLIP-style photo prompts for real pictures; "{}" is the class name
PHOTO_PROMPTS = ("a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.",
                 "a photo of the small {}.", "a photo of the big {}.", "a cropped photo of a {}.",
                 "a drawing of a {}.", "a painting of a {}.")
ZERO_SHOT_TASKS = ("cifar10", "coco_retrieval", "f30k_retrieval")
# the pretraining keys that decide which heads a pretraining checkpoint holds
HEAD_KEYS = ("mlm_weight", "itm_weight", "itc_weight", "itm_hard_negatives", "pretrain_pass")


def synthetic_prompts():
    """The synthetic world's captions name a shape with its colour ('a red circle'): one prompt per colour."""
    return tuple(f"a {colour} {{}}" for colour in world.COLOURS)


# -----------------------------------------------------------------------------
# Embeddings


def embedders(model):
    """(embed_text(input_ids, attention_mask) -> (B, E), embed_image(pixel_values) -> (B, E)), unit vectors, of a
    dual encoder or of a two-tower model with an ITC head."""
    enc = model.encoder
    if isinstance(enc, DualEncoder):
        return (lambda ids, mask: enc.embed(enc.encode_text(ids, mask)),
                lambda pixels: enc.embed(enc.encode_image(pixels)))
    head = getattr(model, "itc_head", None)
    if isinstance(head, ITCHead):
        return (lambda ids, mask: head.embed_text(enc.encode_text(ids, mask)),
                lambda pixels: head.embed_image(enc.encode_image(pixels)))
    raise ValueError("this model has no image-text embedding: zero-shot classification and ranking by similarity "
                     "need a dual encoder or a two-tower model pretrained with itc_weight > 0")


def _rows_of_every_process(compute, count, dist):
    """compute(rows) -> tensor (len(rows), ...) for a list of row indices; process r computes rows r, r + W, ...
    and every process gets all `count` rows, in order, on the CPU."""
    rows = list(range(dist.rank, count, dist.world_size))
    part = compute(rows).cpu() if rows else None
    if not dist.is_ddp:
        return part
    parts = [None] * dist.world_size
    tdist.all_gather_object(parts, part)
    shape = next(p for p in parts if p is not None).shape[1:]
    full = torch.empty((count, *shape), dtype=next(p for p in parts if p is not None).dtype)
    for rank, p in enumerate(parts):
        if p is not None:
            full[rank::dist.world_size] = p
    return full


def _image_batches(dataset, rows, cfg):
    loader = DataLoader(Subset(dataset, rows), batch_size=cfg.micro_batch_size, num_workers=cfg.num_workers)
    return (batch["image"] for batch in loader)


def _tokens(texts, tokenizer, cfg, device):
    tokens = tokenizer(list(texts), padding="longest", truncation=True, max_length=cfg.max_text_len,
                       return_tensors="pt")
    return tokens["input_ids"].long().to(device), tokens["attention_mask"].long().to(device)


def embed_texts(embed_text, texts, tokenizer, cfg, device):
    """(n, E) embeddings of a list of strings, micro_batch_size at a time."""
    parts = []
    for i in range(0, len(texts), cfg.micro_batch_size):
        parts.append(embed_text(*_tokens(texts[i:i + cfg.micro_batch_size], tokenizer, cfg, device)).float())
    return torch.cat(parts)


def embed_images(embed_image, dataset, rows, cfg, device):
    """(len(rows), E) embeddings of the pictures (items {"image": (3, H, W)}) at `rows` of a dataset."""
    return torch.cat([embed_image(images.to(device)).float() for images in _image_batches(dataset, rows, cfg)])


def similarity_matrix(model, split, tokenizer, cfg, dist):
    """(n_images, n_captions) cosine similarities of a RetrievalSplit: each picture and each caption
    embedded once, spread over the processes."""
    embed_text, embed_image = embedders(model)
    images = _rows_of_every_process(lambda rows: embed_images(embed_image, split.images, rows, cfg, dist.device),
                                    len(split), dist)
    texts = _rows_of_every_process(lambda rows: embed_texts(embed_text, [split.captions[i] for i in rows],
                                                            tokenizer, cfg, dist.device), len(split.captions), dist)
    return images @ texts.T


# -----------------------------------------------------------------------------
# Retrieval: by similarity, by the ITM head, or two-stage


class ITMMatcher:
    """A pretraining model seen as a fine-tuned retrieval model (RetrievalModel): match(text, image) -> (N,)
    is its ITM match logit minus its mismatch logit."""

    def __init__(self, model):
        self.encoder, self.itm_head = model.encoder, model.itm_head

    def match(self, text, image):
        logits = self.itm_head(self.encoder.fuse(text, image, cls_only=("text", "image")).pooled)  # (N, 2)
        return logits[:, 1] - logits[:, 0]


def matcher(model):
    """The model's pair scorer: a fine-tuned retrieval model itself, or a pretraining model's ITM head."""
    if hasattr(model, "match"):
        return model
    if getattr(model, "itm_head", None) is None:
        raise ValueError("ranking pairs needs an ITM head (itm_weight > 0) or a fine-tuned retrieval model")
    return ITMMatcher(model)


def match_scores(model, split, tokenizer, cfg, dist, image_rows, caption_rows):
    """Match scores (N,) of the pairs (image_rows[n], caption_rows[n]) of a RetrievalSplit: every picture
    and caption encoded once, the pairs fused eval_pairs_batch at a time, spread over the processes."""
    scorer, device = matcher(model), dist.device
    enc = scorer.encoder
    parts = [enc.encode_image(images.to(device)) for images in _image_batches(split.images, range(len(split)), cfg)]
    images = Embedded(torch.cat([p.feats for p in parts]), torch.cat([p.mask for p in parts]))  # (n_images, P, D)
    ids, mask = _tokens(split.captions, tokenizer, cfg, device)  # one padded length, so the features stack
    parts = [enc.encode_text(ids[i:i + cfg.micro_batch_size], mask[i:i + cfg.micro_batch_size])
             for i in range(0, len(ids), cfg.micro_batch_size)]
    texts = Embedded(torch.cat([p.feats for p in parts]), torch.cat([p.mask for p in parts]))  # (n_captions, T, D)

    def compute(rows):
        rows, step = torch.tensor(rows), cfg.eval_pairs_batch
        return torch.cat([scorer.match(texts.select(caption_rows[rows[i:i + step]].to(device)),
                                       images.select(image_rows[rows[i:i + step]].to(device))).float()
                          for i in range(0, len(rows), step)])

    return _rows_of_every_process(compute, len(image_rows), dist)


def rerank(similarity, k, pair_scores):
    """Two-stage ranking: each picture's top k captions and each caption's top k pictures by `similarity`
    (n_images, n_captions) are re-scored by pair_scores(image_rows, caption_rows) -> (N,) and ranked by it, above
    every candidate not re-scored (those keep their similarity order). Each pair is scored once, though it may be
    a candidate in both directions. Returns (scores for text retrieval, scores for image retrieval), both
    (n_images, n_captions): rows rank captions for a picture, columns pictures for a caption."""
    n_images, n_captions = similarity.shape
    top_captions = similarity.topk(min(k, n_captions), dim=1).indices  # (n_images, k)
    top_images = similarity.topk(min(k, n_images), dim=0).indices  # (k, n_captions)
    flat = torch.cat([(torch.arange(n_images)[:, None] * n_captions + top_captions).flatten(),
                      (top_images * n_captions + torch.arange(n_captions)[None, :]).flatten()]).unique()
    scores = pair_scores(flat // n_captions, flat % n_captions).float().cpu()  # (N,)
    rescored = torch.zeros(n_images * n_captions)
    rescored[flat] = scores
    rescored = rescored.view(n_images, n_captions)
    below = similarity.float() + (scores.min() - 3.0)  # cosine in [-1, 1]: every such score is below the re-scored
    text_scores = below.scatter(1, top_captions, rescored.gather(1, top_captions))
    image_scores = below.scatter(0, top_images, rescored.gather(0, top_images))
    return text_scores, image_scores


def retrieval_scores(model, split, tokenizer, cfg, dist):
    """(text-retrieval scores, image-retrieval scores), each (n_images, n_captions): by similarity for a dual
    encoder; two-stage for a two-tower model with ITC and retrieval_rerank_k > 0; else the ITM head on all pairs."""
    if isinstance(model.encoder, DualEncoder):
        similarity = similarity_matrix(model, split, tokenizer, cfg, dist)
        return similarity, similarity
    if cfg.retrieval_rerank_k > 0:
        similarity = similarity_matrix(model, split, tokenizer, cfg, dist)  # refuses a model without ITC
        return rerank(similarity, cfg.retrieval_rerank_k,
                      lambda images, captions: match_scores(model, split, tokenizer, cfg, dist, images, captions))
    full = torch.from_numpy(tasks.retrieval.retrieval_scores(matcher(model), split, tokenizer, cfg, dist))
    return full, full


# -----------------------------------------------------------------------------
# Classification from class-name prompts


def class_embeddings(embed_text, class_names, prompts, tokenizer, cfg, device):
    """(C, E): for each class, the normalised mean of its prompts' normalised embeddings (CLIP's ensemble)."""
    for prompt in prompts:
        if prompt.count("{}") != 1:
            raise ValueError(f"zero_shot_prompts: {prompt!r} must hold '{{}}' (the class name) exactly once")
    texts = [prompt.format(name) for name in class_names for prompt in prompts]
    embeddings = embed_texts(embed_text, texts, tokenizer, cfg, device).view(len(class_names), len(prompts), -1)
    return torch.nn.functional.normalize(embeddings.mean(1), dim=-1)


def zero_shot_classify(model, dataset, class_names, prompts, tokenizer, cfg, dist):
    """(n,) predicted class of each picture of `dataset` (items {"image"}), spread over the processes."""
    embed_text, embed_image = embedders(model)
    classes = class_embeddings(embed_text, class_names, prompts, tokenizer, cfg, dist.device)  # (C, E)
    predict = lambda rows: (embed_images(embed_image, dataset, rows, cfg, dist.device) @ classes.T).argmax(-1)
    return _rows_of_every_process(predict, len(dataset), dist).numpy()


# -----------------------------------------------------------------------------
# evaluate.py's zero-shot path


def load_pretraining_model(cfg, dist):
    """(cfg with the pretraining run's architecture, the pretraining model with its weights, checkpoint path,
    step) from init_from, or from out_dir itself when init_from is empty."""
    source = engine.resolve_checkpoint(cfg.init_from or cfg.out_dir, "init_from")
    checkpoint = engine.read_checkpoint(source, mmap=True)
    saved = checkpoint["config"]
    cfg = engine.adopt_architecture(cfg, saved, source, verbose=dist.master)
    cfg = dataclasses.replace(cfg, **{key: saved[key] for key in HEAD_KEYS + ("text_align", "vision_align",
                                                                               "adapter_reduction")})
    tokenizer = data.build_tokenizer(cfg)
    model = build_pretrain_model(cfg, len(tokenizer), checkpoint.get("tower_configs"))
    engine.check_same_architecture(source, model.state_dict(), checkpoint["model"])
    model.load_state_dict(checkpoint["model"])
    return cfg, model.to(dist.device).eval(), tokenizer, source, checkpoint["step"]


def evaluate_zero_shot(cfg, dist):
    """Score a pretraining checkpoint with no fine-tuning on cfg.task (cifar10, coco_retrieval, f30k_retrieval)
    for each split of eval_splits; returns one record per split, as evaluate.evaluate_run does."""
    if cfg.task not in ZERO_SHOT_TASKS:
        raise ValueError(f"zero_shot: task={cfg.task!r} is not one of {', '.join(ZERO_SHOT_TASKS)}")
    task = tasks.get_task(cfg.task)
    cfg, model, tokenizer, source, step = load_pretraining_model(cfg, dist)
    transform = data.build_transform(cfg, train=False)
    label_names = task.label_names(cfg)
    prompts = list(cfg.zero_shot_prompts) or list(synthetic_prompts() if cfg.synthetic_task else PHOTO_PROMPTS)
    records = []
    for split in task.evaluation_splits(cfg):
        dataset = task.eval_dataset(cfg, split, transform, label_names)
        start = time.time()
        with torch.no_grad(), engine.autocast_context(dist.device, cfg.dtype):
            if cfg.task == "cifar10":
                metrics = task.score(zero_shot_classify(model, dataset, label_names, prompts, tokenizer, cfg, dist),
                                     dataset, split)
            else:
                text_scores, image_scores = (s.numpy() for s in retrieval_scores(model, dataset, tokenizer, cfg, dist))
                metrics = {**{k: v for k, v in task.score(text_scores, dataset, split).items() if "_tr_" in k},
                           **{k: v for k, v in task.score(image_scores, dataset, split).items() if "_ir_" in k}}
        record = {"task": task.name, "split": split, "step": step, "checkpoint": os.path.basename(source),
                  "model": os.path.dirname(source), "items": len(dataset), "zero_shot": True,
                  "retrieval_rerank_k": cfg.retrieval_rerank_k, "seconds": round(time.time() - start, 2),
                  "metrics": metrics}
        if dist.master:
            eval_dir = Path(cfg.out_dir) / "eval"
            eval_dir.mkdir(parents=True, exist_ok=True)
            (eval_dir / f"{task.name}_{split}_zero_shot_metrics.json").write_text(json.dumps(record, indent=2))
            engine.JsonlLogger(os.path.join(cfg.out_dir, "log.jsonl")).log({"step": step, "split": split,
                                                                             "zero_shot": True, **metrics})
            print(f"{source} zero-shot {task.name} {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                  + f" ({record['seconds']} s)")
        records.append(record)
    return records
