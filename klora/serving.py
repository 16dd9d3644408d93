"""Many adapters on one base model: each row of a batch with its own adapter.

`predict_with_adapters(model, inputs, adapter_names)` runs row `i` with adapter
`adapter_names[i]` (`"__base__"`: the base model) in one compiled function. Every
adapter's `A` and `scale * B` are stacked per layer (ranks padded with zeros, and
zeros for an adapter a layer does not hold), every adapter's trained head too, and
each row gathers its own: `x @ W + (x @ A[i]) @ B[i]`. Which rows use which adapter
is data, so changing it recompiles nothing; only new shapes or adapter sets do.
PEFT offers mixed batches in eager torch only.

DoRA adapters rescale the base kernel per adapter and are refused here: switch to
them with `klora.set_adapter`. So are layers whose output axes do not come last.

>>> klora.predict_with_adapters(classifier, x, ["sst2", "imdb", "__base__", "sst2"])
"""

import keras
import numpy as np
from keras import ops

from klora import adapted_model
from klora.adapted_model import (active_adapter, head_variables, require_adapters,
                                 stored_head_values)
from klora.layers import quantized

BASE = "__base__"


class _MixedLoRA:
    """Placed before a LoRA layer's class while a mixed batch runs: the update is each
    row's own adapter's, from the stacks `MixedAdapters` holds."""

    def call(self, inputs, training=None):
        product = self._product(quantized.base_inputs(self, inputs), self.base_kernel())
        x = product if self.bias is None else ops.add(product, self.bias)
        a, b = (ops.take(stack, self._mixed_rows, axis=0) for stack in self._mixed_stacks)
        in_dims, out_dims = self._lora_dims()
        shape = ops.shape(inputs)
        flat = ops.reshape(inputs, (shape[0], -1, a.shape[1]))
        update = ops.einsum("bsr,bro->bso", ops.einsum("bsi,bir->bsr", flat, a), b)
        x = ops.add(x, ops.reshape(ops.cast(update, x.dtype),
                                   tuple(shape[: len(shape) - len(in_dims)]) + tuple(out_dims)))
        return self.activation(x) if self.activation is not None else x


class _MixedDense:
    """Placed before a head `Dense` layer's class while a mixed batch runs: each row
    multiplies by its own adapter's head kernel and adds its bias."""

    def call(self, inputs, training=None):
        kernel, bias = (ops.take(stack, self._mixed_rows, axis=0) for stack in self._mixed_stacks)
        shape = ops.shape(inputs)
        flat = ops.reshape(inputs, (shape[0], -1, shape[-1]))
        x = ops.add(ops.einsum("bsi,bio->bso", flat, kernel), ops.expand_dims(bias, 1))
        x = ops.reshape(x, tuple(shape[:-1]) + (kernel.shape[-1],))
        return self.activation(x) if self.activation is not None else x


_classes = {}


def _mixed_class(cls, mixin):
    """`cls` with `mixin` in front (made once per class); `_own_class` is `cls`."""
    if cls not in _classes:
        _classes[cls] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__,
                                                           "_own_class": cls})
    return _classes[cls]


def _lora_stacks(layer, names):
    """`(A, scale * B)` stacked over `names`: `(n, fan_in, r_max)`, `(n, r_max, fan_out)`.

    A name the layer does not hold gets an update of zero, or, on a kernel a PiSSA /
    OLoRA adapter decomposed, the initial `A0`, `B0` that give the original kernel back.
    """
    fan_in, fan_out = layer.layer_fans(layer)
    neutral = (np.zeros((fan_in, 1), "float32"), np.zeros((1, fan_out), "float32"))
    for name in layer.adapter_names:
        config = layer.adapter_config(name)
        if config.changes_base:
            values = layer.adapter_values(name)
            neutral = (values["lora_a0"], values["lora_b0"] * config.scale)
    pairs = []
    for name in names:
        if name in layer.adapter_names:
            config = layer.adapter_config(name)
            if config.use_dora:
                raise ValueError(f"Adapter {name!r} is a DoRA adapter, which rescales the base "
                                 "kernel per adapter: mixed batches take LoRA adapters; "
                                 "use `klora.set_adapter` for it.")
            values = layer.adapter_values(name)
            pairs.append((values["lora_a"], values["lora_b"] * config.scale))
        else:
            pairs.append(neutral)
    rank = max(a.shape[1] for a, _ in pairs)
    a = np.stack([np.pad(a, ((0, 0), (0, rank - a.shape[1]))) for a, _ in pairs])
    b = np.stack([np.pad(b, ((0, rank - b.shape[0]), (0, 0))) for _, b in pairs])
    return a.astype("float32"), b.astype("float32")


