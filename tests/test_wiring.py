"""How the model and the metrics are wired, checked directly: what each stream's first cross-modal layer
receives, which stream each attention reads and with which mask, which position each pooler reads, exactly
which parameters each freezing key freezes, and grouped metrics on inputs where order matters.

Each test recomputes what a part should receive from the modules it comes from (tower outputs, projections,
type embeddings), captured with forward hooks, so a swapped stream, a dropped embedding or an off-by-one
position fails here by name rather than as a slightly worse learning curve somewhere else."""

import itertools
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import tasks
from encoders import OneTowerEncoder, TwoTowerEncoder, additive_mask, build_encoder
from model import apply_freezing, build_pretrain_model
from tasks.nlvr2 import NLVR2Model, nlvr2_consistency
from tasks.refcoco import RefCOCOModel
from tasks.retrieval import RetrievalModel, RetrievalSplit, retrieval_recall, retrieval_scores
from tasks.vqa import vqa_score
from tiny import tiny_config

VOCAB = len(data.synthetic_tokenizer())  # the synthetic captions' ids must fit
B, T = 3, 7
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def make_inputs(seed=0):
    """Captions of different lengths (row 1 padded after 4 tokens, row 2 after 6) and random pictures."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 4:] = 0
    attention_mask[2, 6:] = 0
    return input_ids, attention_mask, torch.randn(B, 3, 32, 32, generator=g)


def encoder(**overrides):
    torch.manual_seed(0)
    return build_encoder(tiny_config(**overrides), VOCAB).eval()


class Recorder:
    """Forward(-pre) hooks that keep what modules receive and return, call by call."""

    def __init__(self):
        self.calls, self.handles = {}, []

    def inputs(self, name, module):
        def hook(m, args, kwargs):
            self.calls.setdefault(name, []).append((args, kwargs))
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def outputs(self, name, module):
        def hook(m, args, out):
            self.calls.setdefault(name, []).append(out)
        self.handles.append(module.register_forward_hook(hook))

    def __getitem__(self, name):
        return self.calls[name]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def same(actual, expected, msg=""):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=msg)


# -----------------------------------------------------------------------------
# Two-tower: what the cross-modal layers receive and read


def expected_streams(enc, input_ids, attention_mask, pixel_values, image_type=1):
    """Each stream as it should enter the first cross-modal layer, recomputed from the towers' own outputs, the
    projections and the type embedding looked up by index (0 text, 1 image, 2 second image)."""
    with torch.no_grad():
        text = enc.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        vision = enc.vision_tower(pixel_values=pixel_values).last_hidden_state
        t = enc.text_proj(text) + enc.modality_type(torch.tensor(0))
        v = enc.image_proj(vision) + enc.modality_type(torch.tensor(image_type))
    return t, v


@pytest.mark.parametrize("image_type", [1, 2])
def test_first_cross_layer_receives_projected_towers_plus_their_type_embeddings(image_type):
    enc = encoder()
    input_ids, attention_mask, pixel_values = make_inputs()
    rec = Recorder()
    rec.inputs("layer0", enc.cross_layers[0])
    with torch.no_grad():
        enc(input_ids, attention_mask, pixel_values, image_type=image_type)
    (t, t_mask, v, v_mask), _ = rec["layer0"][0]
    expected_t, expected_v = expected_streams(enc, input_ids, attention_mask, pixel_values, image_type)
    same(t, expected_t, "text stream: text tower -> text_proj + TEXT type embedding")
    same(v, expected_v, f"image stream: vision tower -> image_proj + type embedding {image_type}")
    assert torch.equal(t_mask, attention_mask)  # the caption's padding mask
    assert v_mask is None  # every patch is real: no mask at all, so SDPA may take its fastest kernel
    # the three type embeddings differ (far beyond same()'s 1e-6 tolerance), so a stream given the wrong one (or
    # none) cannot pass the checks above
    types = enc.modality_type.weight
    assert min((types[i] - types[j]).abs().max() for i, j in [(0, 1), (0, 2), (1, 2)]) > 1e-3
    assert types.abs().min(dim=1).values.max() > 0


def test_nlvr2_model_tells_the_two_pictures_apart_by_type_embedding():
    """NLVR2: the left picture enters the cross-modal layers with type 1, the right with type 2, both beside the
    same caption stream; the classifier reads the left pooled output first."""
    enc = encoder()
    model = NLVR2Model(enc).eval()
    with torch.no_grad():  # NLVR2Model starts type 2 as a copy of type 1: told apart here, so that a swap shows
        enc.modality_type.weight[2].normal_(0, 0.02)
    input_ids, attention_mask, left = make_inputs(0)
    right = make_inputs(1)[2]
    rec = Recorder()
    rec.inputs("layer0", enc.cross_layers[0])
    rec.inputs("head", model.head)
    with torch.no_grad():
        model.logits({"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values_left": left,
                      "pixel_values_right": right})
        expected = [expected_streams(enc, input_ids, attention_mask, pixels, image_type)
                    for pixels, image_type in ((left, 1), (right, 2))]
        pooled = [enc(input_ids, attention_mask, pixels, image_type=image_type).pooled
                  for pixels, image_type in ((left, 1), (right, 2))]
    assert len(rec["layer0"]) == 4  # the model's two fusions, then the two of `pooled` above
    for (args, _), (expected_t, expected_v) in zip(rec["layer0"][:2], expected):
        same(args[0], expected_t)
        same(args[2], expected_v)
        assert torch.equal(args[1], attention_mask)
    same(rec["head"][0][0][0], torch.cat(pooled, dim=-1))


def same_mask(a, b):
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


def test_every_cross_layer_chains_the_streams_and_reads_the_other_one_with_its_mask():
    """Layer i takes layer i-1's outputs, in order (text, image); in each half, self-attention reads its own
    stream under its own mask, and cross-attention takes queries from its own stream and keys/values from the
    other stream's input to this layer (co-attention), under the other stream's padding mask."""
    enc = encoder(cross_layers=3)
    input_ids, attention_mask, pixel_values = make_inputs()
    rec = Recorder()
    for i, layer in enumerate(enc.cross_layers):
        rec.inputs(f"layer{i}", layer)
        rec.outputs(f"layer{i}.out", layer)
        for half in ("text", "image"):
            block = getattr(layer, half)
            rec.inputs(f"layer{i}.{half}.self", block.self_attn)
            rec.inputs(f"layer{i}.{half}.cross", block.cross_attn)
    rec.inputs("text_norm", enc.text_norm)
    rec.inputs("image_norm", enc.image_norm)
    with torch.no_grad():
        enc(input_ids, attention_mask, pixel_values)
        t, v = expected_streams(enc, input_ids, attention_mask, pixel_values)
        v_mask = None  # image patches: every key is real, so the model passes no mask
        for i, layer in enumerate(enc.cross_layers):
            (t_in, t_mask_in, v_in, v_mask_in), _ = rec[f"layer{i}"][0]
            same(t_in, t, f"layer {i}: text stream")
            same(v_in, v, f"layer {i}: image stream")
            assert torch.equal(t_mask_in, attention_mask) and v_mask_in is None, f"layer {i}: masks"
            for half, own, own_mask, other, other_mask in (("text", t, attention_mask, v, v_mask),
                                                           ("image", v, v_mask, t, attention_mask)):
                block = getattr(layer, half)
                (q, context, mask), _ = rec[f"layer{i}.{half}.self"][0]
                same(q, block.norm_self(own), f"layer {i} {half}: self-attention queries")
                same(context, block.norm_self(own), f"layer {i} {half}: self-attention keys/values")
                assert same_mask(mask, own_mask), f"layer {i} {half}: self-attention mask"
                after_self = own + block.self_attn(block.norm_self(own), block.norm_self(own), own_mask)
                (q, context, mask), _ = rec[f"layer{i}.{half}.cross"][0]
                same(q, block.norm_cross(after_self), f"layer {i} {half}: cross-attention queries")
                same(context, other, f"layer {i} {half}: cross-attention keys/values come from the other stream")
                assert same_mask(mask, other_mask), f"layer {i} {half}: cross-attention key-padding mask"
            t, v = rec[f"layer{i}.out"][0]
        same(rec["text_norm"][0][0][0], t)
        same(rec["image_norm"][0][0][0], v)


def test_cross_attention_key_padding_mask_really_hides_padded_tokens():
    """Whatever the pad tokens hold, the image stream (which cross-attends to the caption) does not change."""
    enc = encoder()
    input_ids, attention_mask, pixel_values = make_inputs()
    junk = input_ids.clone()
    junk[attention_mask == 0] = torch.randint(5, VOCAB, (int((attention_mask == 0).sum()),))
    with torch.no_grad():
        a, b = enc(input_ids, attention_mask, pixel_values), enc(junk, attention_mask, pixel_values)
    assert not torch.equal(input_ids, junk)
    same(b.image_feats, a.image_feats)
    same(b.pooled, a.pooled)


# -----------------------------------------------------------------------------
# One-tower: what the joint stack receives


@pytest.mark.parametrize("stack", ["text", "vision"])
def test_one_tower_stack_receives_text_then_image_with_type_embeddings_and_the_joint_mask(stack):
    enc = encoder(model_type="one_tower", onetower_stack=stack)
    input_ids, attention_mask, pixel_values = make_inputs()
    rec = Recorder()
    for i, layer in enumerate(enc.layers):
        rec.inputs(f"layer{i}", layer)
    with torch.no_grad():
        enc(input_ids, attention_mask, pixel_values)
        text = enc.text_embeddings(input_ids) + enc.modality_type(torch.tensor(0))
        image = enc.image_embeddings(pixel_values) + enc.modality_type(torch.tensor(1))
    (x,), kwargs = rec["layer0"][0]
    same(x[:, :T], text, "text part: its embeddings + TEXT type embedding, first")
    same(x[:, T:], image, "image part: its embeddings (CLS first) + IMAGE type embedding, after the text")
    joint = additive_mask(torch.cat([attention_mask, torch.ones(B, image.shape[1], dtype=torch.long)], dim=1),
                          x.dtype)
    for i in range(len(enc.layers)):  # the joint mask reaches every layer
        assert torch.equal(rec[f"layer{i}"][0][1]["attention_mask"], joint), f"layer {i}"


# -----------------------------------------------------------------------------
# Poolers: which position each one reads


def pooler_inputs(enc, *inputs):
    rec = Recorder()
    for name in ("text_pooler", "image_pooler", "text_norm", "image_norm", "final_norm"):
        module = getattr(enc, name, None)
        if module is not None:
            rec.inputs(name, module)
            rec.outputs(name + ".out", module)
    with torch.no_grad():
        out = enc(*inputs)
    rec.remove()
    return out, rec


def test_two_tower_pools_text_cls_then_image_cls():
    enc = encoder()
    input_ids, attention_mask, pixel_values = make_inputs()
    out, rec = pooler_inputs(enc, input_ids, attention_mask, pixel_values)
    text_cls, image_cls = rec["text_norm.out"][0][:, 0], rec["image_norm.out"][0][:, 0]
    same(rec["text_pooler"][0][0][0], text_cls)
    same(rec["image_pooler"][0][0][0], image_cls)
    same(out.text_feats[:, 0], text_cls)
    same(out.image_feats[:, 0], image_cls)
    with torch.no_grad():
        same(out.pooled, torch.cat([enc.text_pooler(text_cls), enc.image_pooler(image_cls)], dim=-1))
        # unimodal input: that stream's own CLS through its own norm and pooler
        text_only = enc(input_ids, attention_mask)
        image_only = enc(pixel_values=pixel_values)
        t, v = expected_streams(enc, input_ids, attention_mask, pixel_values)
        same(text_only.pooled, enc.text_pooler(enc.text_norm(t)[:, 0]))
        same(image_only.pooled, enc.image_pooler(enc.image_norm(v)[:, 0]))


@pytest.mark.parametrize("stack, vision_tower", [("text", "vit"), ("vision", "vit"), ("vision", "deit")])
@pytest.mark.parametrize("pooling", ["double", "single"])
def test_one_tower_pools_the_text_cls_and_the_image_cls_token(stack, vision_tower, pooling):
    """"double" reads the text CLS (position 0) and the image CLS token, at position T right after the padded
    caption, not the first patch (T + 1; DeiT's distillation token there); "single" reads position 0 only."""
    enc = encoder(model_type="one_tower", onetower_stack=stack, vision_tower=vision_tower, pooling=pooling)
    input_ids, attention_mask, pixel_values = make_inputs()
    rec = Recorder()
    rec.outputs("stack", enc.final_norm or enc.layers[-1])  # the joint sequence the poolers read from
    out, pools = pooler_inputs(enc, input_ids, attention_mask, pixel_values)
    x = rec["stack"][0]
    same(pools["text_pooler"][0][0][0], x[:, 0])
    same(out.text_feats, x[:, :T])
    same(out.image_feats, x[:, T:])
    with torch.no_grad():
        if pooling == "double":
            same(pools["image_pooler"][0][0][0], x[:, T], "the image CLS token, after the padded caption")
            same(out.pooled, torch.cat([enc.text_pooler(x[:, 0]), enc.image_pooler(x[:, T])], dim=-1))
        else:
            assert enc.image_pooler is None and "image_pooler" not in pools.calls
            same(out.pooled, enc.text_pooler(x[:, 0]))
        # image-only input: its CLS is position 0, read by the image pooler ("double") or the only one ("single")
        image_only, pools = pooler_inputs(enc, None, None, pixel_values)
        same(pools["image_pooler" if pooling == "double" else "text_pooler"][0][0][0], image_only.image_feats[:, 0])
        assert ("text_pooler" if pooling == "double" else "image_pooler") not in pools.calls


@pytest.mark.parametrize("pooling", ["double", "single"])
def test_one_tower_image_cls_moves_with_the_caption_length(pooling):
    """Perturbing the stack's output at position 0 changes only the text half of the pooled output, and at the
    image CLS position (the caption's padded length, not its number of real tokens) only the image half
    ("double") or nothing ("single"); at the first patch, nothing, for every caption length."""
    enc = encoder(model_type="one_tower", pooling=pooling)
    pixel_values = make_inputs()[2]
    for length in (3, T, 10):
        ids = torch.randint(5, VOCAB, (B, length))
        mask = torch.ones(B, length, dtype=torch.long)
        mask[0, length - 1:] = 0  # one padded token in row 0
        seen = {}

        def perturb(position):
            def hook(module, args, out):
                out = out.clone()
                out[:, position] += 5.0
                return out
            return hook

        with torch.no_grad():
            text = enc.encode_text(ids, mask)
            image = enc.encode_image(pixel_values)
            base = enc.fuse(text, image).pooled
            for position in (0, length, length + 1):
                handle = (enc.final_norm or enc.layers[-1]).register_forward_hook(perturb(position))
                seen[position] = enc.fuse(text, image).pooled - base
                handle.remove()
        D = enc.dim
        assert seen[0][:, :D].abs().max() > 1e-3 and seen[0][:, D:].abs().sum() == 0  # text CLS: text half only
        assert seen[length][:, :D].abs().sum() == 0  # image CLS: never the text half, the image half if any
        assert seen[length][:, D:].abs().max() > 1e-3 if pooling == "double" else seen[length].shape[1] == D
        assert seen[length + 1].abs().sum() == 0  # the first patch is read by no pooler


# -----------------------------------------------------------------------------
# Freezing: exactly which parameters each key freezes

TOWERS = ("encoder.text_tower.", "encoder.vision_tower.")  # the rest of "encoder." is the cross-modal part


def tower_frozen_below(name, tower, layers, k):
    """Whether parameter `name` of `tower` ("encoder.text_tower.") is frozen when only its top k of `layers`
    layers train: its embeddings and the layers below the top k; what sits above the layers trains."""
    if not name.startswith(tower) or k < 0:
        return False
    rest = name[len(tower):]
    if rest.startswith("embeddings"):
        return True
    layer = re.match(r"(?:encoder\.)?layers?\.(\d+)\.", rest)  # "encoder.layer.3." (BERT), "layers.3." (ViT)
    return layer is not None and int(layer[1]) < layers - k


def expected_trainable(names, freeze_text=False, freeze_vision=False, freeze_cross=False, text_top=-1,
                       vision_top=-1, modules=()):
    """The two-tower pretraining model's trainable names, from name prefixes alone."""
    def frozen(n):
        return ((freeze_text and n.startswith(TOWERS[0])) or (freeze_vision and n.startswith(TOWERS[1]))
                or (freeze_cross and n.startswith("encoder.") and not n.startswith(TOWERS))
                or tower_frozen_below(n, TOWERS[0], 2, text_top) or tower_frozen_below(n, TOWERS[1], 2, vision_top)
                or any(n == m or n.startswith(m + ".") for m in modules))
    return {n for n in names if not frozen(n)}


TWO_TOWER_FREEZING = [
    dict(freeze_text=True),
    dict(freeze_vision=True),
    dict(freeze_cross=True),
    dict(freeze_text=True, freeze_vision=True),
    dict(text_trainable_top=1),
    dict(text_trainable_top=0, vision_trainable_top=1),
    dict(vision_trainable_top=2),
    dict(freeze_text=True, text_trainable_top=1),
    dict(freeze_modules=["mlm_head", "encoder.cross_layers.1", "encoder.image_pooler"]),
    dict(freeze_cross=True, freeze_modules=["itm_head"], vision_trainable_top=0),
]


@pytest.mark.parametrize("keys", TWO_TOWER_FREEZING, ids=lambda keys: ",".join(f"{k}={v}" for k, v in keys.items()))
def test_two_tower_freezing_keys_freeze_exactly_their_parameters(keys):
    cfg = tiny_config(**keys)
    model = build_pretrain_model(cfg, VOCAB)
    names = [n for n, _ in model.named_parameters()]
    assert {"encoder.modality_type.weight", "encoder.text_proj.weight", "encoder.image_proj.weight"} <= set(names)
    apply_freezing(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = expected_trainable(names, cfg.freeze_text, cfg.freeze_vision, cfg.freeze_cross,
                                  cfg.text_trainable_top, cfg.vision_trainable_top, cfg.freeze_modules)
    assert trainable == expected, (f"frozen but should train: {sorted(expected - trainable)}; "
                                   f"trainable but should be frozen: {sorted(trainable - expected)}")
    model.train()  # no dropout inside a part whose parameters are all frozen
    for name, module in model.named_modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            assert not any(m.training for m in module.modules() if isinstance(m, torch.nn.Dropout)), name


def test_freeze_cross_freezes_the_type_embeddings_projections_norms_and_poolers():
    """Spelled out for the parts that sit between the towers and the cross-modal layers."""
    cfg = tiny_config(freeze_cross=True)
    model = build_pretrain_model(cfg, VOCAB)
    apply_freezing(model, cfg)
    enc = model.encoder
    for part in ("modality_type", "text_proj", "image_proj", "cross_layers", "text_norm", "image_norm",
                 "text_pooler", "image_pooler"):
        assert not any(p.requires_grad for p in getattr(enc, part).parameters()), part
    assert all(p.requires_grad for p in enc.text_tower.parameters())
    assert all(p.requires_grad for p in enc.vision_tower.parameters())
    assert all(p.requires_grad for h in model.heads() for p in h.parameters())


@pytest.mark.parametrize("stack, keys", [
    ("text", dict(text_trainable_top=1)),
    ("text", dict(text_trainable_top=0)),
    ("vision", dict(vision_trainable_top=1)),
    ("vision", dict(vision_trainable_top=0)),
    ("text", dict(freeze_modules=["encoder.modality_type", "encoder.layers.0"])),
])
def test_one_tower_freezing_keys_freeze_exactly_their_parameters(stack, keys):
    cfg = tiny_config(model_type="one_tower", onetower_stack=stack, **keys)
    model = build_pretrain_model(cfg, VOCAB)
    names = [n for n, _ in model.named_parameters()]
    apply_freezing(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    k = getattr(cfg, f"{stack}_trainable_top")
    embeddings = ("encoder.text_embeddings.", "encoder.text_embeddings_project.", "encoder.image_embeddings.",
                  "encoder.modality_type.")

    def frozen(n):
        below = k >= 0 and (n.startswith(embeddings) or
                            (n.startswith("encoder.layers.") and int(n.split(".")[2]) < len(model.encoder.layers) - k))
        return below or any(n.startswith(m + ".") for m in cfg.freeze_modules)
    expected = {n for n in names if not frozen(n)}
    assert trainable == expected, (sorted(expected - trainable), sorted(trainable - expected))
    if k >= 0:  # the pooler(s), the final norm and the heads always sit above the layers
        assert {n for n in names if n.startswith(("encoder.text_pooler.", "encoder.image_pooler.", "mlm_head.",
                                                  "itm_head.", "encoder.final_norm."))} <= trainable


@pytest.mark.parametrize("key", ["freeze_text", "freeze_vision", "freeze_cross"])
def test_two_tower_freezing_keys_are_refused_for_one_tower(key):
    cfg = tiny_config(model_type="one_tower", **{key: True})
    with pytest.raises(ValueError, match=key):
        apply_freezing(build_pretrain_model(cfg, VOCAB), cfg)


# -----------------------------------------------------------------------------
# Grouped metrics on inputs where order matters


def test_nlvr2_consistency_needs_every_pair_of_a_sentence_right_in_any_order():
    # sentence A: wrong, then right (its LAST pair right); B: right, right; C: right, wrong, right
    items = [("A", False), ("A", True), ("B", True), ("B", True), ("C", True), ("C", False), ("C", True)]
    interleaved = [0, 2, 4, 1, 5, 3, 6]
    shuffled = [np.random.default_rng(seed).permutation(7).tolist() for seed in range(10)]
    for order in ([*range(7)], interleaved, interleaved[::-1], *shuffled):
        keys = [f"dev-{items[i][0]}--0" for i in order]
        labels = [i % 2 for i in order]
        preds = [label if items[i][1] else 1 - label for i, label in zip(order, labels)]
        assert nlvr2_consistency(keys, preds, labels) == pytest.approx(1 / 3), order
    assert nlvr2_consistency(["a", "b", "a"], [1, 1, 0], [1, 1, 1]) == pytest.approx(1 / 2)
    assert nlvr2_consistency(["a", "b", "a"], [0, 1, 1], [1, 1, 1]) == pytest.approx(1 / 2)


def test_nlvr2_task_score_groups_identifiers_by_sentence_across_pairs():
    """Through the task: identifiers split-set-pair-sentence, grouped across the pair id, in file order where
    the pairs of one sentence are far apart."""
    identifiers = ["dev-7-0-0", "dev-7-0-1", "dev-8-0-0", "dev-7-1-0", "dev-7-1-1", "dev-8-3-0", "dev-7-2-1"]
    labels = np.array([1, 0, 1, 0, 1, 1, 1])
    preds = np.array([1, 0, 1, 1, 1, 0, 1])  # dev-7--0 wrong at its 2nd pair; dev-8--0 wrong at its 2nd
    dataset = SimpleNamespace(identifiers=identifiers, labels=labels)
    scores = tasks.TASKS["nlvr2"].score(preds, dataset, "dev")
    assert scores["nlvr2_consistency"] == pytest.approx(1 / 3)  # only dev-7--1 (pairs 0, 1, 2) is all right
    assert scores["nlvr2_acc"] == pytest.approx(5 / 7)
    prefix = tasks.TASKS["nlvr2"].score(preds[:3], dataset, "dev")  # the first items only, as a quick validation
    assert prefix["nlvr2_consistency"] == 1.0 and prefix["nlvr2_acc"] == 1.0


def reference_recall(scores, caption_image, k):
    """Recall@k by sorting, one query at a time, ties broken against the true item."""
    n_images, n_captions = scores.shape
    hits_ir = []
    for c in range(n_captions):
        others = [scores[i, c] for i in range(n_images) if i != caption_image[c]]
        hits_ir.append(sum(s >= scores[caption_image[c], c] for s in others) < k)
    hits_tr = []
    for i in range(n_images):
        true = [scores[i, c] for c in range(n_captions) if caption_image[c] == i]
        false = [scores[i, c] for c in range(n_captions) if caption_image[c] != i]
        hits_tr.append(sum(s >= max(true) for s in false) < k)
    return np.mean(hits_tr), np.mean(hits_ir)


def test_retrieval_recall_with_captions_in_no_particular_order():
    rng = np.random.default_rng(0)
    caption_image = np.array([2, 0, 1, 0, 2, 1, 3, 3, 0, 2])  # not grouped, not sorted, unequal counts
    scores = np.round(rng.normal(size=(4, 10)), 1)  # rounded: some ties
    for c, i in enumerate(caption_image):
        scores[i, c] += 1.0 if c % 3 else 0.0  # most true pairs score higher, not all
    for k in (1, 2, 3):
        tr, ir = reference_recall(scores, caption_image, k)
        recalls = retrieval_recall(scores, caption_image, ks=(k,))
        assert recalls[f"tr_r{k}"] == pytest.approx(tr) and recalls[f"ir_r{k}"] == pytest.approx(ir), k
    # the same retrieval problem with captions and images listed in other orders scores the same
    reference = retrieval_recall(scores, caption_image, ks=(1, 2, 3))
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(10)
        rows = np.random.default_rng(seed + 10).permutation(4)  # new row r holds old image rows[r]
        new_row = np.argsort(rows)
        shuffled = retrieval_recall(scores[rows][:, order], new_row[caption_image[order]], ks=(1, 2, 3))
        assert shuffled == pytest.approx(reference), seed
    # hand-made, captions alternating between the images: image 0's best caption is the last one, image 1's the
    # first; captions 0, 2 and 3 rank their own image first, caption 1 does not
    scores = np.array([[0.1, 0.5, 0.2, 0.9],
                       [0.8, 0.6, 0.7, 0.3]])
    assert retrieval_recall(scores, [1, 0, 1, 0], ks=(1,)) == {"tr_r1": 1.0, "ir_r1": 0.75}
    assert retrieval_recall(scores, [0, 0, 1, 1], ks=(1,)) == {"tr_r1": 0.0, "ir_r1": 0.25}


def test_retrieval_scores_put_each_pair_at_its_image_row_and_caption_column():
    """The full (n_images, n_captions) matrix, fused in batches that straddle image rows, equals matching each
    (image, caption) pair on its own; two processes each score their own rows r, r + 2, ..."""
    torch.manual_seed(0)
    model = RetrievalModel(encoder()).eval()
    torch.nn.init.normal_(model.head.weight)
    pictures = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    split = RetrievalSplit(images=[{"image": p} for p in pictures], image_ids=np.array([10, 11, 12]),
                                 captions=["red circle", "two blue squares left of a star", "a star", "green"],
                                 caption_image=np.array([1, 0, 2, 1]))
    tokenizer = data.synthetic_tokenizer()
    cfg = SimpleNamespace(eval_pairs_batch=5, micro_batch_size=2, num_workers=0, max_text_len=16)
    one = SimpleNamespace(rank=0, world_size=1, is_ddp=False, master=True, device=torch.device("cpu"))
    with torch.no_grad():
        scores = retrieval_scores(model, split, tokenizer, cfg, one)
        tokens = tokenizer(split.captions, padding="longest", return_tensors="pt")
        expected = np.zeros((3, 4), dtype=np.float32)
        for i, j in itertools.product(range(3), range(4)):
            text = model.encoder.encode_text(tokens["input_ids"][j:j + 1], tokens["attention_mask"][j:j + 1])
            image = model.encoder.encode_image(pictures[i:i + 1])
            expected[i, j] = model.match(text, image).item()
        rows = [retrieval_scores(model, split, tokenizer, cfg, SimpleNamespace(
            rank=r, world_size=2, is_ddp=False, master=r == 0, device=torch.device("cpu"))) for r in (0, 1)]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(expected.flatten(), 4))) == 12  # every pair scores differently: a swap would show
    np.testing.assert_allclose(rows[0], expected[0::2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows[1], expected[1::2], rtol=1e-5, atol=1e-5)


def test_vqa_score_pairs_each_answer_with_its_own_question():
    humans = [["yes"] * 10, ["2"] * 3 + ["3"] * 7, ["red"] * 10]
    # the server's overall: a percentage rounded to two decimals, (1 + 0.9 + 1) / 3 -> 96.67
    assert vqa_score(["yes", "2", "red"], humans) == pytest.approx(0.9667)
    assert vqa_score(["2", "yes", "red"], humans) == pytest.approx(0.3333)  # same answers, other questions
    order = [2, 0, 1]
    assert vqa_score([["yes", "2", "red"][i] for i in order], [humans[i] for i in order]) == pytest.approx(0.9667)
    vocab = ["red", "yes", "2", "3"]
    dataset = SimpleNamespace(answers=True, answer_vocab=vocab, human_answers=lambda i: humans[i])
    assert tasks.TASKS["vqa"].score(np.array([1, 2]), dataset, "val2014") == {"vqa_score": pytest.approx(0.95)}
    assert tasks.TASKS["vqa"].score(np.array([2, 1]), dataset, "val2014") == {"vqa_score": 0.0}


def test_refcoco_scores_each_sentence_against_its_own_target_box():
    dataset = SimpleNamespace(targets=np.array([2, 0, 1, 0, 3]))
    task = tasks.TASKS["refcoco"]
    assert task.score(np.array([2, 0, 0, 1]), dataset, "val") == {"refcoco_acc": 0.5}  # a prefix of the items
    assert task.score(np.array([0, 2, 1, 0, 3]), dataset, "val") == {"refcoco_acc": 0.6}


def test_refcoco_model_scores_each_row_from_its_own_image_and_never_a_padded_box():
    torch.manual_seed(0)
    model = RefCOCOModel(encoder()).eval()
    input_ids, attention_mask, pixel_values = make_inputs()
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0]]).expand(B, -1, -1)
    box_mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
             "boxes": boxes.clone(), "box_mask": box_mask}
    with torch.no_grad():
        scores = model.box_scores(batch)
        assert torch.equal(torch.isinf(scores), ~box_mask) and (model.predict(batch) < box_mask.sum(-1)).all()
        changed = dict(batch, pixel_values=pixel_values.clone())
        changed["pixel_values"][1] += 1.0
        other = model.box_scores(changed)
    same(other[[0, 2]], scores[[0, 2]])  # rows 0 and 2 do not read row 1's picture
    assert (other[1, :1] - scores[1, :1]).abs().max() > 1e-4
