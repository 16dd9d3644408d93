import keras
import numpy as np
import pytest

from klora import LoRADense
from tests.conftest import to_numpy


def reference(x, layer):
    """NumPy `x W + b + scale (x A) B`, activation excluded."""
    w, a, b = (to_numpy(v) for v in (layer._kernel, layer.lora_a, layer.lora_b))
    return x @ w + to_numpy(layer.bias) + layer.scale * (x @ a) @ b


def built_layer(**kwargs):
    layer = LoRADense(6, rank=3, alpha=5, **kwargs)
    layer.build((None, 10))
    layer.lora_b.assign(np.random.default_rng(1).normal(size=(3, 6)).astype("float32"))
    layer.bias.assign(np.arange(6, dtype="float32"))
    return layer


def test_output_matches_numpy_reference():
    layer = built_layer()
    x = np.random.default_rng(0).normal(size=(4, 7, 10)).astype("float32")
    np.testing.assert_allclose(to_numpy(layer(x)), reference(x, layer), rtol=1e-5, atol=1e-5)
    assert layer.scale == 5 / 3


@pytest.mark.parametrize("rows, folded", [(1, False), (28, True)])
def test_inference_folds_the_adapter_into_the_kernel_for_inputs_larger_than_it(rows, folded):
    layer = built_layer()
    x = np.random.default_rng(0).normal(size=(rows, 10)).astype("float32")
    assert layer._kernel_for(x, training=False)[1] is not folded
    assert layer._kernel_for(x, training=True)[1]  # training: always factored
    for training in (False, True):
        np.testing.assert_allclose(to_numpy(layer(x, training=training)), reference(x, layer),
                                   rtol=1e-5, atol=1e-5)


def test_zero_init_equals_plain_dense():
    layer = LoRADense(6, rank=2, activation="relu")
    layer.build((None, 10))
    x = np.random.default_rng(0).normal(size=(4, 10)).astype("float32")
    plain = np.maximum(x @ to_numpy(layer._kernel) + to_numpy(layer.bias), 0)
    np.testing.assert_allclose(to_numpy(layer(x)), plain, rtol=1e-6, atol=1e-6)


def test_rslora_scale():
    assert LoRADense(4, rank=4, alpha=8, use_rslora=True).scale == 4.0
    assert LoRADense(4, rank=4).scale == 1.0


def test_kaiming_bound_and_gaussian_std():
    layer = LoRADense(64, rank=8, seed=1)
    layer.build((None, 400))
    a = to_numpy(layer.lora_a)
    assert np.abs(a).max() <= 1 / np.sqrt(400) + 1e-7
    assert np.abs(a).max() > 0.9 / np.sqrt(400)
    gaussian = LoRADense(64, rank=8, init="gaussian", seed=1)
    gaussian.build((None, 400))
    assert abs(to_numpy(gaussian.lora_a).std() - 1 / 8) < 0.01


def test_only_adapters_train():
    layer = built_layer()
    assert [w.name for w in layer.trainable_weights] == ["lora_a", "lora_b"]
    assert {w.name for w in layer.non_trainable_weights} == {"kernel", "bias"}


def test_dropout_in_training_only():
    layer = built_layer(dropout=0.5, seed=3)
    x = np.ones((256, 10), "float32")
    inference = to_numpy(layer(x, training=False))
    np.testing.assert_allclose(inference, reference(x, layer), rtol=1e-5, atol=1e-5)
    trained = to_numpy(layer(x, training=True))
    assert not np.allclose(trained, inference)
    # Dropout touches only the adapter branch: the base part is unchanged, and each
    # row's update is scale * (mask * x) @ A @ B for a mask of 0s and 1 / (1 - rate)s.
    base = x @ to_numpy(layer._kernel) + to_numpy(layer.bias)
    delta = trained - base
    masks = (np.arange(2**10)[:, None] >> np.arange(10) & 1) / (1 - 0.5)
    candidates = layer.scale * masks @ to_numpy(layer.lora_a) @ to_numpy(layer.lora_b)
    distances = np.abs(delta[:, None, :] - candidates[None]).max(-1)
    assert distances.min(1).max() < 1e-4
    dropped = 1 - masks[distances.argmin(1)].astype(bool).mean()
    assert 0.4 < dropped < 0.6


def test_merge_and_unmerge():
    layer = built_layer()
    x = np.random.default_rng(0).normal(size=(4, 10)).astype("float32")
    expected = to_numpy(layer(x))
    kernel = to_numpy(layer._kernel)
    layer.merge()
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer._kernel),
        kernel + layer.scale * to_numpy(layer.lora_a) @ to_numpy(layer.lora_b),
        rtol=1e-5, atol=1e-6,
    )
    layer.unmerge()
    np.testing.assert_allclose(to_numpy(layer._kernel), kernel, atol=1e-5)


def test_config_round_trip():
    layer = LoRADense(6, rank=3, alpha=5, dropout=0.2, use_rslora=True,
                      init="gaussian", seed=7, activation="tanh", name="proj")
    config = layer.get_config()
    clone = LoRADense.from_config(config)
    assert clone.get_config() == config
    for key, value in dict(rank=3, alpha=5, dropout=0.2, use_rslora=True,
                           init="gaussian", seed=7, merged=False).items():
        assert config[key] == value


def test_saved_model_round_trip(tmp_path):
    inputs = keras.Input((10,))
    model = keras.Model(inputs, LoRADense(3, rank=2)(inputs))
    model.layers[-1].lora_b.assign(np.ones((2, 3), "float32"))
    x = np.random.default_rng(0).normal(size=(5, 10)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[-1], LoRADense)
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


def test_fit_changes_only_adapters():
    inputs = keras.Input((10,))
    model = keras.Model(inputs, LoRADense(2, rank=2, seed=0)(inputs))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 10)).astype("float32")
    y = x @ rng.normal(size=(10, 2)).astype("float32")
    before = {v.path: to_numpy(v).copy() for v in model.weights}
    history = model.fit(x, y, epochs=20, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for v in model.weights:
        changed = not np.array_equal(before[v.path], to_numpy(v))
        assert changed == (v.name in ("lora_a", "lora_b")), v.path


def test_mixed_bfloat16_keeps_float32_adapters():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = LoRADense(4, rank=2)
        outputs = [layer(np.ones((rows, 8), "float32")) for rows in (2, 16)]  # factored, folded
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert layer.lora_a.dtype == "float32" and layer.lora_b.dtype == "float32"
    assert layer._kernel.dtype == "float32"
    assert [keras.backend.standardize_dtype(y.dtype) for y in outputs] == ["bfloat16"] * 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(rank=2, dropout=1.0), "dropout"),
        (dict(rank=2, dropout=-0.1), "dropout"),
        (dict(rank=2, alpha=0), "alpha"),
        (dict(rank=2, init="xavier"), "init"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRADense(4, **kwargs)


def test_rank_larger_than_width():
    layer = LoRADense(4, rank=5)
    with pytest.raises(ValueError, match="between 1 and 4"):
        layer.build((None, 10))
