"""Fold adapters into their kernels and back, or remove klora from a model."""

import keras

from klora.adapted_model import AdaptedModel, forget_adapters
from klora.apply import LORA_CLASSES, adapted_layers
from klora.fast_layers import restore_layers


def _require_adapters(model):
    layers = adapted_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no LoRA layers: call `klora.apply(model)` first."
        )
    return layers


def _reset_compiled_functions(model):
    # Compiled train/test/predict functions captured the layers' merged state.
    for layer in model._flatten_layers(include_self=True):
        if isinstance(layer, keras.Model):
            layer.train_function = layer.test_function = layer.predict_function = None


def merge(model):
    """Folds every adapter into its kernel: `W += scale * A @ B`.

    The forward pass then runs the plain base computation (the base model's
    cost); `unmerge` undoes it. Call it on the outermost model you will run,
    so that its compiled functions are rebuilt.

    >>> klora.merge(classifier)
    >>> classifier.predict(x)   # same outputs, base-model speed
    """
    for layer in _require_adapters(model):
        layer.merge()
    _reset_compiled_functions(model)
    return model


def unmerge(model):
    """Subtracts every merged adapter from its kernel again: `W -= scale * A @ B`."""
    for layer in _require_adapters(model):
        layer.unmerge()
    _reset_compiled_functions(model)
    return model


def _remove_adapter(layer, merge=True):
    if merge:
        layer.merge()
    base_class = next(base for base, lora in LORA_CLASSES.items() if isinstance(layer, lora))
    layer._drop_lora()
    layer.__class__ = base_class


def unload(model):
    """Merges every adapter and turns the LoRA layers back into plain Keras layers.

    What remains is the original model class with the adapted kernels; it saves
    and loads without klora. Base weights stay frozen, as in PEFT's
    `merge_and_unload`; set `variable.trainable = True` to train them.

    >>> plain = klora.unload(classifier)
    >>> plain.save("merged.keras")   # loads without klora installed
    """
    for layer in _require_adapters(model):
        _remove_adapter(layer)
    restore_layers(model)
    for layer in model._flatten_layers(include_self=True):
        if isinstance(layer, AdaptedModel):
            forget_adapters(layer)
    _reset_compiled_functions(model)
    return model
