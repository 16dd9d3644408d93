"""`klora.apply`: add LoRA adapters to the linear layers of a built model."""

import math
import re

import keras

from klora.adapted_model import AdaptedModel, adapted_class
from klora.layers import LoRADense, LoRAEinsumDense, LoRALayer
from klora.fast_layers import use_fast_layers
from klora.layers.lora_layer import DEFAULT_ADAPTER, check_lora_arguments

LORA_CLASSES = {keras.layers.Dense: LoRADense, keras.layers.EinsumDense: LoRAEinsumDense}
ALL_LINEAR = "all-linear"


def is_linear(layer):
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))


def adapted_layers(model):
    """The LoRA layers inside `model`, in traversal order.

    >>> [layer.path for layer in klora.adapted_layers(backbone)][:2]
    ['transformer_layer_0/self_attention_layer/value', 'transformer_layer_0/self_attention_layer/query']
    """
    return [l for l in model._flatten_layers(include_self=False) if isinstance(l, LoRALayer)]


def adapt_layer(layer, rank=8, alpha=None, lora_dropout=0.0, use_rslora=False,
                init="kaiming", seed=None, merged=False, adapter_name=DEFAULT_ADAPTER):
    """Turns one built `Dense` or `EinsumDense` into its LoRA class in place.

    The layer keeps its name, path, kernel and bias (now frozen); `lora_a` and
    `lora_b` are added and hold the active adapter `adapter_name`. Raises a
    `ValueError` for other layer types.
    """
    lora_class = LORA_CLASSES.get(type(layer))
    if lora_class is None:
        raise ValueError(
            f"Layer '{layer.path}' of type {type(layer).__name__} is not supported: "
            "klora adapts keras.layers.Dense and keras.layers.EinsumDense "
            "(exactly those classes, not subclasses)."
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer '{layer.path}' already has Keras' built-in LoRA enabled "
            "(`enable_lora`); use one or the other."
        )
    check_lora_arguments(rank, alpha, lora_dropout, init)
    base_class = type(layer)
    layer.__class__ = lora_class
    try:
        layer._init_lora(rank, alpha, lora_dropout, use_rslora, init, seed, merged,
                         adapter_name)
        layer._build_lora()
    except Exception:
        layer.__class__ = base_class
        raise
    return layer


def record_adapters(model, paths):
    """Remembers on `model` which layer paths it adapted, for `get_config`."""
    if not isinstance(model, AdaptedModel):
        model.__class__ = adapted_class(type(model))
        object.__setattr__(model, "_klora_paths", ())
    new = tuple(p for p in paths if p not in model._klora_paths)
    object.__setattr__(model, "_klora_paths", model._klora_paths + new)


def _matches(target, layer):
    return target == layer.name or re.fullmatch(target, layer.path or "") is not None


