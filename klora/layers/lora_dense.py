import keras
from keras import ops
from keras.src.utils.naming import auto_name

from klora.layers.lora_layer import LoRALayer


@keras.saving.register_keras_serializable(package="klora")
class LoRADense(LoRALayer, keras.layers.Dense):
    """A `keras.layers.Dense` with a trainable low-rank update.

    Computes `activation(x @ W + b + scale * (dropout(x) @ A) @ B)` where the
    kernel `W` and bias `b` are frozen, `A` has shape `(input_dim, rank)` and
    `B` has shape `(rank, units)`. `A` starts random and `B` at zero, so a new
    layer computes exactly what the plain `Dense` computes.

    `klora.apply` turns existing `Dense` layers of a model into `LoRADense`
    layers in place; the class can also be used directly.

    Args:
        units: Positive integer, dimensionality of the output space.
        rank: Rank of the update, at least 1 and at most
            `min(input_dim, units)`.
        alpha: Scaling numerator; `None` means `alpha = rank` (scale 1).
        lora_dropout: Dropout rate applied to the adapter input in training.
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

    def __init__(
        self,
        units,
        rank=8,
        alpha=None,
        lora_dropout=0.0,
        use_rslora=False,
        init="kaiming",
        seed=None,
        merged=False,
        **kwargs,
    ):
        kwargs.setdefault("name", auto_name("lora_dense"))
        super().__init__(units, **kwargs)
        self._init_lora(rank, alpha, lora_dropout, use_rslora, init, seed, merged)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_lora()
        self._kernel.trainable = False
        if self.bias is not None:
            self.bias.trainable = False

    def _lora_shapes(self):
        fan_in, units = self._kernel.shape
        return (fan_in,), (units,)

    def _lora_project(self, x):
        return self._flat_lora_project(x)

    def _to_kernel_layout(self, delta):
        return delta

    def call(self, inputs, training=None):
        kernel, add_update = self._kernel_for(inputs, training)
        x = ops.matmul(inputs, kernel)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if add_update:
            x = ops.add(x, self._lora_update(inputs, training))
        if self.activation is not None:
            x = self.activation(x)
        return x

    def get_config(self):
        return {**super().get_config(), **self.lora_config()}
