"""Swap a model's Dropout layers for klora's faster equivalent, and back.

`klora.apply` calls `use_fast_layers`; `klora.unload` calls `restore_layers`.
The swap changes a layer's class in place (weights, names and config stay),
and only touches layers of exactly the Keras class, not subclasses.

>>> use_fast_layers(backbone)      # Dropout -> FastDropout
>>> restore_layers(backbone)       # and back

A batched-matmul `MultiHeadAttention` (heads moved in front of the sequence
axes) was measured too and left out: in a MiniLM training step (batch 32 x 128)
XLA ran it 0.1 s slower than Keras' einsums.
"""

import keras

from klora.layers import FastDropout

FAST_CLASSES = {keras.layers.Dropout: FastDropout}


def use_fast_layers(model):
    """Turns the Keras layers in `FAST_CLASSES` inside `model` into klora's versions."""
    for layer in model._flatten_layers(include_self=False):
        fast = FAST_CLASSES.get(type(layer))
        if fast is not None:
            layer.__class__ = fast


def restore_layers(model):
    """Turns klora's fast layers inside `model` back into their Keras classes."""
    plain = {fast: base for base, fast in FAST_CLASSES.items()}
    for layer in model._flatten_layers(include_self=False):
        base = plain.get(type(layer))
        if base is not None:
            layer.__class__ = base
