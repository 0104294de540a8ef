"""Towers from Hugging Face: a text encoder of the BERT family or a transformer vision encoder, from a hub name,
a local directory (save_pretrained output) or a family name at hand-set sizes (random init, no hub access), and
the parts of a tower the encoders and freezing need (embeddings, layers, final norm). Also the initialisation
of the modules the platform adds around the towers (init_new_modules).
"""

import inspect
import os

import torch.nn as nn
from transformers import (AutoConfig, AutoModel, BeitConfig, BertConfig, DeiTConfig, ElectraConfig,
                          RobertaConfig, ViTConfig)

from attention import TOWER_ATTENTION, Dropout

# -----------------------------------------------------------------------------
# Towers: any Hugging Face text encoder of the BERT family or transformer vision encoder

# A family name builds a randomly initialised tower with no hub access at all.
TEXT_FAMILIES = {"bert": BertConfig, "electra": ElectraConfig, "roberta": RobertaConfig}
VISION_FAMILIES = {"vit": ViTConfig, "deit": DeiTConfig, "beit": BeitConfig}
# model_type values accepted from a hub name or local directory.
TEXT_MODEL_TYPES = {"bert", "electra", "roberta", "xlm-roberta", "camembert", "albert", "distilbert",
                    "deberta", "deberta-v2", "mpnet", "ernie"}
VISION_MODEL_TYPES = {"vit", "deit", "beit", "data2vec-vision", "dinov2", "vit_msn", "vit_mae"}


# What random_init_towers builds in place of a hub name, offline: the family and the hub model's dimensions
# (its config.json values). Every text model here has BERT's uncased WordPiece vocabulary, every vision model
# 16-pixel patches.
HUB_TOWERS = {
    "google/electra-small-discriminator": ("electra", dict(
        hidden_size=256, num_hidden_layers=12, num_attention_heads=4, intermediate_size=1024, embedding_size=128,
        vocab_size=30522)),
    "google/electra-base-discriminator": ("electra", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, embedding_size=768,
        vocab_size=30522)),
    "bert-base-uncased": ("bert", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522)),
    "facebook/deit-tiny-patch16-224": ("deit", dict(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, patch_size=16)),
    "google/vit-base-patch16-224-in21k": ("vit", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16)),
    "google/vit-base-patch16-224": ("vit", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16)),
}


class TowerLoadError(ValueError):
    """A tower or its config could not be loaded; the message is one line naming it."""


def one_line(error):
    """An exception's whole message as one line (transformers' messages run over several)."""
    return " ".join(str(error).split()) or type(error).__name__


def hub_unreachable(timeout=5.0):
    """Why the Hugging Face hub cannot be reached, from one request without retries; "" when it answers at all."""
    from huggingface_hub import constants, get_session
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # the HTTP client's connection errors: refused, no route, name not resolved, timeout
        return one_line(e)
    return ""


def from_hub_or_directory(load, name, key, offline_fix):
    """`load(name, **kwargs)` (a from_pretrained) for config key `key`, each failure one line naming the key.

    A local directory is read as it is, and a path that is not one is reported as such. A hub name is read from
    the local cache first; the hub is asked only when HF_HUB_OFFLINE is unset and one request shows that it answers,
    so without hub access the run fails in seconds (transformers would retry for half a minute), saying
    `offline_fix`: how to run without the hub.
    """
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        try:
            return load(path)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... all mean "cannot load"
            raise TowerLoadError(f"could not load {key} from directory '{name}': {one_line(e)}") from None
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a hub name is "name" or "namespace/name"
        raise TowerLoadError(f"{key}: directory '{name}' does not exist")
    try:
        return load(name, local_files_only=True)
    except Exception:
        pass  # not in the cache
    from huggingface_hub import constants
    if constants.is_offline_mode():
        raise TowerLoadError(f"could not load {key} '{name}': it is not in the local Hugging Face cache and "
                             f"HF_HUB_OFFLINE is set; {offline_fix}")
    unreachable = hub_unreachable()
    if unreachable:
        raise TowerLoadError(f"could not load {key} '{name}': the Hugging Face hub ({constants.ENDPOINT}) is "
                             f"unreachable ({unreachable}) and '{name}' is not in the local cache; {offline_fix}")
    try:
        return load(name)
    except Exception as e:
        raise TowerLoadError(f"could not load {key} '{name}' from the hub: {one_line(e)}") from None


def _tower_overrides(cfg, modality):
    """Hand-set dimensions from the config; a value <= 0 (dropout < 0) keeps the tower's own."""
    p = f"{modality}_"
    hidden = getattr(cfg, p + "hidden_size")
    mlp_ratio = getattr(cfg, p + "mlp_ratio")
    dims = {"hidden_size": hidden, "num_hidden_layers": getattr(cfg, p + "layers"),
            "num_attention_heads": getattr(cfg, p + "heads")}
    dims = {k: v for k, v in dims.items() if v > 0}
    if mlp_ratio > 0:
        dims["mlp_ratio"] = mlp_ratio  # becomes intermediate_size once the hidden size is known
    if modality == "text" and cfg.text_embedding_size > 0:
        dims["embedding_size"] = cfg.text_embedding_size
    dropout = getattr(cfg, p + "dropout")
    rates = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout} if dropout >= 0 else {}
    return dims, rates


