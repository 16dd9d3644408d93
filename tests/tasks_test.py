"""TokenClassifier / SpanExtractor heads: shapes, LoRA, jit training, .keras round trip, losses."""

import keras
import numpy as np
import pytest

import klora
from klora.tasks import MaskedTokenCrossentropy, SpanExtractor, SpanLoss, TokenClassifier
from tests.conftest import tiny_bert, tiny_distil_bert, to_numpy, token_inputs

BACKBONES = {"bert": tiny_bert, "distil_bert": tiny_distil_bert}


def make(kind, task):
    backbone = BACKBONES[kind]()
    return TokenClassifier(backbone, num_tags=5) if task == "ner" else SpanExtractor(backbone)


def labels(task, batch=4, seq=6):
    rng = np.random.default_rng(1)
    if task == "ner":
        y = rng.integers(0, 5, (batch, seq)).astype("int32")
        y[:, 0] = y[:, -1] = -100
        return y
    return np.sort(rng.integers(1, seq - 2, (batch, 2)), axis=1).astype("int32")


@pytest.mark.parametrize("kind, task", [("bert", "ner"), ("distil_bert", "qa")])
def test_fit_with_lora_then_save_and_reload(kind, task, tmp_path):
    keras.utils.set_random_seed(0)
    model = make(kind, task)
    x = token_inputs(model.backbone)
    assert tuple(model(x).shape) == (4, 6, 5 if task == "ner" else 2)
    klora.apply(model.backbone, rank=2, targets="all-linear", seed=0)
    head = "token_logits" if task == "ner" else "span_logits"
    trainable = {v.path for v in model.trainable_variables}
    assert any(head in p for p in trainable) and all("lora" in p or head in p for p in trainable)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),  # jit on JAX by default
                  loss=MaskedTokenCrossentropy() if task == "ner" else SpanLoss())
    y = labels(task)
    before = model.evaluate(x, y, verbose=0)  # no dropout: a deterministic comparison
    history = model.fit(x, y, epochs=5, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert model.evaluate(x, y, verbose=0) < before
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-5)


def test_span_logits_mask_padding():
    model = SpanExtractor(tiny_bert())
    x = token_inputs(model.backbone)              # row 0 has two padding positions
    logits = to_numpy(model(x))
    assert (logits[0, -2:] <= -1e3).all() and (logits[1] > -1e3).all()


def test_masked_token_crossentropy_by_hand():
    logits = np.log(np.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]], "float32"))
    y = np.array([[-100, 0, 1]], "int32")
    expected = -(np.log(0.9) + np.log(0.8)) / 2
    assert float(to_numpy(MaskedTokenCrossentropy()(y, logits))) == pytest.approx(expected, rel=1e-5)
    assert float(to_numpy(MaskedTokenCrossentropy()(np.full((1, 3), -100), logits))) == 0.0


def test_span_loss_by_hand():
    p = np.array([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], "float32")      # start / end over 3 tokens
    logits = np.log(p).T[None]                                       # (1, 3, 2)
    expected = -(np.log(0.6) + np.log(0.6)) / 2
    loss = SpanLoss()(np.array([[1, 2]], "int32"), logits)
    assert float(to_numpy(loss)) == pytest.approx(expected, rel=1e-5)