def _frozen_scope(model):
    """The part of `model` whose weights LoRA freezes: a Task's backbone, else all."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, keras.layers.Layer) else model


def freeze_base_weights(model):
    """Makes every weight under `model` (a Task: its backbone) untrainable but the adapters."""
    adapters = {id(v) for l in adapted_layers(model) for v in (l.lora_a, l.lora_b)}
    for variable in _frozen_scope(model).weights:
        if id(variable) not in adapters:
            variable.trainable = False


def apply(
    model,
    rank=8,
    alpha=None,
    dropout=0.0,
    targets=("query", "value"),
    exclude=(),
    use_rslora=False,
    init="kaiming",
    seed=None,
    adapter_name=DEFAULT_ADAPTER,
):
    """Adds LoRA adapters to a built Keras model in place and freezes its base weights.

    Every `Dense` / `EinsumDense` layer matched by `targets` (at any depth)
    becomes a `LoRADense` / `LoRAEinsumDense` holding the same kernel. Then
    every weight of the model is frozen except the adapters; for a keras-hub
    Task the freezing covers its backbone, so the Task's head stays trainable.
    Heads built on top of an adapted backbone afterwards are trainable too.
    The model's `Dropout` layers become `klora.layers.FastDropout` (same
    statistics, a cheaper random mask on JAX) and its `MultiHeadAttention`
    layers `klora.layers.FastMultiHeadAttention` (same results, all cores on
    JAX's CPU backend); see `klora.fast_layers`.

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
        init: `"kaiming"` (PEFT's default) or `"gaussian"` initialization of A.
        seed: Optional integer seed for the initializers and dropout.
        adapter_name: Name of the adapter. A model can hold several named
            adapters (see `klora.set_adapter`); adding one makes it active.

    Returns:
        `model`, adapted.

    Example:

    >>> backbone = keras_hub.models.BertBackbone.from_preset(path)
    >>> klora.apply(backbone, rank=8, alpha=16, dropout=0.1)
    >>> klora.summary(backbone)
    """
    check_lora_arguments(rank, alpha, dropout, init)
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"`model` must be a Keras model or layer. Received: {type(model)}")
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built: build it first (load it with "
            "`from_preset`, call it on data, or call `model.build(input_shape)`)."
        )
    if isinstance(targets, str):
        targets = (targets,)
    if isinstance(exclude, str):
        exclude = (exclude,)
    layers = model._flatten_layers(include_self=False)
    if tuple(targets) == (ALL_LINEAR,):
        scope = _frozen_scope(model)
        scope_layers = {id(l) for l in scope._flatten_layers(include_self=scope is not model)}
        chosen = [l for l in layers if is_linear(l) and id(l) in scope_layers]
    elif ALL_LINEAR in targets:
        raise ValueError(f"'{ALL_LINEAR}' cannot be combined with other targets: {targets}")
    else:
        chosen = [l for l in layers if any(_matches(t, l) for t in targets)]
    chosen = [l for l in chosen if not any(_matches(e, l) for e in exclude)]
    if not chosen:
        names = sorted({l.name for l in layers if is_linear(l)})
        raise ValueError(
            f"No layer of '{model.name}' matches targets={tuple(targets)} "
            f"(exclude={tuple(exclude)}). Linear layers it has: {names}. Targets "
            f"are layer names, full-match regexes on `layer.path`, or '{ALL_LINEAR}'."
        )
    already = [l.path for l in chosen
               if isinstance(l, LoRALayer) and adapter_name in l.adapter_names]
    if already:
        raise ValueError(
            f"Layers already adapted (adapter {adapter_name!r}): {already}. Call "
            "`klora.unload(model)` first, choose other targets, or pass another "
            "`adapter_name`."
        )
    existing = adapted_layers(model)
    if any(l.merged for l in existing):
        raise ValueError("The model's adapters are merged: call `klora.unmerge(model)` "
                         "before adding adapters.")
    unsupported = [f"{l.path} ({type(l).__name__})" for l in chosen
                   if type(l) not in LORA_CLASSES and not isinstance(l, LoRALayer)]
    if unsupported:
        raise ValueError(
            f"Targets matched layers klora cannot adapt: {unsupported}. Only "
            "keras.layers.Dense and keras.layers.EinsumDense are supported."
        )
    paths = [l.path for l in chosen]
    if len(set(paths)) != len(paths):
        raise ValueError(f"Matched layers share a path, so adapters cannot be recorded: {paths}")

    settings = dict(rank=rank, alpha=alpha, lora_dropout=dropout,
                    use_rslora=use_rslora, init=init, seed=seed)
    # Check every layer can take the rank before changing any of them.
    for layer in chosen:
        lora_class = type(layer) if isinstance(layer, LoRALayer) else LORA_CLASSES[type(layer)]
        in_dims, out_dims = lora_class._lora_shapes(layer)
        width = min(math.prod(in_dims), math.prod(out_dims))
        if rank > width:
            raise ValueError(
                f"`rank`={rank} is too large for layer '{layer.path}' (input "
                f"width {math.prod(in_dims)}, output width {math.prod(out_dims)}): use a "
                f"rank between 1 and {width}."
            )
    for layer in chosen:
        if isinstance(layer, LoRALayer):
            layer.add_adapter(adapter_name, settings)
        else:
            adapt_layer(layer, **settings, adapter_name=adapter_name)
    freeze_base_weights(model)
    use_fast_layers(model)
    record_adapters(model, paths)
    if existing:
        from klora.adapters import set_adapter

        set_adapter(model, adapter_name)
    return model

