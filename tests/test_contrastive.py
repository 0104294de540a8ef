"""contrastive.py: the dual encoder, the ITC loss (CLIP's, written out by hand here), its gather across processes
(two processes with batch B == one with 2B, losses and gradients), ITC and hard negatives in the two-tower model."""

import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from contrastive import ContrastiveLoss, DualEncoder, DualEncoderPretrainModel, draw_hard_negatives
from encoders import EncoderOutput, build_encoder
from model import PretrainModel, apply_freezing, build_pretrain_model
from tiny import DUAL_ENCODER as DUAL, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 60


def make_batch(B=4, T=7, seed=0, image_ids=None):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (B, T), generator=g)
    input_ids[:, 0] = 2
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    labels = torch.full((B, T), -100)
    labels[:, 2] = input_ids[:, 2]
    mlm_input_ids = input_ids.clone()
    mlm_input_ids[:, 2] = 4
    itm_labels = torch.tensor([i % 2 for i in range(B)])
    return dict(pixel_values=torch.randn(B, 3, 32, 32, generator=g), input_ids=input_ids, attention_mask=mask,
                mlm_input_ids=mlm_input_ids, mlm_labels=labels,
                image_ids=torch.arange(B) if image_ids is None else image_ids,
                itm_image_index=torch.tensor([(i + 1) % B if itm_labels[i] == 0 else i for i in range(B)]),
                itm_labels=itm_labels, itm_negative_draw=torch.rand(B, generator=g),
                mlm_positions=PretrainModel.mlm_positions(labels, itm_labels, "separate"))


FAMILIES = {"bert+vit": dict(), "electra+deit": dict(text_tower="electra", text_embedding_size=16, vision_tower="deit"),
            "roberta+beit": dict(text_tower="roberta", vision_tower="beit")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_dual_encoder_joins_the_output_contract(family, pooling):
    cfg = tiny_config(**DUAL, **FAMILIES[family], embed_pooling=pooling)
    torch.manual_seed(0)
    enc = build_encoder(cfg, VOCAB).eval()
    assert isinstance(enc, DualEncoder) and enc.dim == 24 and enc.pooled_dim == 48
    assert not hasattr(enc, "cross_layers")  # no fusion
    batch = make_batch()
    with torch.no_grad():
        out = enc(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        text_only = enc(batch["input_ids"], batch["attention_mask"])
        image_only = enc(pixel_values=batch["pixel_values"])
    patches = 16 + (2 if family == "electra+deit" else 1)
    assert isinstance(out, EncoderOutput)
    assert out.text_feats.shape == (4, 7, 24) and out.image_feats.shape == (4, patches, 24)
    assert out.pooled.shape == (4, 48) and text_only.pooled.shape == image_only.pooled.shape == (4, 24)
    torch.testing.assert_close(out.pooled, torch.cat([text_only.pooled, image_only.pooled], -1))
    torch.testing.assert_close(text_only.pooled.norm(dim=-1), torch.ones(4))  # L2-normalised
    # the embedding is the projection of the tower's pooled output, computed here from the tower itself
    hidden = enc.text_tower(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(text_only.pooled, F.normalize(enc.text_proj(pooled), dim=-1), rtol=1e-5, atol=1e-6)
    # padding changes nothing, whatever the padded ids
    padded_ids = torch.cat([batch["input_ids"], torch.randint(5, VOCAB, (4, 3))], 1)
    padded_mask = torch.cat([batch["attention_mask"], torch.zeros(4, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(enc(padded_ids, padded_mask).pooled, text_only.pooled, rtol=1e-5, atol=1e-6)


def test_itc_loss_is_clips_with_learnable_temperature():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    loss = ContrastiveLoss()
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    out, *_ = loss(image, text, torch.arange(5))
    logits = image @ text.T / 0.07  # CLIP: symmetric cross-entropy, labels on the diagonal
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(out["itc_loss"], expected)
    assert out["itc_acc"].item() == pytest.approx(((logits.argmax(1) == torch.arange(5)).float().mean().item() +
                                                   (logits.argmax(0) == torch.arange(5)).float().mean().item()) / 2)
    out["itc_loss"].backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad != 0  # the temperature learns
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)  # exp(10) > 100: clamped at 100
    out, *_ = loss(image, text, torch.arange(5))
    logits = 100.0 * image @ text.T
    torch.testing.assert_close(out["itc_loss"], (F.cross_entropy(logits, torch.arange(5)) +
                                                 F.cross_entropy(logits.T, torch.arange(5))) / 2)


def test_itc_rows_of_one_picture_are_all_positives():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    ids = torch.tensor([7, 7, 3, 9])  # rows 0 and 1: two captions of one picture
    out, *_ = ContrastiveLoss()(image, text, ids)
    logits = image @ text.T / 0.07
    targets = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1., 0], [0, 0, 0, 1.]])
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(out["itc_loss"], expected)


def test_hard_negatives_follow_the_similarity_and_skip_the_same_picture():
    similarity = torch.tensor([[5.0, 0.0, math.log(3.0), 9.0]])  # column 3 shows the caption's own picture
    all_ids, image_ids = torch.tensor([1, 2, 3, 4]), torch.tensor([4])
    draws = (torch.arange(1000) + 0.5) / 1000  # an even grid over [0, 1): counts are the probabilities
    drawn = torch.cat([draw_hard_negatives(similarity, all_ids, image_ids, d[None]) for d in draws])
    counts = torch.bincount(drawn, minlength=4).float() / 1000
    p = torch.tensor([math.exp(5), 1.0, 3.0, 0.0])
    torch.testing.assert_close(counts, p / p.sum(), atol=2e-3, rtol=0)
    alone = draw_hard_negatives(torch.zeros(1, 2), torch.tensor([4, 4]), image_ids, torch.tensor([0.5]))
    assert alone.tolist() == [-1]  # no other picture in the batch


def test_two_tower_with_itc_is_mlm_itm_plus_weighted_itc():
    cfg = tiny_config(itc_weight=0.5)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, VOCAB)
    assert isinstance(model, PretrainModel) and model.itc_head is not None
    out = model(make_batch())
    assert set(out) == {"loss", "mlm_loss", "mlm_acc", "itm_loss", "itm_acc", "itc_loss", "itc_acc"}
    assert out["loss"].item() == pytest.approx(out["mlm_loss"].item() + out["itm_loss"].item()
                                               + 0.5 * out["itc_loss"].item(), rel=1e-6)
    # ITC reads the projected tower outputs before fusion: the cross-modal layers get no gradient from it
    model.zero_grad()
    model(make_batch())["itc_loss"].backward()
    assert all(p.grad is None for p in model.encoder.cross_layers.parameters())
    assert model.encoder.text_proj.weight.grad is not None and model.encoder.vision_tower.embeddings.patch_embeddings \
        .projection.weight.grad is not None


def test_hard_negative_pairs_show_another_picture():
    cfg = tiny_config(itc_weight=1.0, itm_hard_negatives=True)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, VOCAB).eval()
    batch = make_batch(B=6, image_ids=torch.tensor([0, 0, 1, 2, 3, 4]))
    text = model.encoder.encode_text(batch["input_ids"], batch["attention_mask"])
    image = model.encoder.encode_image(batch["pixel_values"])
    _, paired = model.itc_head(text, image, batch)
    for i in range(6):  # each caption's ITM picture: its own when positive, else one of another picture
        rows = [j for j in range(6) if torch.equal(paired.feats[i], image.feats[j])]
        if batch["itm_labels"][i] == 1:
            assert i in rows
        else:
            assert all(batch["image_ids"][j] != batch["image_ids"][i] for j in rows) and rows


