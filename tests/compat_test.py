"""Files written by klora 0.1.0 (tests/legacy_0.1.0) load with the same outputs."""

import os
import shutil

import keras
import numpy as np
import pytest

import klora
from klora.training.checkpoint import ResumableTraining
from klora.training.fine_tune import adamw_with_warmup
from tests.conftest import to_numpy

LEGACY = os.path.join(os.path.dirname(__file__), "legacy_0.1.0")
EXPECTED = np.load(os.path.join(LEGACY, "expected.npz"))


def inputs(model):
    x = {"token_ids": EXPECTED["token_ids"], "padding_mask": EXPECTED["padding_mask"]}
    if "segment_ids" in getattr(model, "backbone", model).input:
        x["segment_ids"] = np.zeros_like(x["token_ids"])
    return x


def outputs(model):
    out = model(inputs(model))
    return to_numpy(out["sequence_output"] if isinstance(out, dict) else out)


def load(name):
    return keras.saving.load_model(os.path.join(LEGACY, name))


@pytest.mark.parametrize("name, adapters", [
    ("bert_classifier_lora.keras", 4), ("distil_backbone_lora.keras", 12),
    ("bert_tagger_lora.keras", 6), ("bert_tagger_merged.keras", 6)])
def test_keras_files(name, adapters):
    model = load(name)
    expected = EXPECTED[name.replace("_lora.keras", "").replace(".keras", "")]
    np.testing.assert_allclose(outputs(model), expected, rtol=1e-5, atol=1e-5)
    assert len(klora.adapted_layers(model)) == adapters
    if "merged" in name:
        klora.unmerge(model)
    else:
        assert all(l.lora_config.dropout in (0.0, 0.1) for l in klora.adapted_layers(model))


@pytest.mark.parametrize("base, adapter, expected", [
    ("bert_classifier_base.keras", "bert_classifier_adapter", "bert_classifier"),
    ("distil_backbone_base.keras", "distil_backbone_adapter", "distil_backbone"),
    ("bert_tagger_base.keras", "bert_tagger_adapter", "bert_tagger")])
def test_adapter_folders(base, adapter, expected):
    model = load(base)
    metadata = klora.load_adapter(model, os.path.join(LEGACY, adapter))
    np.testing.assert_allclose(outputs(model), EXPECTED[expected], rtol=1e-5, atol=1e-5)
    if expected == "bert_classifier":
        assert metadata["labels"] == ["a", "b", "c"]


def test_checkpoint_resumes(tmp_path):
    model = load("bert_classifier_base.keras")
    klora.apply(model.backbone, rank=2, alpha=4, dropout=0.1, seed=3)
    model.compile(optimizer=adamw_with_warmup(1e-3, 4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    shutil.copytree(os.path.join(LEGACY, "checkpoints"), tmp_path / "checkpoints")
    training = ResumableTraining(tmp_path / "checkpoints", monitor="loss", mode="min")
    assert training.resume(model) == 2
    np.testing.assert_allclose(outputs(model), EXPECTED["bert_classifier"], rtol=1e-5, atol=1e-5)
    assert int(to_numpy(model.optimizer.iterations)) == 2
