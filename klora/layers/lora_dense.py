import keras
from keras import ops

from klora.layers.lora import LoRALayer
from klora.layers.quantized import kernel_shape


@keras.saving.register_keras_serializable(package="klora")
class LoRADense(LoRALayer, keras.layers.Dense):
    """A `keras.layers.Dense` with trainable low-rank adapters.

    Computes `activation(x @ W + b + scale * (dropout(x) @ A) @ B)` where the
    kernel `W` and bias `b` are frozen, `A` has shape `(input_dim, rank)` and
    `B` has shape `(rank, units)`. `A` starts random and `B` at zero, so a new
    layer computes exactly what the plain `Dense` computes. The mechanism
    (named adapters, merging, variants) is `klora.layers.LoRALayer`'s.

    `klora.apply` turns existing `Dense` layers of a model into `LoRADense`
    layers in place; the class can also be used directly.

    Args:
        units: Positive integer, dimensionality of the output space.
        rank: Rank of the update, at least 1 and at most
            `min(input_dim, units)`.
        alpha: Scaling numerator; `None` means `alpha = rank` (scale 1).
        dropout: Dropout rate applied to the adapter input in training.
        use_rslora: Scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
        init: `"kaiming"` (uniform, PEFT's default) or `"gaussian"` (normal
            with standard deviation `1 / rank`) initialization of `A`.
        seed: Optional integer seed for `A`'s initializer and for dropout.
        merged: Whether the update is folded into the kernel (see `merge`).
        **kwargs: Any other `keras.layers.Dense` argument.

    Input shape:
        N-D tensor with shape `(batch_size, ..., input_dim)`.

    Output shape:
        N-D tensor with shape `(batch_size, ..., units)`.

    Example:

    >>> layer = LoRADense(4, rank=2, alpha=4)
    >>> y = layer(keras.ops.ones((3, 8)))
    >>> [w.path for w in layer.trainable_weights]
    ['lora_dense/lora_a', 'lora_dense/lora_b']
    """

    def _lora_dims(self):
        fan_in, units = kernel_shape(self)
        return (fan_in,), (units,)

    def _kernel_axes(self):
        return (0, 1)

    def _lora_equations(self):
        return None

    def _product(self, x, kernel):
        return ops.matmul(x, kernel)
