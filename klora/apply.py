"""`klora.apply`: add LoRA adapters to the linear layers of a built model."""

import re

import keras

from klora.adapted_model import adapt_model, check_built, frozen_scope
from klora.config import DEFAULT_ADAPTER, LoraConfig, derive_seed

ALL_LINEAR = "all-linear"


def is_linear(layer):
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))


def _names(value, argument):
    names = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"`{argument}` must be a string or a sequence of non-empty strings. "
                         f"Received: {argument}={value!r}")
    for name in names:
        try:
            re.compile(name)
        except re.error as e:
            raise ValueError(f"`{argument}` entry {name!r} is neither a layer name nor a "
                             f"valid regular expression ({e}).") from None
    return names


def _matches(target, layer):
    return target == layer.name or re.fullmatch(target, layer.path or "") is not None


def target_layers(model, targets=("query", "value"), exclude=()):
    """The layers of `model` that `targets` and `exclude` select, in traversal order.

    `targets` are layer names, regular expressions matched in full against
    `layer.path`, or the single string `"all-linear"` (every `Dense` /
    `EinsumDense` of the backbone that the model uses; a Task's head is left
    out). Raises a
    `ValueError` listing the linear layers when nothing matches.
    """
    targets, exclude = _names(targets, "targets"), _names(exclude, "exclude")
    layers = model._flatten_layers(include_self=False)
    if targets == (ALL_LINEAR,):
        scope = frozen_scope(model)
        inside = {id(l) for l in scope._flatten_layers(include_self=scope is not model)}
        unused = getattr(model, "unused_backbone_layers", ())  # e.g. a token model's pooler
        chosen = [l for l in layers if is_linear(l) and id(l) in inside and l.name not in unused]
    elif ALL_LINEAR in targets:
        raise ValueError(f"'{ALL_LINEAR}' cannot be combined with other targets: {targets}")
    else:
        chosen = [l for l in layers if any(_matches(t, l) for t in targets)]
    chosen = [l for l in chosen if not any(_matches(e, l) for e in exclude)]
    if not chosen:
        names = sorted({l.name for l in layers if is_linear(l)})
        raise ValueError(
            f"No layer of '{model.name}' matches targets={targets} (exclude={exclude}). "
            f"Linear layers it has: {names}. Targets are layer names, full-match regexes on "
            f"`layer.path`, or '{ALL_LINEAR}'.")
    unsupported = [f"{l.path} ({type(l).__name__})" for l in chosen if not is_linear(l)]
    if unsupported:
        raise ValueError(f"Targets matched layers klora cannot adapt: {unsupported}. Only "
                         "keras.layers.Dense and keras.layers.EinsumDense are supported.")
    return chosen


def _match_pattern(pattern, layer, default):
    """The value of the first key of `pattern` that names or matches `layer`, or `default`."""
    for key, value in pattern.items():
        if _matches(key, layer):
            return value
    return default


def _check_patterns(patterns, layers):
    for argument, pattern in patterns.items():
        if not isinstance(pattern, dict):
            raise ValueError(f"`{argument}` must be a dict of layer names or path patterns to "
                             f"values. Received: {argument}={pattern!r}")
        _names(tuple(pattern), argument)
        unmatched = [k for k in pattern if not any(_matches(k, l) for l in layers)]
        if unmatched:
            raise ValueError(f"`{argument}` keys {unmatched} match none of the adapted layers "
                             f"({sorted({l.name for l in layers})}); keys are layer names or "
                             "full-match regexes on `layer.path`, like `targets`.")


def _in_blocks(layers, blocks):
    """The layers inside the transformer blocks numbered `blocks` (PEFT's layers_to_transform)."""
    if blocks is None:
        return layers
    blocks = [blocks] if isinstance(blocks, int) else list(blocks)
    if not blocks or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0
                             for b in blocks):
        raise ValueError(f"`layers_to_transform` must be a block index or a list of them. "
                         f"Received: {blocks!r}")
    index = {l: re.search(r"(?:^|/)transformer_layer_(\d+)/", l.path or "") for l in layers}
    present = {int(m.group(1)) for m in index.values() if m}
    missing = sorted(set(blocks) - present)
    if missing:
        raise ValueError(f"`layers_to_transform` names blocks {missing}, but the targeted "
                         f"layers lie in blocks {sorted(present)}.")
    return [l for l in layers if index[l] and int(index[l].group(1)) in blocks]


