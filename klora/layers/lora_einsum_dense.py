import string

import keras
from keras import ops

from klora.layers.lora import LoRALayer
from klora.layers.quantized import kernel_shape


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
    """A `keras.layers.EinsumDense` with true rank-r adapters.

    The kernel's axes are split by the equation into input (contracted) axes
    and output (free) axes. The update factors over the flattened groups:
    `A: (prod(input axes), rank)` and `B: (rank, prod(output axes))`. For an
    attention query kernel `(hidden, heads, head_dim)` this is exactly the
    update PEFT makes on the `(hidden, hidden)` query matrix. The mechanism
    (named adapters, merging, variants) is `klora.layers.LoRALayer`'s.

    `klora.apply` turns existing `EinsumDense` layers into `LoRAEinsumDense`
    layers in place; the class can also be used directly.

    Args:
        equation: The `EinsumDense` equation, e.g. `"abc,cde->abde"`.
        output_shape: The `EinsumDense` output shape (without batch axes).
        rank: Rank of the update, at least 1 and at most
            `min(prod(input axes), prod(output axes))`.
        alpha: Scaling numerator; `None` means `alpha = rank` (scale 1).
        dropout: Dropout rate applied to the adapter input in training.
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

    def _lora_dims(self):
        _, kernel, _, in_axes, out_axes = split_einsum_axes(self.equation)
        size = dict(zip(kernel, kernel_shape(self)))
        return tuple(size[a] for a in in_axes), tuple(size[a] for a in out_axes)

    def _kernel_axes(self):
        _, kernel, _, in_axes, out_axes = split_einsum_axes(self.equation)
        return [(in_axes + out_axes).index(a) for a in kernel]

    def _lora_equations(self):
        inputs, _, output, in_axes, out_axes = split_einsum_axes(self.equation)
        lead = inputs[: len(inputs) - len(in_axes)]
        if inputs.endswith(in_axes) and output == lead + out_axes:
            return None  # attention projections: two fast 2-D products
        r = next(c for c in string.ascii_letters if c not in self.equation)
        hidden = "".join(a for a in inputs.replace("...", ".") if a not in in_axes)
        hidden = hidden.replace(".", "...") + r
        return (f"{inputs},{in_axes}{r}->{hidden}", f"{hidden},{r}{out_axes}->{output}",
                f"{output},{out_axes}->{output}")

    def _product(self, x, kernel):
        return ops.einsum(self.equation, x, kernel)
