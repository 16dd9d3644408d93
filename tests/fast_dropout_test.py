"""FastDropout draws masks with the same statistics as keras.layers.Dropout."""

import keras
import keras_hub
import numpy as np
import pytest

import klora
from klora.speed import FastDropout
from tests.conftest import tiny_bert, to_numpy

RATE = 0.1
ROWS, COLS = 256, 1024  # 262,144 values: the keep rate's standard error is 5.9e-4


def dropped(layer, x):
    return to_numpy(layer(x, training=True))


def test_keep_rate_and_scaling_match_keras_dropout():
    x = np.ones((ROWS, COLS), "float32")
    fast = dropped(FastDropout(RATE, seed=1), x)
    plain = dropped(keras.layers.Dropout(RATE, seed=1), x)
    sigma = np.sqrt(RATE * (1 - RATE) / x.size)
    for out in (fast, plain):
        assert set(np.unique(out)) <= {0.0, np.float32(1 / (1 - RATE))}
        assert abs((out > 0).mean() - (1 - RATE)) < 5 * sigma
        assert abs(out.mean() - 1.0) < 5 * sigma / (1 - RATE)
    assert abs((fast > 0).mean() - (plain > 0).mean()) < 7 * sigma


def test_mask_is_uniform_over_positions_and_uncorrelated():
    kept = dropped(FastDropout(RATE, seed=2), np.ones((ROWS, COLS), "float32")) > 0
    per_column = kept.mean(axis=0)  # each column: 256 draws
    sigma = np.sqrt(RATE * (1 - RATE) / ROWS)
    assert np.abs(per_column - (1 - RATE)).max() < 5.5 * sigma
    per_row = kept.mean(axis=1)
    assert np.abs(per_row - (1 - RATE)).max() < 5.5 * np.sqrt(RATE * (1 - RATE) / COLS)
    flat = kept.ravel().astype("float64")
    for lag in (1, 2, COLS):
        assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 0.01


def test_calls_draw_new_masks_and_seeds_reproduce():
    x = np.ones((64, 64), "float32")
    first = FastDropout(RATE, seed=3)
    a, b = dropped(first, x), dropped(first, x)
    assert not np.array_equal(a, b)
    again = FastDropout(RATE, seed=3)
    np.testing.assert_array_equal(dropped(again, x), a)
    np.testing.assert_array_equal(dropped(again, x), b)


def test_noise_shape_broadcasts_and_inference_is_identity():
    x = np.arange(1, 8 * 512 + 1, dtype="float32").reshape(8, 512)
    layer = FastDropout(0.5, noise_shape=(None, 1), seed=4)
    out = dropped(layer, x)
    rows_kept = (out > 0).all(axis=1)
    assert np.array_equal(rows_kept, (out > 0).any(axis=1))  # whole rows kept or dropped
    np.testing.assert_allclose(out[rows_kept], 2 * x[rows_kept])
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), x)
    np.testing.assert_array_equal(to_numpy(FastDropout(0.0)(x, training=True)), x)


jax_only = pytest.mark.skipif(keras.backend.backend() != "jax",
                              reason="the hashed masks are JAX's; other backends use keras' dropout")


@jax_only
def test_gradient_is_the_mask_over_keep():
    import jax
    import jax.numpy as jnp

    from klora.speed.fast_dropout import jax_dropout

    x = jnp.linspace(1.0, 2.0, 32 * 32).reshape(32, 32)
    seed = jnp.array([7, 0], "uint32")
    f = lambda v: jnp.sum(jax_dropout(v, RATE, seed, v.shape))
    out, grad = jax.value_and_grad(f)(x)
    kept = np.asarray(jax_dropout(x, RATE, seed, x.shape)) > 0
    np.testing.assert_allclose(np.asarray(grad), kept / (1 - RATE), rtol=1e-6)
    assert float(out) == pytest.approx(float(np.sum(np.asarray(x)[kept]) / (1 - RATE)), rel=1e-5)


@jax_only
def test_every_bit_is_fair_and_seeds_give_unrelated_bits():
    from klora.speed.fast_dropout import random_bits

    n = ROWS * COLS
    words = [np.asarray(random_bits(np.array(seed, "uint32"), (n,)))
             for seed in ([5, 0], [5, 1], [6, 0], [0, 0])]  # SeedGenerator steps, layers
    sigma = np.sqrt(0.25 / n)
    for w in words:
        bits = (w[:, None] >> np.arange(32, dtype="uint32")) & 1
        assert np.abs(bits.mean(axis=0) - 0.5).max() < 5 * sigma
        assert len(np.unique(w)) == n  # a keyed bijection of the position
    for i in range(len(words)):
        for j in range(i + 1, len(words)):
            agree = ((words[i] ^ words[j]) & 1) == 0
            assert abs(agree.mean() - 0.5) < 5 * sigma


@jax_only
@pytest.mark.parametrize("rate", [0.05, 0.5, 0.9])
def test_keep_probability_is_exact_for_any_rate(rate):
    x = np.ones((ROWS, COLS), "float32")
    kept = dropped(FastDropout(rate, seed=8), x) > 0
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / x.size)


@jax_only
def test_bits_depend_on_the_position_only():
    from klora.speed.fast_dropout import random_bits

    seed = np.array([9, 4], "uint32")
    np.testing.assert_array_equal(np.asarray(random_bits(seed, (6, 5, 7))).ravel(),
                                  np.asarray(random_bits(seed, (210,))))


@jax_only
def test_masks_too_large_to_hash_use_keras_dropout(monkeypatch):
    from klora.speed import fast_dropout

    monkeypatch.setattr(fast_dropout, "MAX_MASK_SIZE", 100)
    x = np.ones((16, 16), "float32")
    fast = FastDropout(RATE, seed=10)
    plain = keras.layers.Dropout(RATE, seed=10)
    np.testing.assert_array_equal(dropped(fast, x), dropped(plain, x))


def test_apply_swaps_dropout_layers_and_unload_restores_them():
    backbone = tiny_bert(dropout=0.1)
    plain = [l for l in backbone._flatten_layers() if type(l) is keras.layers.Dropout]
    assert plain
    klora.apply(backbone, rank=2)
    assert all(type(l) is FastDropout for l in plain)
    assert not any(type(l) is keras.layers.Dropout for l in backbone._flatten_layers())
    klora.unload(backbone)
    assert all(type(l) is keras.layers.Dropout for l in plain)
    assert type(backbone) is keras_hub.models.BertBackbone


def test_reloaded_adapted_model_uses_fast_dropout(tmp_path):
    backbone = tiny_bert(dropout=0.1)
    klora.apply(backbone, rank=2)
    backbone.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    types = {type(l) for l in loaded._flatten_layers()}
    assert FastDropout in types and keras.layers.Dropout not in types
