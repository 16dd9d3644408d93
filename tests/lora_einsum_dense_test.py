import keras
import numpy as np
import pytest

from klora import LoRAEinsumDense
from klora.layers.lora_einsum_dense import split_einsum_axes
from tests.conftest import to_numpy

CASES = [
    # equation, output_shape, bias_axes, input shape, (fan_in, fan_out)
    ("abc,cde->abde", (None, 2, 4), "de", (3, 5, 8), (8, 8)),  # attention query
    ("abcd,cde->abe", (None, 8), "e", (3, 5, 2, 4), (8, 8)),  # attention output
    ("ab,bc->ac", (6,), "c", (3, 10), (10, 6)),  # dense
    ("...b,bc->...c", (6,), None, (2, 3, 10), (10, 6)),  # ellipsis
    ("abc,dce->abde", (None, 2, 5), "de", (3, 4, 7), (7, 10)),  # out axis first
]


def build(equation, output_shape, bias_axes, input_shape, rank=3):
    layer = LoRAEinsumDense(equation, output_shape, rank=rank, alpha=6, bias_axes=bias_axes)
    layer.build(input_shape)
    rng = np.random.default_rng(0)
    layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
    if layer.bias is not None:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return layer


def reference(layer, x):
    """Independent NumPy reference: base einsum plus the merged low-rank kernel."""
    inputs, kernel, output, in_axes, out_axes = split_einsum_axes(layer.equation)
    w = to_numpy(layer._kernel)
    dims = dict(zip(kernel, w.shape))
    delta = layer.scale * to_numpy(layer.lora_a) @ to_numpy(layer.lora_b)
    delta = delta.reshape([dims[a] for a in in_axes + out_axes])
    delta = np.einsum(f"{in_axes + out_axes}->{kernel}", delta)
    y = np.einsum(layer.equation, x, w + delta)
    return y if layer.bias is None else y + to_numpy(layer.bias)


@pytest.mark.parametrize("equation, output_shape, bias_axes, input_shape, fans", CASES)
def test_output_matches_numpy_reference(equation, output_shape, bias_axes, input_shape, fans):
    layer = build(equation, output_shape, bias_axes, input_shape)
    assert tuple(layer.lora_a.shape) == (fans[0], 3)
    assert tuple(layer.lora_b.shape) == (3, fans[1])
    x = np.random.default_rng(1).normal(size=input_shape).astype("float32")
    np.testing.assert_allclose(to_numpy(layer(x)), reference(layer, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("equation, output_shape, bias_axes, input_shape, fans", CASES)
def test_merge_matches_factored(equation, output_shape, bias_axes, input_shape, fans):
    layer = build(equation, output_shape, bias_axes, input_shape)
    x = np.random.default_rng(1).normal(size=input_shape).astype("float32")
    factored = to_numpy(layer(x))
    layer.merge()
    np.testing.assert_allclose(to_numpy(layer(x)), factored, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(to_numpy(layer(x)), factored, rtol=1e-5, atol=1e-5)


def test_query_update_equals_peft_linear_update():
    """The flattened update is the (hidden, heads*head_dim) matrix PEFT's Linear adapts."""
    layer = build("abc,cde->abde", (None, 2, 4), "de", (1, 5, 8))
    x = np.random.default_rng(2).normal(size=(1, 5, 8)).astype("float32")
    w = to_numpy(layer._kernel).reshape(8, 8)
    a, b = to_numpy(layer.lora_a), to_numpy(layer.lora_b)
    linear = x @ w + to_numpy(layer.bias).reshape(8) + layer.scale * (x @ a) @ b
    np.testing.assert_allclose(
        to_numpy(layer(x)).reshape(1, 5, 8), linear, rtol=1e-4, atol=1e-4
    )


def test_config_round_trip():
    layer = LoRAEinsumDense("abc,cde->abde", (None, 2, 4), rank=2, alpha=4,
                            dropout=0.1, bias_axes="de", seed=3)
    config = layer.get_config()
    assert LoRAEinsumDense.from_config(config).get_config() == config


def test_saved_model_round_trip(tmp_path):
    inputs = keras.Input((5, 8))
    model = keras.Model(inputs, LoRAEinsumDense("abc,cde->abde", (None, 2, 4), rank=2)(inputs))
    model.layers[-1].lora_b.assign(np.ones((2, 8), "float32"))
    x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


@pytest.mark.parametrize("equation", ["ab,ab->ab", "abc,bc->abc", "nonsense"])
def test_non_linear_equations_rejected(equation):
    with pytest.raises(ValueError, match="equation|linear"):
        LoRAEinsumDense(equation, (4,), rank=1)


def test_rank_larger_than_width():
    layer = LoRAEinsumDense("abc,cde->abde", (None, 2, 4), rank=9)
    with pytest.raises(ValueError, match="between 1 and 8"):
        layer.build((1, 5, 8))
