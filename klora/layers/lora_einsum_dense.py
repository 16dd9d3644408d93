import string

import keras
from keras import ops
from keras.src.utils.naming import auto_name

from klora.layers.lora_layer import LoRALayer


def split_einsum_axes(equation):
    """Split an `EinsumDense` equation's kernel axes into input and output axes.

    Returns `(inputs, kernel, output, in_axes, out_axes)`: the three operand
    specs and the kernel letters contracted with the input (`in_axes`) or
    carried to the output (`out_axes`), each in kernel order. Raises a
    `ValueError` for equations that are not a plain linear map of the input,
    such as a kernel axis shared by input and output.

    >>> split_einsum_axes("abc,cde->abde")
    ('abc', 'cde', 'abde', 'c', 'de')
    """
    try:
        operands, output = equation.replace(" ", "").split("->")
        inputs, kernel = operands.split(",")
    except ValueError:
        raise ValueError(
            f"Expected an equation of the form 'input,kernel->output'. "
            f"Received: equation={equation!r}"
        ) from None
    if "." in kernel:
        raise ValueError(f"The kernel spec of {equation!r} cannot hold an ellipsis.")
    in_axes = "".join(a for a in kernel if a in inputs and a not in output)
    out_axes = "".join(a for a in kernel if a in output and a not in inputs)
    shared = [a for a in kernel if a not in in_axes and a not in out_axes]
    if shared or not in_axes or not out_axes:
        raise ValueError(
            f"Equation {equation!r} is not a plain linear map (every kernel axis "
            "must be either contracted with the input or passed to the output, "
            f"and both kinds must occur); offending axes: {shared or kernel!r}."
        )
    return inputs, kernel, output, in_axes, out_axes


@keras.saving.register_keras_serializable(package="klora")
class LoRAEinsumDense(LoRALayer, keras.layers.EinsumDense):
    """A `keras.layers.EinsumDense` with a true rank-r update.

    The kernel's axes are split by the equation into input (contracted) axes
    and output (free) axes. The update factors over the flattened groups:
    `A: (prod(input axes), rank)` and `B: (rank, prod(output axes))`. For an
    attention query kernel `(hidden, heads, head_dim)` this is exactly the
    update PEFT makes on the `(hidden, hidden)` query matrix.

    `klora.apply` turns existing `EinsumDense` layers into `LoRAEinsumDense`
    layers in place; the class can also be used directly.

    Args:
        equation: The `EinsumDense` equation, e.g. `"abc,cde->abde"`.
        output_shape: The `EinsumDense` output shape (without batch axes).
        rank: Rank of the update, at least 1 and at most
            `min(prod(input axes), prod(output axes))`.
        alpha: Scaling numerator; `None` means `alpha = rank` (scale 1).
        lora_dropout: Dropout rate applied to the adapter input in training.
        use_rslora: Scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
        init: `"kaiming"` (uniform, PEFT's default) or `"gaussian"`.
        seed: Optional integer seed for `A`'s initializer and for dropout.
        merged: Whether the update is folded into the kernel.
        **kwargs: Any other `keras.layers.EinsumDense` argument.

    Example:

    >>> layer = LoRAEinsumDense("abc,cde->abde", (2, 4), rank=2, bias_axes="de")
    >>> y = layer(keras.ops.ones((1, 5, 8)))
    >>> tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)
    ((8, 2), (2, 8))
    """

    def __init__(
        self,
        equation,
        output_shape,
        rank=8,
        alpha=None,
        lora_dropout=0.0,
        use_rslora=False,
        init="kaiming",
        seed=None,
        merged=False,
        **kwargs,
    ):
        kwargs.setdefault("name", auto_name("lora_einsum_dense"))
        super().__init__(equation, output_shape, **kwargs)
        split_einsum_axes(equation)
        self._init_lora(rank, alpha, lora_dropout, use_rslora, init, seed, merged)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_lora()
        self._kernel.trainable = False
        if self.bias is not None:
            self.bias.trainable = False

    def _lora_equations(self):
        inputs, kernel, output, in_axes, out_axes = split_einsum_axes(self.equation)
        r = next(c for c in string.ascii_letters if c not in self.equation)
        hidden = inputs.replace("...", ".")
        hidden = "".join(a for a in hidden if a not in in_axes).replace(".", "...") + r
        return (
            f"{inputs},{in_axes}{r}->{hidden}",
            f"{hidden},{r}{out_axes}->{output}",
        )

    def _lora_shapes(self):
        _, kernel, _, in_axes, out_axes = split_einsum_axes(self.equation)
        shape = dict(zip(kernel, self._kernel.shape))
        return tuple(shape[a] for a in in_axes), tuple(shape[a] for a in out_axes)

    def _is_flat_layout(self):
        """Whether input = batch + input axes and output = batch + output axes."""
        inputs, _, output, in_axes, out_axes = split_einsum_axes(self.equation)
        return (inputs.endswith(in_axes) and output.endswith(out_axes)
                and inputs[: -len(in_axes)] == output[: -len(out_axes)])

    def _lora_project(self, x):
        if self._is_flat_layout():  # attention projections: a fast 2-D product
            return self._flat_lora_project(x)
        in_dims, out_dims = self._lora_shapes()
        to_rank, from_rank = self._lora_equations()
        a = ops.reshape(self.lora_a, in_dims + (self.rank,))
        b = ops.reshape(self.lora_b, (self.rank,) + out_dims)
        hidden = ops.einsum(to_rank, x, a)
        hidden = ops.multiply(hidden, ops.cast(self.scale, hidden.dtype))
        return ops.einsum(from_rank, hidden, b)

    def _to_kernel_layout(self, delta):
        _, kernel, _, in_axes, out_axes = split_einsum_axes(self.equation)
        in_dims, out_dims = self._lora_shapes()
        delta = ops.reshape(delta, in_dims + out_dims)
        source = in_axes + out_axes
        return ops.transpose(delta, [source.index(a) for a in kernel])

    def call(self, inputs, training=None):
        kernel, add_update = self._kernel_for(inputs, training)
        x = ops.einsum(self.equation, inputs, kernel)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if add_update:
            x = ops.add(x, self._lora_update(inputs, training))
        if self.activation is not None:
            x = self.activation(x)
        return x

    def get_config(self):
        return {**super().get_config(), **self.lora_config()}
