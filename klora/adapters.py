"""Several named adapters on one model: list, switch, disable, delete.

`klora.apply(model, ..., adapter_name="a")` adds adapter `"a"` (and makes it
active); `klora.load_adapter(model, path, adapter_name="b")` adds one from a
file. Each LoRA layer keeps the active adapter in its variables and the
others as host arrays, so `set_adapter` assigns new values into the same
variables: when the adapters have equal ranks, scales and target layers,
compiled `predict` / `fit` functions are reused without retracing. Otherwise
the compiled functions of `model` are reset and rebuilt on the next call
(recompile before training after such a switch).

Trained weights outside the adapters (a Task's head) belong to the adapter
that trained them: call these functions on the Task, and each adapter keeps
its own head, as PEFT's `modules_to_save` does.

>>> klora.apply(classifier, rank=8, adapter_name="sst2")
>>> klora.apply(classifier, rank=8, adapter_name="imdb")      # now active
>>> klora.set_adapter(classifier, "sst2")                     # sst2's head too
>>> with klora.disable_adapters(classifier):
...     base_outputs = classifier.predict(x)
>>> klora.delete_adapter(classifier, "imdb")
"""

import contextlib

from klora.adapted_model import (ORIGINAL, activate, active_adapter, adapter_names,
                                 forget_heads, forget_removed_layers, require_adapters,
                                 reset_compiled_functions, swap_heads)

__all__ = ["active_adapter", "adapter_names", "delete_adapter", "disable_adapters",
           "set_adapter"]


def _check_name(model, name):
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"Model '{model.name}' has no adapter named {name!r}. "
                         f"Its adapters: {names}.")


def _check_unmerged(model, action):
    merged = [l.path for l in require_adapters(model) if l.merged]
    if merged:
        raise ValueError(f"Cannot {action} while adapters are merged into the kernels "
                         f"({merged[:3]}...): call `klora.unmerge(model)` first.")


def set_adapter(model, name):
    """Makes adapter `name` the active one of `model` (the one that runs, trains and merges).

    Layers that do not hold `name` get a zero update; the head weights become
    `name`'s. Switching between adapters of equal ranks, scales and target
    layers only assigns values and causes no retracing; other switches reset
    `model`'s compiled functions.

    >>> klora.set_adapter(classifier, "imdb")
    """
    require_adapters(model)
    _check_name(model, name)
    if active_adapter(model) != name:
        _check_unmerged(model, "switch adapters")
        activate(model, name)
    return model


def delete_adapter(model, name):
    """Removes adapter `name` (and its head weights) from `model`.

    If it was active, the first remaining adapter becomes active. Layers left
    without any adapter become plain Keras layers again (nothing is merged).
    """
    layers = require_adapters(model)
    _check_name(model, name)
    _check_unmerged(model, "delete an adapter")
    others = [n for n in adapter_names(model) if n != name]
    if active_adapter(model) == name and others:
        set_adapter(model, others[0])
    for layer in layers:
        if layer.adapter_names == [name]:
            layer.revert()
        elif name in layer.adapter_names:
            layer.delete_adapter(name)
    forget_heads(model, name)
    forget_removed_layers(model)
    reset_compiled_functions(model)
    return model


@contextlib.contextmanager
def disable_adapters(model):
    """A context in which `model` runs as its base model (every update is zero).

    The head weights are those from before any adapter where klora saw them
    (`apply` or `load_adapter` on the Task), else the active adapter's. Only
    values change, so compiled functions are not retraced.

    >>> with klora.disable_adapters(backbone):
    ...     base = backbone.predict(x)
    """
    layers = require_adapters(model)
    _check_unmerged(model, "disable adapters")
    name = active_adapter(model)
    saved = [(layer, layer.adapter_values(name)) for layer in layers
             if layer.active_adapter is not None]
    try:
        for layer, _ in saved:
            for key, value in layer.neutral_values().items():
                getattr(layer, key).assign(value)
        swap_heads(model, name, ORIGINAL)
        yield model
    finally:
        swap_heads(model, None, name)
        for layer, values in saved:
            for variable in layer.lora_variables():
                variable.assign(values[variable.name])
