"""FastMultiHeadAttention computes Keras' attention, chunked or not."""

import keras
import numpy as np
import pytest

import klora
import klora.speed.fast_attention as fast_attention
from klora.speed.fast_layers import use_fast_layers
from klora.speed import FastDropout, FastMultiHeadAttention
from tests.conftest import tiny_bert, to_numpy

jax_only = pytest.mark.skipif(keras.backend.backend() != "jax", reason="chunks on JAX's CPU only")
BATCH, SEQ, WIDTH = 5, 7, 16


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, SEQ, WIDTH)).astype("float32")
    mask = np.ones((BATCH, SEQ, SEQ), bool)
    mask[1, :, -3:] = False  # padding in one example
    return x, mask


def attention_pair(dropout=0.0, seed=3):
    """A Keras layer and a fast layer with the same weights and dropout seed."""
    keras.utils.set_random_seed(seed)
    x, mask = inputs()
    layers = []
    for _ in range(2):
        layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, dropout=dropout, seed=seed)
        layer(x, x, attention_mask=mask)
        layers.append(layer)
    layers[1].set_weights(layers[0].get_weights())
    use_fast_layers(layers[1])
    return layers


@pytest.fixture
def cores(monkeypatch):
    def set_cores(n):
        monkeypatch.setattr(fast_attention, "cpu_cores", lambda: n)
    return set_cores


def test_chunk_bounds_cover_the_batch_evenly():
    assert fast_attention.chunk_bounds(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert fast_attention.chunk_bounds(4, 2) == [(0, 2), (2, 4)]


@jax_only
def test_chunks_one_per_core_on_jax_cpu(cores):
    cores(4)
    assert fast_attention.attention_chunks(32) == 4
    assert fast_attention.attention_chunks(3) == 3
    assert fast_attention.attention_chunks(None) == 1
    cores(1)
    assert fast_attention.attention_chunks(32) == 1


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="the other backends")
def test_other_backends_never_chunk(cores):
    cores(4)
    assert fast_attention.attention_chunks(32) == 1


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_inference_equals_keras_attention(cores, dropout):
    cores(3)  # chunks of 2, 2 and 1 examples
    plain, fast = attention_pair(dropout)
    assert type(fast) is FastMultiHeadAttention and type(fast._dropout_layer) is FastDropout
    x, mask = inputs(1)
    np.testing.assert_allclose(to_numpy(fast(x, x, attention_mask=mask)),
                               to_numpy(plain(x, x, attention_mask=mask)), rtol=1e-5, atol=1e-6)


@jax_only
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_outputs_and_gradients_do_not_depend_on_chunks(cores, dropout):
    import jax

    x, mask = inputs(2)
    results = []
    for n in (1, 3):
        cores(n)
        _, fast = attention_pair(dropout)  # same weights and seed each time

        def loss(x):
            out = fast(x, x, attention_mask=mask, training=True)
            return keras.ops.sum(out * keras.ops.arange(out.size, dtype="float32").reshape(out.shape))

        results.append((to_numpy(fast(x, x, attention_mask=mask, training=True)),
                         np.asarray(jax.grad(loss)(x))))
    (out_1, grad_1), (out_3, grad_3) = results
    np.testing.assert_allclose(out_3, out_1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_3, grad_1, rtol=1e-5, atol=1e-5)


@jax_only
def test_chunked_dropout_draws_the_whole_batch_mask(cores):
    cores(3)
    x = np.ones((BATCH, SEQ, WIDTH), "float32")
    _, fast = attention_pair(dropout=0.5)
    query, key, value = (np.ones((BATCH, SEQ, 2, 4), "float32"),) * 3
    seed = to_numpy(fast._dropout_layer.seed_generator.state)
    chunked, _ = fast._compute_attention(query, key, value, training=True)
    fast._dropout_layer.seed_generator.state.assign(seed)
    cores(1)
    whole, _ = fast._compute_attention(query, key, value, training=True)
    np.testing.assert_array_equal(to_numpy(chunked), to_numpy(whole))
    # and the chunks' masks differ from each other (a shared mask would repeat)
    out = to_numpy(fast(x, x, training=True))
    assert not np.allclose(out[0], out[2]) and not np.allclose(out[2], out[4])


def test_attention_scores_and_symbolic_batches_use_keras_path(cores):
    cores(3)
    plain, fast = attention_pair()
    x, mask = inputs(3)
    out, scores = fast(x, x, attention_mask=mask, return_attention_scores=True)
    plain_out, plain_scores = plain(x, x, attention_mask=mask, return_attention_scores=True)
    np.testing.assert_allclose(to_numpy(scores), to_numpy(plain_scores), rtol=1e-5, atol=1e-6)
    symbolic = keras.Input((SEQ, WIDTH))
    assert fast(symbolic, symbolic).shape == (None, SEQ, WIDTH)


def test_apply_swaps_attention_and_unload_restores_it(tmp_path):
    backbone = tiny_bert(dropout=0.1)
    attention = [l for l in backbone._flatten_layers() if type(l) is keras.layers.MultiHeadAttention]
    assert len(attention) == 2
    klora.apply(backbone, rank=2)
    assert all(type(l) is FastMultiHeadAttention for l in attention)
    backbone.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert FastMultiHeadAttention in {type(l) for l in loaded._flatten_layers()}
    klora.unload(backbone)
    assert all(type(l) is keras.layers.MultiHeadAttention for l in attention)