def load_tower(cfg, modality, vocab_size=None, saved_config=None):
    """Build the text or vision tower named by `cfg.<modality>_tower`.

    Three ways: a family name ("bert", "vit", ...) -> random init with the config's hand-set dimensions;
    a hub name or local directory with `<modality>_pretrained=True` -> its weights; with False -> random
    init from its config. With random_init_towers a hub name is built offline from HUB_TOWERS instead, as the hub
    model's config would build it, vocabulary included (hand-set dimensions still apply). Poolers the model never
    uses are not built, so DDP needs no unused-parameter search.
    saved_config: the tower's Hugging Face config dict as a checkpoint recorded it (tower_configs): the tower
    is rebuilt from it, at random, for the checkpoint's weights, with no access to the tower's source.
    """
    name = getattr(cfg, f"{modality}_tower")
    pretrained = getattr(cfg, f"{modality}_pretrained")
    families = TEXT_FAMILIES if modality == "text" else VISION_FAMILIES
    dims, rates = _tower_overrides(cfg, modality)
    tower_key = f"{modality}_tower"
    offline_fix = "give a local directory (save_pretrained output), a family name or random_init_towers=True"
    from_table = cfg.random_init_towers and name not in families and not os.path.isdir(os.path.expanduser(name))
    if saved_config is not None:
        config = AutoConfig.for_model(**saved_config)
        dims = {}  # the recorded config already has the sizes it was built with
        pretrained = False
    elif name in families:
        config = families[name]()
        pretrained = False
    elif from_table:
        if name not in HUB_TOWERS:
            raise TowerLoadError(f"random_init_towers: {tower_key} '{name}' is not a hub model it knows "
                                 f"({', '.join(HUB_TOWERS)}); give a family name and its dimensions instead")
        family, hub_dims = HUB_TOWERS[name]
        if family not in families:
            raise TowerLoadError(f"random_init_towers: {tower_key} '{name}' is a {family} model, "
                                 f"not a {modality} tower")
        config = families[family](**hub_dims)
        pretrained = False
    else:
        config = from_hub_or_directory(AutoConfig.from_pretrained, name, tower_key, offline_fix)
    allowed = TEXT_MODEL_TYPES if modality == "text" else VISION_MODEL_TYPES
    if config.model_type not in allowed:
        kind = "text encoder of the BERT family" if modality == "text" else "transformer vision encoder"
        raise TowerLoadError(f"{modality}_tower '{name}' has model_type '{config.model_type}', not a {kind} "
                             f"(supported: {', '.join(sorted(allowed))})")
    if dims and pretrained:
        raise TowerLoadError(f"{modality} tower dimensions {sorted(dims)} are set but '{name}' is loaded "
                             f"pretrained; set {modality}_pretrained=False to build it at those sizes")
    mlp_ratio = dims.pop("mlp_ratio", None)
    for key, value in {**dims, **rates}.items():
        setattr(config, key, value)
    if mlp_ratio:
        config.intermediate_size = int(mlp_ratio * config.hidden_size)
    if modality == "text" and not pretrained and vocab_size is not None and not from_table:
        config.vocab_size = vocab_size
    if modality == "vision" and not pretrained:
        config.image_size = cfg.image_size
        if cfg.patch_size > 0:
            config.patch_size = cfg.patch_size
    model_class, kwargs = tower_class(config)
    # attention.tower_attention where the family calls attention through transformers' interface (a GPU gets SDPA
    # there too), SDPA where it does not
    config._attn_implementation = TOWER_ATTENTION if getattr(model_class, "_supports_attention_backend", False) \
        else "sdpa"
    if pretrained:
        tower = from_hub_or_directory(lambda path, **flags: model_class.from_pretrained(path, config=config, **kwargs,
                                                                                         **flags),
                                      name, f"{tower_key} weights", offline_fix)
    else:
        tower = model_class(config, **kwargs)
    for module in list(tower.modules()):  # the towers' dropout draws attention.py's cheap masks on the CPU too
        for child_name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, child_name, Dropout(child.p))
    return tower


def tower_class(config):
    """The Hugging Face model class of `config`, and the keyword that leaves out a pooler the model never uses."""
    model_class = AutoModel._model_mapping[type(config)]
    kwargs = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}
    return model_class, kwargs


def layers_path(tower):
    for path in ("encoder.layer", "layers", "encoder.layers", "transformer.layer"):
        try:
            tower.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise TowerLoadError(f"cannot find the transformer layers of {type(tower).__name__}")


def tower_layers(tower):
    """The tower's stack of transformer layers (attribute names differ between families)."""
    return tower.get_submodule(layers_path(tower))


def tower_parts(tower):
    """Dotted names of the tower's parts, bottom to top: (embeddings, [layer 0 .. n-1], final parts).

    "Train only the top k layers" freezes the embeddings and the layers below the top k: one number.
    """
    path = layers_path(tower)
    layers = [f"{path}.{i}" for i in range(len(tower.get_submodule(path)))]
    children = [n for n, m in tower.named_children() if any(True for _ in m.parameters())]
    embeddings = [n for n in children if n in ("embeddings", "embeddings_project")]
    final = [n for n in children if n not in embeddings and n != path.split(".")[0]]
    return embeddings, layers, final


def requires_grad(module):
    return any(p.requires_grad for p in module.parameters())


def init_new(module, bert_init):
    """`module` with BERT's initialisation when bert_init (init_new_modules="bert"), else PyTorch's defaults."""
    return init_bert_style(module) if bert_init else module


def init_bert_style(module):
    """BERT's initialisation, as the original gives every module it adds: Linear and Embedding weights
    N(0, 0.02) with zero biases, LayerNorm weight 1 and bias 0. Returns the module."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


