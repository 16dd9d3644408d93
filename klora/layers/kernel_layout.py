"""What the LoRA mechanism derives from a layer's kernel layout.

A LoRA layer class describes its kernel with four methods:

- `_lora_dims()`: the sizes of the kernel's input and output axes, `(in_dims, out_dims)`;
- `_kernel_axes()`: the kernel's axes as positions in `in_dims + out_dims`;
- `_lora_equations()`: einsum equations `x -> hidden`, `hidden -> output` and
  `output * out-vector -> output`, or `None` when `x` ends with the input axes and
  the output with the output axes (then all of it runs as 2-D matmuls);
- `_product(x, kernel)`: the base layer's product, without bias.

`KernelLayout` turns them into the widths of the flattened kernel, conversions
between the kernel's shape and the flat `(fan_in, fan_out)` matrix the adapters
factor, and the frozen base product, float or quantized.
"""

import math

from keras import ops

from klora.layers import quantized


class KernelLayout:
    """Helpers over the kernel layout a LoRA layer class describes."""

    @classmethod
    def layer_fans(cls, layer):
        """`(fan_in, fan_out)`: the flattened input and output widths of `layer`'s kernel
        (`layer` is an instance of this class or of its Keras base class)."""
        in_dims, out_dims = cls._lora_dims(layer)
        return math.prod(in_dims), math.prod(out_dims)

    @classmethod
    def check_adaptable(cls, layer, config):
        """Raises a `ValueError` unless `layer` can take an adapter of `config`."""
        quantized.check_supported(layer)
        fan_in, fan_out = cls.layer_fans(layer)
        if config.rank > min(fan_in, fan_out):
            raise ValueError(f"`rank`={config.rank} is too large for layer "
                             f"'{layer.path or layer.name}' (input width {fan_in}, output width "
                             f"{fan_out}): use a rank between 1 and {min(fan_in, fan_out)}.")
        if config.changes_base and layer.quantization_mode is not None:
            raise ValueError(f"init={config.init!r} decomposes the base kernel, but layer "
                             f"'{layer.path}' is quantized ({layer.quantization_mode}): use "
                             "init='kaiming' or 'gaussian' on a quantized base.")

    def _to_kernel_layout(self, matrix):
        """An `(fan_in, fan_out)` matrix reshaped and transposed into the kernel's shape."""
        in_dims, out_dims = self._lora_dims()
        matrix = ops.reshape(matrix, in_dims + out_dims)
        axes = self._kernel_axes()
        return matrix if list(axes) == sorted(axes) else ops.transpose(matrix, axes)

    def base_kernel(self):
        """The base kernel in float (dequantized when the layer is quantized)."""
        if self.quantization_mode is None:
            return self._kernel
        return quantized.dequantized_kernel(self)

    def flat_kernel(self):
        """The base kernel as a float32 `(fan_in, fan_out)` matrix."""
        axes = list(self._kernel_axes())
        kernel = ops.cast(self.base_kernel(), "float32")
        if axes != sorted(axes):
            kernel = ops.transpose(kernel, [axes.index(i) for i in range(len(axes))])
        return ops.reshape(kernel, self.layer_fans(self))

    def along_outputs(self, vector, y):
        """`y` (an output) times a `(fan_out,)` vector along the output axes."""
        vector = ops.reshape(vector, self._lora_dims()[1])
        equations = self._lora_equations()
        return ops.multiply(y, vector) if equations is None else ops.einsum(
            equations[2], y, vector)

    def base_product(self, x):
        """`x @ W` of the frozen base (quantized inputs too, as the base layer has it)."""
        return self._product(quantized.base_inputs(self, x), self.base_kernel())
