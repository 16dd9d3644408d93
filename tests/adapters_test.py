import keras
import keras_hub
import numpy as np
import pytest

import klora
from klora import LoRAEinsumDense
from tests.conftest import (randomize_adapters, sequence_output, tiny_bert, tiny_distil_bert,
                            to_numpy, token_inputs)


def two_adapters(rank_b=2, targets_b=("query", "value")):
    """A tiny BERT with adapters "a" and "b" (b active) and each one's outputs alone."""
    backbone = tiny_bert()
    x = token_inputs(backbone)
    base = sequence_output(backbone, x)
    klora.apply(backbone, rank=2, alpha=4, adapter_name="a", seed=1)
    randomize_adapters(backbone, seed=1)
    out_a = sequence_output(backbone, x)
    klora.apply(backbone, rank=rank_b, alpha=4, targets=targets_b, adapter_name="b", seed=2)
    rng = np.random.default_rng(2)
    for layer in klora.adapted_layers(backbone):
        if layer.active_adapter == "b":
            layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
    out_b = sequence_output(backbone, x)
    return backbone, x, base, out_a, out_b


def test_add_switch_disable_delete():
    backbone, x, base, out_a, out_b = two_adapters()
    assert klora.adapter_names(backbone) == ["a", "b"]
    assert klora.active_adapter(backbone) == "b"
    assert np.abs(out_a - out_b).max() > 1e-3
    klora.set_adapter(backbone, "a")
    np.testing.assert_array_equal(sequence_output(backbone, x), out_a)
    klora.set_adapter(backbone, "b")
    np.testing.assert_array_equal(sequence_output(backbone, x), out_b)
    with klora.disable_adapters(backbone):
        np.testing.assert_array_equal(sequence_output(backbone, x), base)
    np.testing.assert_array_equal(sequence_output(backbone, x), out_b)
    # Only the active adapter trains (its variables are the layers' lora_a / lora_b).
    assert len(backbone.trainable_weights) == 8
    klora.delete_adapter(backbone, "b")
    assert klora.adapter_names(backbone) == ["a"] and klora.active_adapter(backbone) == "a"
    np.testing.assert_array_equal(sequence_output(backbone, x), out_a)
    klora.delete_adapter(backbone, "a")  # the last one: plain layers again, nothing merged
    assert not klora.adapted_layers(backbone)
    np.testing.assert_array_equal(sequence_output(backbone, x), base)


def test_adapters_on_different_layers_and_ranks():
    backbone, x, base, out_a, out_b = two_adapters(rank_b=4, targets_b=("key",))
    assert len(klora.adapted_layers(backbone)) == 6
    assert len(backbone.trainable_weights) == 4  # only b's layers train
    klora.set_adapter(backbone, "a")
    np.testing.assert_array_equal(sequence_output(backbone, x), out_a)
    assert len(backbone.trainable_weights) == 8
    klora.set_adapter(backbone, "b")
    np.testing.assert_allclose(sequence_output(backbone, x), out_b, atol=1e-6)


def test_merge_folds_the_active_adapter(tmp_path):
    backbone, x, base, out_a, out_b = two_adapters()
    klora.set_adapter(backbone, "a")
    klora.merge(backbone)
    np.testing.assert_allclose(sequence_output(backbone, x), out_a, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        klora.set_adapter(backbone, "b")
    klora.unmerge(backbone)
    klora.set_adapter(backbone, "b")
    np.testing.assert_allclose(sequence_output(backbone, x), out_b, atol=1e-5)


def test_save_each_named_adapter(tmp_path):
    backbone, x, base, out_a, out_b = two_adapters()
    klora.save_adapter(backbone, tmp_path / "a", adapter_name="a")  # inactive one
    klora.save_adapter(backbone, tmp_path / "b")                    # the active one
    fresh = tiny_bert()
    base_weights = {v.path: v for v in backbone.weights}
    for variable in fresh.weights:  # same base weights, as from one preset
        variable.assign(base_weights[variable.path])
    for name in ("a", "b"):
        klora.load_adapter(fresh, tmp_path / name, adapter_name=name)
    assert klora.adapter_names(fresh) == ["a", "b"] and klora.active_adapter(fresh) == "b"
    np.testing.assert_array_equal(sequence_output(fresh, x), out_b)
    klora.set_adapter(fresh, "a")
    np.testing.assert_array_equal(sequence_output(fresh, x), out_a)


def test_errors():
    backbone, *_ = two_adapters()
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        klora.set_adapter(backbone, "c")
    with pytest.raises(ValueError, match="already adapted"):
        klora.apply(backbone, rank=2, adapter_name="a")
    with pytest.raises(ValueError, match="no LoRA layers"):
        klora.set_adapter(tiny_bert(), "a")


def test_switch_does_not_retrace(monkeypatch):
    """A compiled predict is reused after a switch between equal-shaped adapters."""
    traces = []
    call = LoRAEinsumDense.call

    def counting_call(self, *args, **kwargs):
        traces.append(self.path)  # runs once per trace under jit / tf.function
        return call(self, *args, **kwargs)

    monkeypatch.setattr(LoRAEinsumDense, "call", counting_call)
    backbone, x, base, out_a, out_b = two_adapters()
    model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2,
                                                preprocessor=None)
    klora.set_adapter(model, "b")
    pred_b = model.predict(x, verbose=0)
    after_first = len(traces)
    klora.set_adapter(model, "a")
    pred_a = model.predict(x, verbose=0)
    klora.set_adapter(model, "b")
    np.testing.assert_allclose(model.predict(x, verbose=0), pred_b, atol=1e-6)
    assert np.abs(pred_a - pred_b).max() > 1e-6  # the switch took effect
    if keras.backend.backend() in ("jax", "tensorflow"):
        assert len(traces) == after_first  # no retrace: only values were assigned
    with klora.disable_adapters(model):
        model.predict(x, verbose=0)
    if keras.backend.backend() in ("jax", "tensorflow"):
        assert len(traces) == after_first


