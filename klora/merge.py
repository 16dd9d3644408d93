"""Fold adapters into their kernels and back, or remove klora from a model."""

import numpy as np
from keras import ops

from klora.adapted_model import (adapted_layers, forget_heads, forget_removed_layers,
                                 require_adapters, reset_compiled_functions)
from klora.layers import quantized
from klora.speed.fast_layers import restore_layers


def merge(model):
    """Folds the active adapter into every kernel: `W += scale * A @ B`.

    The forward pass then runs the plain base computation (the base model's
    cost); `unmerge` undoes it. Call it on the outermost model you will run,
    so that its compiled functions are rebuilt.

    >>> klora.merge(classifier)
    >>> classifier.predict(x)   # same outputs, base-model speed
    """
    for layer in require_adapters(model):
        layer.merge()
    reset_compiled_functions(model)
    return model


def unmerge(model):
    """Subtracts every merged adapter from its kernel again: `W -= scale * A @ B`."""
    for layer in require_adapters(model):
        layer.unmerge()
    reset_compiled_functions(model)
    return model


def unload(model):
    """Merges the active adapter and turns the LoRA layers back into plain Keras layers.

    What remains is the original model class with the adapted kernels (and
    the active adapter's head); it saves and loads without klora. Other named
    adapters are discarded. Base weights stay frozen, as in PEFT's
    `merge_and_unload`; set `variable.trainable = True` to train them.

    >>> plain = klora.unload(classifier)
    >>> plain.save("merged.keras")   # loads without klora installed
    """
    for layer in require_adapters(model):
        layer.merge()
        layer.revert()
    restore_layers(model)
    forget_removed_layers(model)
    forget_heads(model, everything=True)
    reset_compiled_functions(model)
    return model


def merged_weights(model):
    """`{variable path: array}`: the weights `unload` would leave, computed without changing
    `model`: each adapted kernel in float with the active adapter folded in, every other
    weight as it is, and no adapter or quantization variables.

    >>> weights = klora.merge.merged_weights(classifier)   # e.g. for an export
    """
    weights, skipped = {}, set()
    for layer in adapted_layers(model):
        kernel = layer.flat_kernel()
        if layer.active_adapter is not None and not layer.merged:
            kernel = layer.variant.merged(layer, kernel)
        weights[layer._kernel.path] = np.asarray(ops.convert_to_numpy(
            layer._to_kernel_layout(kernel)), "float32")
        skipped |= {id(v) for v in layer.weights if v is not layer.bias}
    for layer in model._flatten_layers(include_self=False):
        if quantized.is_quantized(layer) and id(layer._kernel) not in skipped:
            weights[layer._kernel.path] = np.asarray(ops.convert_to_numpy(
                quantized.dequantized_kernel(layer)), "float32")
            skipped |= {id(v) for v in layer.weights if v is not layer.bias}
    for variable in model.weights:
        if id(variable) not in skipped:
            weights[variable.path] = np.asarray(ops.convert_to_numpy(variable))
    return weights