def _config(config, settings):
    if config is None:
        return LoraConfig(**settings)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"`config` must be a klora.LoraConfig. Received: {config!r}")
    defaults = LoraConfig()
    given = [k for k, v in settings.items() if v != getattr(defaults, k)]
    if given:
        raise ValueError(f"Pass the LoRA settings either as `config` or as arguments, not "
                         f"both (also given: {given}).")
    return config


def apply(model, rank=8, alpha=None, dropout=0.0, targets=("query", "value"), exclude=(),
          use_rslora=False, init="kaiming", seed=None, adapter_name=DEFAULT_ADAPTER,
          use_dora=False, rank_pattern=None, alpha_pattern=None, layers_to_transform=None,
          config=None):
    """Adds LoRA adapters to a built Keras model in place and freezes its base weights.

    Every `Dense` / `EinsumDense` layer matched by `targets` (at any depth)
    becomes a `LoRADense` / `LoRAEinsumDense` holding the same kernel. Then
    every weight of the model is frozen except the adapters; for a keras-hub
    Task the freezing covers its backbone, so the Task's head stays trainable
    (and, applied to the Task, each named adapter keeps its own head). Heads
    built on top of an adapted backbone afterwards are trainable too.
    The model's `Dropout` and `MultiHeadAttention` layers become klora's
    faster equivalents (same results; see `klora.speed.fast_layers`).

    Args:
        model: A built Keras model, e.g. a keras-hub `BertBackbone` from a preset
            or a `BertTextClassifier`.
        rank: Rank of each update.
        alpha: Scaling numerator (`scale = alpha / rank`); `None` means `rank`.
        dropout: Dropout rate on the adapter inputs during training, in [0, 1).
        targets: Layer names (`"query"`), regular expressions matched in full
            against `layer.path` (`r"transformer_layer_[0-2]/.*/query"`), or the
            single string `"all-linear"` for every linear layer of the backbone.
        exclude: Names or path patterns of layers to leave alone.
        use_rslora: Scale by `alpha / sqrt(rank)` (rank-stabilized LoRA).
        init: `"kaiming"` (PEFT's default) or `"gaussian"` random `A`; or
            `"pissa"`, `"pissa_niter_N"`, `"olora"`, which start `A`, `B` from
            the base kernel's SVD / QR and leave it the residual (see
            `klora.LoraConfig`).
        seed: Optional integer seed; every layer gets its own seed derived from
            it (`klora.config.derive_seed`), so the same seed gives the same
            model and no two layers share `A` or dropout masks.
        adapter_name: Name of the adapter. A model can hold several named
            adapters (see `klora.set_adapter`); adding one makes it active.
        use_dora: Weight-decomposed LoRA (DoRA).
        rank_pattern, alpha_pattern: `{layer name or path regex: rank / alpha}`
            for layers that differ from `rank` / `alpha` (matched like
            `targets`; the first matching key wins; every key must match).
        layers_to_transform: A transformer block index or a list of them: only
            targeted layers inside those blocks are adapted.
        config: A `klora.LoraConfig` instead of `rank` ... `seed`, `use_dora`.

    Returns:
        `model`, adapted.

    Example:

    >>> backbone = keras_hub.models.BertBackbone.from_preset(path)
    >>> klora.apply(backbone, rank=8, alpha=16, dropout=0.1)
    >>> klora.summary(backbone)
    """
    config = _config(config, dict(rank=rank, alpha=alpha, dropout=dropout,
                                  use_rslora=use_rslora, init=init, seed=seed,
                                  use_dora=use_dora))
    check_built(model)
    layers = _in_blocks(target_layers(model, targets, exclude), layers_to_transform)
    patterns = {"rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}}
    _check_patterns(patterns, layers)
    plan = {}
    for layer in layers:  # each layer its own seed, and the rank and alpha of its pattern
        plan[layer] = config.replace(
            seed=derive_seed(config.seed, adapter_name, layer.path),
            rank=_match_pattern(patterns["rank_pattern"], layer, config.rank),
            alpha=_match_pattern(patterns["alpha_pattern"], layer, config.alpha))
    return adapt_model(model, plan, adapter_name)
