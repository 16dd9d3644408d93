"""The frozen base of a LoRA layer on a kernel Keras quantized (`layer.quantize("int8")`
or `"int4"`): its kernel in float, dequantized where it is used, and the float layer
it becomes when an adapter is merged into it.

A quantized `Dense` / `EinsumDense` keeps its kernel as int8 (int4: two values per
byte) with per-output-unit scales (int4 by default: per block of 128 inputs, with zero
points). klora computes the base product as `x @ dequantize(kernel)`: the weights stay
quantized in memory, the adapters and activations stay float32 (QLoRA's weight-only
scheme). Keras' default `int8` mode also quantizes the activations; a layer quantized
that way keeps doing so in its base product (fake-quantized inputs with Keras' own
straight-through gradient), so an adapted layer computes what it computed before.

>>> backbone.quantize("int8", config=keras.quantizers.Int8QuantizationConfig(
...     weight_quantizer=None, activation_quantizer=None))       # weight-only
>>> klora.apply(backbone, rank=8)
"""

import keras
from keras import ops
from keras.src.quantizers.quantizers import dequantize_with_sz_map, unpack_int4

MODES = ("int8", "int4")


def check_supported(layer):
    """Raises a `ValueError` unless klora can adapt `layer`'s quantization mode."""
    mode = layer.quantization_mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"Layer '{layer.path}' is quantized as {mode!r}; klora adapts "
                         f"float kernels and Keras' {' and '.join(MODES)} quantization.")


def is_quantized(layer):
    """Whether `layer` is a `Dense` / `EinsumDense` with a kernel Keras quantized to int8/int4."""
    return (isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
            and layer.quantization_mode in MODES)


def _is_einsum(layer):
    return isinstance(layer, keras.layers.EinsumDense)


def kernel_shape(layer):
    """The shape of `layer`'s float kernel (an int4 kernel is stored packed)."""
    if layer.quantization_mode != "int4":
        return tuple(layer._kernel.shape)
    if _is_einsum(layer):
        return tuple(layer.original_kernel_shape)
    return layer._orig_input_dim, layer._orig_output_dim


def dequantized_kernel(layer):
    """The float kernel (in the float kernel's shape, compute dtype) of a quantized layer."""
    dtype = layer.compute_dtype
    kernel = ops.convert_to_tensor(layer._kernel)
    if layer.quantization_mode == "int8":
        scale = layer._adjust_scale_for_dequant(layer.kernel_scale) if _is_einsum(layer) \
            else layer.kernel_scale
        return ops.divide(ops.cast(kernel, dtype), ops.cast(scale, dtype))
    columns = layer._int4_unpacked_column_size if _is_einsum(layer) else layer._orig_output_dim
    unpacked = unpack_int4(kernel, columns, axis=-1, dtype="int8")
    if hasattr(layer, "kernel_zero"):  # sub-channel: per block of inputs, with zero points
        weights = dequantize_with_sz_map(unpacked, layer.kernel_scale, layer.kernel_zero,
                                         layer.g_idx, group_axis=0)
    else:
        weights = ops.divide(ops.cast(unpacked, dtype), ops.cast(layer.kernel_scale, dtype))
    weights = ops.cast(weights, dtype)
    return ops.reshape(weights, layer.original_kernel_shape) if _is_einsum(layer) else weights


def base_inputs(layer, x):
    """`x` as the quantized layer's product sees it: fake-quantized when the layer
    quantizes its activations (gradients pass straight through, as in Keras)."""
    quantizer = getattr(layer, "inputs_quantizer", None)
    if layer.quantization_mode is None or not quantizer:
        return x
    axis = layer.quantization_axis if _is_einsum(layer) else -1
    quantized, scale = quantizer(x, axis=axis)
    fake = ops.divide(ops.cast(quantized, x.dtype), ops.cast(scale, x.dtype))
    return ops.add(x, ops.stop_gradient(ops.subtract(fake, x)))


def quantizes_inputs(layer):
    return layer.quantization_mode is not None and bool(getattr(layer, "inputs_quantizer", None))


def to_float(layer, kernel):
    """Turns a quantized layer into a float one whose kernel is `kernel` (a float tensor
    in the kernel's shape): its quantization variables and dtype policy are dropped."""
    for name in ("_kernel", "kernel_scale", "kernel_zero", "g_idx"):
        variable = vars(layer).get(name)
        if variable is not None:
            layer._untrack_variable(variable)
            object.__delattr__(layer, name)
    for name in ("inputs_quantizer", "_int4_block_size", "quantization_axis"):
        vars(layer).pop(name, None)
    layer._is_quantized = False
    layer.quantization_config = None
    layer.dtype_policy = layer.dtype_policy._source_name
    layer._kernel = layer.add_weight(name="kernel", shape=tuple(kernel.shape),
                                     initializer="zeros", trainable=False)
    layer._kernel.assign(kernel)