def _head_stacks(model, layer, names, original):
    """A head Dense layer's `(kernel, bias)` stacked over `names` (the base: `original`)."""
    kernels, biases = [], []
    for name in names:
        values = original if name == BASE else stored_head_values(model, name)
        kernels.append(values.get(layer.kernel.path, ops.convert_to_numpy(layer.kernel)))
        bias = None if layer.bias is None else layer.bias.path
        biases.append(values.get(bias, ops.convert_to_numpy(layer.bias)) if bias else
                      np.zeros(layer.kernel.shape[-1], "float32"))
    return np.stack(kernels).astype("float32"), np.stack(biases).astype("float32")


class MixedAdapters(keras.Model):
    """`model` with an extra input, `adapter_index` (one per row), selecting each row's
    adapter among `names`; its variables hold the stacked adapters and heads."""

    def __init__(self, model, names, **kwargs):
        super().__init__(**kwargs)
        self.inner, self.names = model, list(names)
        self.lora_layers = require_adapters(model)
        self.head_layers = [layer for layer, _ in head_variables(model)
                            if type(layer) is keras.layers.Dense]
        self.original_heads = stored_head_values(model, None)
        self.stacks = {}
        for layer in self.lora_layers + self.head_layers:
            shapes = [v.shape for v in self._values(layer)]
            self.stacks[id(layer)] = [self.add_weight(shape=s, initializer="zeros",
                                                      trainable=False) for s in shapes]

    def _values(self, layer):
        if any(layer is l for l in self.lora_layers):
            return _lora_stacks(layer, self.names)
        return _head_stacks(self.inner, layer, self.names, self.original_heads)

    def refresh(self):
        """Copies the adapters' and heads' current values into the stacks."""
        self.original_heads = stored_head_values(self.inner, None)
        for layer in self.lora_layers + self.head_layers:
            values = self._values(layer)
            if [v.shape for v in values] != [tuple(s.shape) for s in self.stacks[id(layer)]]:
                raise ValueError("The model's adapters changed shape since this mixed-batch "
                                 "function was built.")
            for variable, value in zip(self.stacks[id(layer)], values):
                variable.assign(value)

    def call(self, inputs):
        inputs = dict(inputs)
        rows = ops.cast(inputs.pop("adapter_index"), "int32")
        for layer in self.lora_layers + self.head_layers:
            object.__setattr__(layer, "_mixed_rows", rows)
            object.__setattr__(layer, "_mixed_stacks", self.stacks[id(layer)])
        return self.inner(inputs, training=False)

    def swap(self, on):
        """Gives the layers their mixed classes (`on`) or their own back."""
        for layers, mixin in ((self.lora_layers, _MixedLoRA), (self.head_layers, _MixedDense)):
            for layer in layers:
                own = getattr(type(layer), "_own_class", type(layer))
                layer.__class__ = _mixed_class(own, mixin) if on else own


def predict_with_adapters(model, inputs, adapter_names):
    """`model`'s outputs for `inputs` where row `i` uses adapter `adapter_names[i]`.

    Args:
        model: A model holding several named adapters (`klora.apply` /
            `klora.load_adapter` with `adapter_name=`), unmerged.
        inputs: A batch (a dict of arrays, e.g. `token_ids` and `padding_mask`).
        adapter_names: One adapter name per row; `"__base__"` for the base model
            (with the head as it was before any adapter, where klora knows it).

    Returns:
        The outputs as NumPy arrays, row by row equal to running each row after
        `klora.set_adapter(model, name)` (`"__base__"`: `klora.disable_adapters`).
        Adapters of different ranks (padded) and with their own heads are fine;
        DoRA adapters are refused.
    """
    layers = require_adapters(model)
    if any(layer.merged for layer in layers):
        raise ValueError("The model's adapters are merged: call `klora.unmerge(model)` first.")
    known = adapted_model.adapter_names(model)
    unknown = sorted({n for n in adapter_names if n != BASE and n not in known})
    batch = len(next(iter(inputs.values())))
    if unknown or len(adapter_names) != batch:
        raise ValueError(f"`adapter_names` must name one of {known} or {BASE!r} for each of the "
                         f"{batch} rows (received {len(adapter_names)} names; unknown: {unknown}).")
    names = [BASE, *known]
    cache = vars(model).setdefault("_klora_mixed", {})
    key = (tuple(names), active_adapter(model))
    if key not in cache:
        cache.clear()
        cache[key] = MixedAdapters(model, names)
    mixed = cache[key]
    mixed.refresh()
    index = np.array([names.index(n) for n in adapter_names], "int32")
    mixed.swap(True)
    try:
        return mixed.predict_on_batch({**inputs, "adapter_index": index})
    finally:
        mixed.swap(False)
