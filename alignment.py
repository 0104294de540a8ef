"""Parameter-efficient alignment of pretrained towers (LilT): inside a frozen tower, train only its LayerNorm
parameters, its biases, or bottleneck adapters added after the attention and MLP sublayers of every layer, in
any combination and together with text_trainable_top / vision_trainable_top.

Keys: text_align / vision_align (lists of ALIGN_KINDS) and adapter_reduction. encoders.build_encoder adds the
adapters; model.apply_freezing, after freezing, lets the chosen parameters train again. This module imports no
other module of the project.
"""

import torch.nn as nn

ALIGN_KINDS = ("layernorm", "bias", "adapter")
# (attention output projection, MLP output projection) inside one transformer layer, per family layout:
# BERT / ELECTRA / RoBERTa / DeBERTa / ERNIE / MPNet; ViT / DeiT / BEiT / DINOv2 / data2vec (transformers 5);
# DistilBERT
SUBLAYER_OUTPUTS = (("attention.output.dense", "output.dense"), ("attention.o_proj", "mlp.fc2"),
                    ("attention.out_lin", "ffn.lin2"))
ADAPTER_NAME = "adapter"  # the attribute holding each adapter: its parameters are "...<name>.adapter.<...>"


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby et al. 2019): x -> x + up(GELU(down(x))), width dim -> dim // reduction -> dim.
    The up-projection starts at zero, so a fresh adapter is exactly the identity."""

    def __init__(self, dim, reduction):
        super().__init__()
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(f"adapter_reduction={reduction} must be at least 1 and at most the hidden size {dim}")
        self.down = nn.Linear(dim, dim // reduction)
        self.up = nn.Linear(dim // reduction, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):  # (..., dim) -> (..., dim)
        return x + self.up(nn.functional.gelu(self.down(x)))


class LinearWithAdapter(nn.Linear):
    """A sublayer's output projection followed by an adapter, before the sublayer's dropout and residual add.
    It keeps the original Linear's weight and bias under their names, so a checkpoint without adapters loads
    into it with only the adapter parameters missing."""

    def __init__(self, linear, reduction):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.adapter = Adapter(linear.out_features, reduction)

    def forward(self, x):
        return self.adapter(super().forward(x))


def add_adapters(layers, reduction):
    """Put an adapter after the attention output and the MLP output projection of every layer of `layers`
    (a tower's stack of transformer layers); returns the number of adapters added."""
    added = 0
    for i, layer in enumerate(layers):
        paths = next((pair for pair in SUBLAYER_OUTPUTS if all(_has(layer, p) for p in pair)), None)
        if paths is None:
            raise ValueError(f"adapters: layer {i} ({type(layer).__name__}) has none of the known sublayer layouts "
                             f"{[list(pair) for pair in SUBLAYER_OUTPUTS]}")
        for path in paths:
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            linear = getattr(parent, name)
            if not isinstance(linear, LinearWithAdapter):
                setattr(parent, name, LinearWithAdapter(linear, reduction))
                added += 1
    return added


def aligned_parts(encoder, cfg):
    """{modality: the part of the encoder its <modality>_align key acts on}: each tower of a two-tower model or
    dual encoder; a one-tower model's whole encoder for the modality of its stack."""
    if hasattr(encoder, "text_tower"):
        return {"text": encoder.text_tower, "vision": encoder.vision_tower}
    other = "vision" if encoder.stack_modality == "text" else "text"
    if getattr(cfg, f"{other}_align"):
        raise ValueError(f"{other}_align: a one-tower model has one stack, set by onetower_stack="
                         f"{encoder.stack_modality!r}; use {encoder.stack_modality}_align")
    return {encoder.stack_modality: encoder}


def add_configured_adapters(encoder, cfg, layers_of):
    """The adapters text_align / vision_align ask for, in the layers `layers_of(part)` of each aligned part."""
    for modality, part in aligned_parts(encoder, cfg).items():
        if "adapter" in getattr(cfg, f"{modality}_align"):
            add_adapters(layers_of(part), cfg.adapter_reduction)


def train_alignment_parameters(encoder, cfg):
    """Let the parameters that text_align / vision_align name train, wherever freezing stopped them."""
    for modality, part in aligned_parts(encoder, cfg).items():
        for _, param in alignment_parameters(part, getattr(cfg, f"{modality}_align")):
            param.requires_grad_(True)


def _has(module, path):
    try:
        return isinstance(module.get_submodule(path), nn.Linear)
    except AttributeError:
        return False


def is_adapter_parameter(name):
    return f".{ADAPTER_NAME}." in f".{name}"


def alignment_parameters(module, kinds):
    """(name, parameter) of `module` that the alignment kinds train: LayerNorm weights and biases ("layernorm"),
    every bias ("bias"), adapter parameters ("adapter")."""
    layer_norms = {f"{name}.{p}".lstrip(".") for name, m in module.named_modules() if isinstance(m, nn.LayerNorm)
                   for p, _ in m.named_parameters(recurse=False)}
    for name, param in module.named_parameters():
        if ("layernorm" in kinds and name in layer_norms) or ("bias" in kinds and name.endswith("bias")) \
                or ("adapter" in kinds and is_adapter_parameter(name)):
            yield name, param


def new_adapter_keys(model_state, checkpoint_state):
    """Adapter keys of a model's state dict that a checkpoint lacks: what checked loading of a checkpoint from
    before the adapters were added expects to be missing."""
    return [key for key in model_state if is_adapter_parameter(key) and key not in checkpoint_state]


def adapter_changes(cfg, saved):
    """Config changes that give a model the adapters of the pretraining run whose saved config is `saved`:
    adapters are architecture (their weights are in the checkpoint), while which layer norms and biases train
    is the new run's choice. A run may add adapters to a model pretrained without them."""
    changes = {}
    for key in ("text_align", "vision_align"):
        if "adapter" in saved.get(key, []) and "adapter" not in getattr(cfg, key):
            changes[key] = [*getattr(cfg, key), "adapter"]
    if any("adapter" in saved.get(key, []) for key in ("text_align", "vision_align")):
        if saved["adapter_reduction"] != cfg.adapter_reduction:
            changes["adapter_reduction"] = saved["adapter_reduction"]
    return changes
