"""enable_remat: same training as without it, less activation memory (JAX)."""

import keras
import keras_hub
import numpy as np
import pytest

import klora
from klora.speed.remat import TransformerEncoder as RematTransformerEncoder
from tests.conftest import tiny_bert, to_numpy, token_inputs

jax_only = pytest.mark.skipif(keras.backend.backend() != "jax", reason="jax.checkpoint")


def classifier(remat, targets="all-linear", **backbone_kwargs):
    keras.utils.set_random_seed(0)
    backbone = tiny_bert(dropout=0.1, **backbone_kwargs)
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    klora.apply(backbone, rank=2, dropout=0.1, targets=targets)
    if remat:
        klora.enable_remat(model)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@jax_only
def test_training_steps_match_training_without_remat():
    plain, remat = classifier(False), classifier(True)
    remat.set_weights(plain.get_weights())
    x = token_inputs(plain.backbone, batch=4)
    y = np.array([0, 1, 1, 0])
    start = [to_numpy(w) for w in plain.trainable_weights]
    for _ in range(3):  # new dropout masks each step: the seeds must advance inside remat
        np.testing.assert_allclose(remat.train_on_batch(x, y), plain.train_on_batch(x, y),
                                   rtol=1e-5)
    for a, b in zip(remat.weights, plain.weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-6)
    assert any(np.abs(to_numpy(w) - s).max() > 1e-3 for w, s in zip(plain.trainable_weights, start))


@jax_only
def test_saved_activations_shrink():
    import jax

    def temp_bytes(model, x, y):
        model.train_on_batch(x, y)
        state = tuple([v.value for v in variables] for variables in (
            model.trainable_variables, model.non_trainable_variables,
            model.optimizer.variables, model.metrics_variables))
        compiled = jax.jit(model.train_step).lower(state, (x, y, None)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    config = dict(num_layers=4, num_heads=4, hidden_dim=64, intermediate_dim=256,
                  max_sequence_length=128)
    # q+v adapters; with all-linear ones XLA CPU's peak barely moves (bench/remat.py).
    plain, remat = (classifier(r, targets=["query", "value"], **config) for r in (False, True))
    x = token_inputs(plain.backbone, batch=8, seq=128)
    y = np.zeros(8, "int32")
    # XLA's buffer assignment: 56 -> 51 MiB here; 1989 -> 1485 MiB for MiniLM at 32 x 128.
    assert temp_bytes(remat, x, y) < 0.95 * temp_bytes(plain, x, y)


@jax_only
def test_inference_unchanged_saved_model_loads_and_disable_restores(tmp_path):
    backbone = tiny_bert(dropout=0.1)
    x = token_inputs(backbone)
    expected = to_numpy(backbone(x)["sequence_output"])
    klora.enable_remat(backbone)
    blocks = [l for l in backbone._flatten_layers() if type(l) is RematTransformerEncoder]
    assert len(blocks) == 2
    np.testing.assert_allclose(to_numpy(backbone(x)["sequence_output"]), expected, rtol=1e-6)
    backbone.save(tmp_path / "m.keras")  # loads as keras-hub blocks, same weights
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert keras_hub.layers.TransformerEncoder in {type(l) for l in loaded._flatten_layers()}
    np.testing.assert_allclose(to_numpy(loaded(x)["sequence_output"]), expected, rtol=1e-6)
    klora.disable_remat(backbone)
    assert all(type(l) is keras_hub.layers.TransformerEncoder for l in blocks)


@jax_only
def test_model_without_transformer_blocks_is_rejected():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no keras_hub.layers.TransformerEncoder"):
        klora.enable_remat(model)


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="the other backends refuse it")
def test_other_backends_get_a_clear_error():
    with pytest.raises(ValueError, match="needs the JAX backend"):
        klora.enable_remat(tiny_bert())
