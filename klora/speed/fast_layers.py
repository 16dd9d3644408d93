"""Swap a model's Dropout layers for klora's faster equivalent, and back.

`klora.apply` calls `use_fast_layers`; `klora.unload` calls `restore_layers`.
The swap changes a layer's class in place (weights, names and config stay),
and only touches layers of exactly the Keras class, not subclasses.

>>> use_fast_layers(backbone)      # Dropout -> FastDropout, MultiHeadAttention -> Fast...
>>> restore_layers(backbone)       # and back

Another attention layout, batched matmuls with the heads moved in front of the
sequence axes, was measured too and left out: in a MiniLM training step (batch 32 x 128)
XLA ran it 0.1 s slower than Keras' einsums.
"""

import keras

from klora.speed.fast_attention import FastMultiHeadAttention
from klora.speed.fast_dropout import FastDropout

FAST_CLASSES = {
    keras.layers.Dropout: FastDropout,
    keras.layers.MultiHeadAttention: FastMultiHeadAttention,
}


def swap_classes(model, classes):
    """Gives every layer of `model` (itself included) whose exact class is a key of
    `classes` the class it maps to, in place; returns the layers it changed."""
    swapped = [layer for layer in model._flatten_layers(include_self=True)
               if type(layer) in classes]
    for layer in swapped:
        layer.__class__ = classes[type(layer)]
    return swapped


def use_fast_layers(model):
    """Turns the Keras layers in `FAST_CLASSES` inside `model` into klora's versions."""
    swap_classes(model, FAST_CLASSES)


def restore_layers(model):
    """Turns klora's fast layers inside `model` back into their Keras classes."""
    swap_classes(model, {fast: base for base, fast in FAST_CLASSES.items()})