def test_dual_encoder_refuses_mlm_and_itm():
    with pytest.raises(ValueError, match="mlm_weight=0"):
        build_pretrain_model(tiny_config(model_type="dual_encoder", itc_weight=1.0), VOCAB)
    with pytest.raises(ValueError, match="two_tower"):
        build_pretrain_model(tiny_config(model_type="one_tower", itc_weight=1.0), VOCAB)
    with pytest.raises(ValueError, match="cross-modal"):
        cfg = tiny_config(**DUAL, freeze_cross=True)
        apply_freezing(build_pretrain_model(cfg, VOCAB), cfg)


# -----------------------------------------------------------------------------
# Two processes with batch B give the loss and gradients of one process with batch 2B

CASES = {"dual encoder": DUAL,
         "two-tower MLM + ITM + ITC, hard negatives": dict(itc_weight=0.7, itm_hard_negatives=True)}
B = 3


def _losses_and_grads(model, batch):
    out = model(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _split(batch, rank):
    """This rank's rows; the MLM positions (indices into the flattened rows) are computed afresh for them."""
    part = {k: v[rank * B:(rank + 1) * B] for k, v in batch.items() if k != "mlm_positions"}
    part["mlm_positions"] = PretrainModel.mlm_positions(part["mlm_labels"], part["itm_labels"], "separate")
    return part


def _gather_worker(rank, world_size, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for case in CASES:
            torch.manual_seed(0)
            model = build_pretrain_model(tiny_config(**CASES[case]), VOCAB)
            ddp = torch.nn.parallel.DistributedDataParallel(model)  # averages gradients over the processes
            out = ddp(_split(make_batch(B=2 * B, image_ids=SHARED_PICTURE), rank))
            out["loss"].backward()
            losses = torch.stack([out[k].detach() for k in sorted(out)])
            torch.distributed.all_reduce(losses)
            results[(case, rank)] = (losses / world_size, {n: p.grad.clone() for n, p in model.named_parameters()
                                                           if p.grad is not None})
    finally:
        torch.distributed.destroy_process_group()


SHARED_PICTURE = torch.tensor([0, 1, 2, 3, 1, 5])  # picture 1 on both processes: a positive across them


def test_two_processes_with_batch_b_equal_one_with_2b():
    """For a dual encoder, and a two-tower model with MLM + ITM + ITC and hard negatives (drawn over the global
    batch), two gloo processes with B rows each compute the losses and gradients of one process with 2B."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    context = mp.spawn(_gather_worker, args=(2, port, results), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):  # join returns as each one ends
        assert time.monotonic() < deadline, "workers did not finish"
    for case in CASES:
        torch.manual_seed(0)
        model = build_pretrain_model(tiny_config(**CASES[case]), VOCAB)
        single_out, single_grads = _losses_and_grads(model, make_batch(B=2 * B, image_ids=SHARED_PICTURE))
        losses, grads = results[(case, 0)]
        torch.testing.assert_close(losses, torch.stack([single_out[k] for k in sorted(single_out)]), rtol=1e-5,
                                   atol=1e-6, msg=case)
        assert grads.keys() == single_grads.keys(), case
        for name, g in single_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{case}: {name}")