def test_keras_save_keeps_active_adapter(tmp_path):
    backbone, x, base, out_a, out_b = two_adapters()
    klora.set_adapter(backbone, "a")
    backbone.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert klora.adapter_names(loaded) == ["a"]
    np.testing.assert_array_equal(sequence_output(loaded, x), out_a)


def _train(model, seed):
    x = token_inputs(model.backbone, batch=8, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, np.arange(8) % 3, epochs=2, verbose=0)


@pytest.mark.parametrize("arch", ["bert", "distil_bert"])
def test_each_adapter_owns_its_head(arch, tmp_path):
    """PEFT's per-adapter modules_to_save: switching, disabling, deleting, loading."""
    backbone = {"bert": tiny_bert, "distil_bert": tiny_distil_bert}[arch]()
    task = {"bert": keras_hub.models.BertTextClassifier,
            "distil_bert": keras_hub.models.DistilBertTextClassifier}[arch]
    classifier = task(backbone=backbone, num_classes=3, preprocessor=None)
    x = token_inputs(backbone)
    original = to_numpy(classifier(x))
    klora.apply(classifier, rank=2, adapter_name="a", seed=1)
    _train(classifier, seed=1)
    out_a = to_numpy(classifier(x))
    klora.save_adapter(classifier, tmp_path / "a")
    klora.apply(classifier, rank=2, adapter_name="b", seed=2)
    # A new adapter starts from the head as it was before any adapter, as in PEFT.
    np.testing.assert_allclose(to_numpy(classifier(x)), original, atol=1e-6)
    _train(classifier, seed=2)
    out_b = to_numpy(classifier(x))
    assert np.abs(out_a - out_b).max() > 1e-3
    klora.set_adapter(classifier, "a")
    np.testing.assert_allclose(to_numpy(classifier(x)), out_a, atol=1e-6)
    with klora.disable_adapters(classifier):
        np.testing.assert_allclose(to_numpy(classifier(x)), original, atol=1e-6)
    np.testing.assert_allclose(to_numpy(classifier(x)), out_a, atol=1e-6)
    klora.save_adapter(classifier, tmp_path / "b", adapter_name="b")  # inactive: its own head
    klora.set_adapter(classifier, "b")
    np.testing.assert_allclose(to_numpy(classifier(x)), out_b, atol=1e-6)
    klora.delete_adapter(classifier, "b")
    np.testing.assert_allclose(to_numpy(classifier(x)), out_a, atol=1e-6)
    # Loading both files gives each its own head back.
    fresh = task(backbone={"bert": tiny_bert, "distil_bert": tiny_distil_bert}[arch](),
                 num_classes=3, preprocessor=None)
    base = {v.path: v for v in classifier.backbone.weights}
    for variable in fresh.backbone.weights:
        if variable.path in base:
            variable.assign(base[variable.path])
    klora.load_adapter(fresh, tmp_path / "a", adapter_name="a")
    klora.load_adapter(fresh, tmp_path / "b", adapter_name="b")
    np.testing.assert_allclose(to_numpy(fresh(x)), out_b, atol=1e-5)
    klora.set_adapter(fresh, "a")
    np.testing.assert_allclose(to_numpy(fresh(x)), out_a, atol=1e-5)
