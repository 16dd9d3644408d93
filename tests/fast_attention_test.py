"""FastAttention computes exactly what keras.layers.MultiHeadAttention computes."""

import keras
import keras_hub
import numpy as np

import klora
from klora.fast_layers import restore_layers, use_fast_layers
from klora.layers import FastAttention
from tests.conftest import sequence_output, tiny_bert, token_inputs, to_numpy


def pair(dropout, **kwargs):
    """A built Keras attention layer and a FastAttention with the same weights."""
    plain = keras.layers.MultiHeadAttention(num_heads=3, key_dim=4, dropout=dropout, **kwargs)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6)).astype("float32")
    plain(x, x)
    fast = FastAttention.from_config(plain.get_config())
    fast(x, x)
    fast.set_weights(plain.get_weights())
    return plain, fast, x


def test_outputs_match_keras_with_and_without_mask():
    for dropout in (0.0, 0.2):
        plain, fast, x = pair(dropout)
        mask = np.ones((2, 5, 5), bool)
        mask[0, :, 3:] = False  # padding in the first sequence
        for m in (None, mask):
            expected = to_numpy(plain(x, x, attention_mask=m))
            np.testing.assert_allclose(to_numpy(fast(x, x, attention_mask=m)), expected,
                                       rtol=1e-5, atol=1e-6)


def test_other_cases_run_keras_implementation():
    plain, fast, x = pair(0.1)
    out, scores = fast(x, x, return_attention_scores=True)
    expected, expected_scores = plain(x, x, return_attention_scores=True)
    np.testing.assert_allclose(to_numpy(scores), to_numpy(expected_scores), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(fast(x, x, use_causal_mask=True)),
                               to_numpy(plain(x, x, use_causal_mask=True)), rtol=1e-5, atol=1e-6)


def test_backbone_outputs_unchanged_and_training_runs():
    backbone = tiny_bert(dropout=0.1)
    x = token_inputs(backbone)
    expected = sequence_output(backbone, x)
    use_fast_layers(backbone)
    attention = [l for l in backbone._flatten_layers() if isinstance(l, FastAttention)]
    assert len(attention) == 2
    np.testing.assert_allclose(sequence_output(backbone, x), expected, rtol=1e-5, atol=1e-5)
    trained = to_numpy(backbone(x, training=True)["sequence_output"])
    assert np.isfinite(trained).all() and not np.allclose(trained, expected)
    restore_layers(backbone)
    assert {type(l) for l in attention} == {keras.layers.MultiHeadAttention}


def test_apply_and_unload_swap_attention():
    backbone = tiny_bert()
    klora.apply(backbone, rank=2)
    assert any(type(l) is FastAttention for l in backbone._flatten_layers())
    klora.unload(backbone)
    assert type(backbone) is keras_hub.models.BertBackbone
    assert not any(isinstance(l, (FastAttention, klora.layers.FastDropout))
                   for l in backbone._flatten_layers())
