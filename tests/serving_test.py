"""`klora.predict_with_adapters`: each row with its own adapter, equal row by row to switching."""

import keras
import keras_hub
import numpy as np
import pytest

import klora
from klora import serving
from tests.conftest import randomize_adapters, tiny_bert, tiny_distil_bert, to_numpy, token_inputs


def _train_head(model, seed):
    rng = np.random.default_rng(seed)
    for variable in model.trainable_weights:
        if "lora" not in variable.path:
            variable.assign(variable + 0.3 * rng.normal(size=variable.shape).astype("float32"))


@pytest.mark.parametrize("arch", ["bert", "distil_bert"])
def test_rows_match_switching_adapters(arch, monkeypatch):
    backbone = {"bert": tiny_bert, "distil_bert": tiny_distil_bert}[arch]()
    task = {"bert": keras_hub.models.BertTextClassifier,
            "distil_bert": keras_hub.models.DistilBertTextClassifier}[arch]
    model = task(backbone=backbone, num_classes=3, preprocessor=None)
    x = token_inputs(backbone, batch=6)
    expected = {"__base__": to_numpy(model.predict_on_batch(x))}
    for seed, (name, rank, targets) in enumerate((("a", 2, ("query", "value")), ("b", 4, "all-linear"),
                                                  ("c", 1, ("key",)))):
        klora.apply(model, rank=rank, alpha=2 * rank, targets=targets, adapter_name=name, seed=seed)
        randomize_adapters(model, seed=seed)
        _train_head(model, seed)  # each adapter its own head
    for name in ("a", "b", "c"):
        klora.set_adapter(model, name)
        expected[name] = to_numpy(model.predict_on_batch(x))
    traces = []
    call = serving._MixedLoRA.call
    monkeypatch.setattr(serving._MixedLoRA, "call",
                        lambda self, *a, **k: traces.append(1) or call(self, *a, **k))
    traced = []
    for rows in (["a", "b", "__base__", "c", "b", "a"], ["c", "c", "a", "__base__", "b", "b"]):
        out = klora.predict_with_adapters(model, x, rows)
        for i, name in enumerate(rows):
            np.testing.assert_allclose(out[i], expected[name][i], atol=1e-5, err_msg=name)
        traced.append(len(traces))
    if keras.backend.backend() in ("jax", "tensorflow"):  # torch runs eagerly
        assert traced[0] > 0 and traced[1] == traced[0]  # new rows compile nothing
    np.testing.assert_allclose(to_numpy(model.predict_on_batch(x)), expected["c"], atol=1e-5)


def test_refusals():
    backbone = tiny_bert()
    klora.apply(backbone, rank=2, adapter_name="a")
    x = token_inputs(backbone)
    with pytest.raises(ValueError, match="for each of the 4 rows"):
        klora.predict_with_adapters(backbone, x, ["a", "nope", "a", "a"])
    with pytest.raises(ValueError, match="for each of the 4 rows"):
        klora.predict_with_adapters(backbone, x, ["a"])
    klora.apply(backbone, rank=2, targets="key", adapter_name="d", use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        klora.predict_with_adapters(backbone, x, ["a", "d", "a", "a"])
    klora.merge(backbone)
    with pytest.raises(ValueError, match="unmerge"):
        klora.predict_with_adapters(backbone, x, ["a"] * 4)
