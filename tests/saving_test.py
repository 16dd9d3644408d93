import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np

import klora
from tests.conftest import randomize_adapters, sequence_output, tiny_bert, token_inputs, to_numpy


def test_backbone_keras_round_trip(tmp_path):
    backbone = tiny_bert()
    klora.apply(backbone, rank=2, alpha=4, dropout=0.1, targets="all-linear", seed=1)
    randomize_adapters(backbone)
    x = token_inputs(backbone)
    backbone.save(tmp_path / "b.keras")
    loaded = keras.saving.load_model(tmp_path / "b.keras")
    np.testing.assert_array_equal(sequence_output(loaded, x), sequence_output(backbone, x))
    assert [l.path for l in klora.adapted_layers(loaded)] == [
        l.path for l in klora.adapted_layers(backbone)]
    assert [l.lora_config for l in klora.adapted_layers(loaded)] == [
        l.lora_config for l in klora.adapted_layers(backbone)]
    # Still a LoRA model: only adapters train after loading.
    assert {w.name for w in loaded.trainable_weights} == {"lora_a", "lora_b"}


def test_classifier_round_trip_after_fit(tmp_path):
    backbone = tiny_bert()
    klora.apply(backbone, rank=2)
    classifier = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2,
                                                     preprocessor=None)
    classifier.compile(optimizer="adam",
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = token_inputs(backbone, batch=8)
    classifier.fit(x, np.arange(8) % 2, epochs=2, verbose=0)
    classifier.save(tmp_path / "c.keras")
    loaded = keras.saving.load_model(tmp_path / "c.keras")
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(classifier(x)))
    assert len(klora.adapted_layers(loaded)) == 4
    assert klora.summary(loaded, print_fn=lambda _: None) == klora.summary(
        classifier, print_fn=lambda _: None)


def test_task_level_apply_and_merged_state_round_trip(tmp_path):
    classifier = keras_hub.models.BertTextClassifier(backbone=tiny_bert(), num_classes=2,
                                                     preprocessor=None)
    klora.apply(classifier, rank=2, targets=("query", "feedforward_output_dense"))
    randomize_adapters(classifier)
    klora.merge(classifier)
    x = token_inputs(classifier.backbone)
    classifier.save(tmp_path / "c.keras")
    loaded = keras.saving.load_model(tmp_path / "c.keras")
    assert all(l.merged for l in klora.adapted_layers(loaded))
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(classifier(x)))
    klora.unmerge(loaded)
    klora.unmerge(classifier)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(classifier(x)), atol=1e-6)


def test_unloaded_model_loads_without_klora(tmp_path):
    backbone = tiny_bert()
    klora.apply(backbone, rank=2)
    randomize_adapters(backbone)
    classifier = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2,
                                                     preprocessor=None)
    x = token_inputs(backbone)
    expected = to_numpy(classifier(x))
    klora.unload(classifier)
    classifier.save(tmp_path / "plain.keras")
    np.savez(tmp_path / "io.npz", expected=expected, **x)
    script = f"""
import sys
sys.modules["klora"] = None  # any import of klora now fails
import keras, numpy as np
data = np.load({str(tmp_path / "io.npz")!r})
model = keras.saving.load_model({str(tmp_path / "plain.keras")!r})
x = {{k: data[k] for k in data.files if k != "expected"}}
out = keras.ops.convert_to_numpy(model(x))
np.testing.assert_allclose(out, data["expected"], rtol=1e-5, atol=1e-5)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout
