"""Several named adapters on one model: list, switch, disable, delete.

`klora.apply(model, ..., adapter_name="a")` adds adapter `"a"` (and makes it
active); `klora.load_adapter(model, path, adapter_name="b")` adds one from a
file. Each LoRA layer keeps the active adapter in its `lora_a` / `lora_b`
variables and the others as host arrays, so `set_adapter` assigns new values
into the same variables: when the adapters have equal ranks, scales and
target layers, compiled `predict` / `fit` functions are reused without
retracing. Otherwise the compiled functions of `model` are reset and rebuilt
on the next call (recompile before training after such a switch).

>>> klora.apply(backbone, rank=8, adapter_name="sst2")
>>> klora.apply(backbone, rank=8, adapter_name="imdb")      # now active
>>> klora.set_adapter(backbone, "sst2")
>>> with klora.disable_adapters(backbone):
...     base_outputs = backbone.predict(x)
>>> klora.delete_adapter(backbone, "imdb")
"""

import contextlib

import numpy as np

from klora.adapted_model import AdaptedModel, forget_adapters
from klora.apply import adapted_layers
from klora.merge import _remove_adapter, _require_adapters, _reset_compiled_functions


def adapter_names(model):
    """Names of the adapters on `model`, in the order they were added."""
    names = {}
    for layer in adapted_layers(model):
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def active_adapter(model):
    """The name of `model`'s active adapter (`None` if it has no adapters)."""
    names = {l.active_adapter for l in adapted_layers(model)} - {None}
    return next(iter(names), None)


def _check_name(model, name):
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"Model '{model.name}' has no adapter named {name!r}. "
                         f"Its adapters: {names}.")


def _check_unmerged(model, action):
    merged = [l.path for l in adapted_layers(model) if l.merged]
    if merged:
        raise ValueError(f"Cannot {action} while adapters are merged into the kernels "
                         f"({merged[:3]}...): call `klora.unmerge(model)` first.")


def set_adapter(model, name):
    """Makes adapter `name` the active one of `model` (the one that runs, trains and merges).

    Layers that do not hold `name` get a zero update. Switching between
    adapters of equal ranks, scales and target layers only assigns values and
    causes no retracing; other switches reset `model`'s compiled functions.

    >>> klora.set_adapter(classifier, "imdb")
    """
    layers = _require_adapters(model)
    _check_name(model, name)
    if active_adapter(model) != name:
        _check_unmerged(model, "switch adapters")
    changed = False
    for layer in layers:
        changed |= layer.activate_adapter(name if name in layer.adapter_names else None)
    if changed:
        _reset_compiled_functions(model)
    return model


def delete_adapter(model, name):
    """Removes adapter `name` from `model`.

    If it was active, the first remaining adapter becomes active. Layers left
    without any adapter become plain Keras layers again (nothing is merged).
    """
    layers = _require_adapters(model)
    _check_name(model, name)
    _check_unmerged(model, "delete an adapter")
    others = [n for n in adapter_names(model) if n != name]
    if active_adapter(model) == name and others:
        set_adapter(model, others[0])
    changed = False
    for layer in layers:
        if name not in layer.adapter_names:
            continue
        if layer.adapter_names == [name]:
            _remove_adapter(layer, merge=False)
            changed = True
        else:
            layer.delete_adapter(name)
    for sub in model._flatten_layers(include_self=True):
        if isinstance(sub, AdaptedModel):
            remaining = {l.path for l in adapted_layers(sub)}
            paths = tuple(p for p in sub._klora_paths if p in remaining)
            if paths:
                object.__setattr__(sub, "_klora_paths", paths)
            else:
                forget_adapters(sub)
    if changed:
        _reset_compiled_functions(model)
    return model


@contextlib.contextmanager
def disable_adapters(model):
    """A context in which `model` runs as its base model (every update is zero).

    The adapters' `B` matrices are set to zero on entry and restored on exit;
    only values change, so compiled functions are not retraced.

    >>> with klora.disable_adapters(backbone):
    ...     base = backbone.predict(x)
    """
    layers = _require_adapters(model)
    _check_unmerged(model, "disable adapters")
    saved = [(layer, np.array(layer.adapter_weights(layer.active_adapter)[1]))
             for layer in layers if layer.active_adapter is not None]
    try:
        for layer, b in saved:
            layer.lora_b.assign(np.zeros_like(b))
        yield model
    finally:
        for layer, b in saved:
            layer.lora_b.assign(b)
