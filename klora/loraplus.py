"""LoRA+ (Hayou et al. 2024): the `B` matrices learn `ratio` times faster than the rest.

The paper shows that `A` and `B` want different learning rates, and that a ratio
of about 16 lets LoRA converge up to twice as fast. `loraplus` gives any Keras
optimizer that: every variable named `lora_b` (klora's `B`) is updated with
`ratio` times the learning rate (schedule included), everything else as before.
Weight decay stays at the base rate.

>>> optimizer = klora.loraplus(keras.optimizers.AdamW(2e-4), ratio=16)
>>> classifier.compile(optimizer=optimizer, loss=...)

The optimizer keeps its class name and config, so a model saved with it loads as
a plain optimizer: call `loraplus` again before training a loaded model further.
"""

import keras
from keras import ops

_classes = {}


def _loraplus_class(base):
    """A subclass of optimizer class `base` that scales the `B` matrices' learning rate."""
    if base not in _classes:

        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            step = super(cls, self)._backend_update_step
            pairs = list(zip(grads, trainable_variables))
            b = [(g, v) for g, v in pairs if v.name == "lora_b"]
            rest = [(g, v) for g, v in pairs if v.name != "lora_b"]
            if rest:
                step([g for g, _ in rest], [v for _, v in rest], learning_rate)
            if b:
                step([g for g, _ in b], [v for _, v in b],
                     ops.multiply(learning_rate, self.loraplus_ratio))

        cls = type(base.__name__, (base,), {"__module__": base.__module__,
                                            "_backend_update_step": _backend_update_step})
        _classes[base] = cls
    return _classes[base]


def loraplus(optimizer, ratio=16.0):
    """Makes `optimizer` (any Keras optimizer, before it is built) update every LoRA `B`
    matrix with `ratio` times its learning rate; returns it.

    Args:
        optimizer: A `keras.optimizers.Optimizer`, e.g. `AdamW(2e-4)`.
        ratio: Learning-rate ratio of `B` to `A` (the paper's lambda; 16 is its
            recommendation for most tasks).
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(f"`optimizer` must be a Keras optimizer. Received: {optimizer!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(f"`ratio` must be a positive number. Received: ratio={ratio!r}")
    if optimizer.built:
        raise ValueError("Call `loraplus` on an optimizer before it is built (before "
                         "`compile`/`fit` use it).")
    optimizer.__class__ = _loraplus_class(type(optimizer))
    optimizer.loraplus_ratio = float(ratio)
    return optimizer
