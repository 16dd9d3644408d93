"""Checks on the real pre-trained all-MiniLM-L6-v2 (skipped when it is not installed)."""

import keras
import keras_hub
import numpy as np
import pytest

import klora
from tests.conftest import minilm_path, requires_minilm, to_numpy

pytestmark = [pytest.mark.large, requires_minilm]


@pytest.fixture(scope="module")
def tokenized():
    tokenizer = keras_hub.models.BertTokenizer.from_preset(minilm_path())
    packer = keras_hub.layers.StartEndPacker(
        start_value=tokenizer.cls_token_id, end_value=tokenizer.sep_token_id,
        pad_value=tokenizer.pad_token_id, sequence_length=16, return_padding_mask=True)
    ids, mask = packer(tokenizer(["a truly wonderful film", "dull and far too long"]))
    ids, mask = to_numpy(ids), to_numpy(mask)
    return {"token_ids": ids, "padding_mask": mask.astype("int32"),
            "segment_ids": np.zeros_like(ids)}


def test_pretrained_weights_kept_and_counts_match_peft(tokenized):
    backbone = keras_hub.models.BertBackbone.from_preset(minilm_path())
    base = to_numpy(backbone(tokenized)["sequence_output"])
    klora.apply(backbone, rank=8, alpha=16)
    # B = 0: the same outputs, to float rounding (attention may run in per-core chunks)
    np.testing.assert_allclose(to_numpy(backbone(tokenized)["sequence_output"]), base,
                               rtol=1e-5, atol=1e-5)
    counts = klora.summary(backbone)
    assert counts["adapter"] == 73_728 == counts["trainable"]
    assert counts["total"] == 22_713_216 + 73_728


def test_pretrained_classifier_trains_and_merges(tokenized):
    keras.utils.set_random_seed(0)
    classifier = keras_hub.models.BertTextClassifier.from_preset(
        minilm_path(), num_classes=2, preprocessor=None)
    klora.apply(classifier, rank=8, alpha=16, dropout=0.1, seed=0)
    counts = klora.summary(classifier)
    assert counts["trainable"] == 73_728 + 384 * 2 + 2
    classifier.compile(optimizer=keras.optimizers.AdamW(1e-3),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = classifier.fit(tokenized, np.array([1, 0]), epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    factored = to_numpy(classifier(tokenized))
    klora.merge(classifier)
    np.testing.assert_allclose(to_numpy(classifier(tokenized)), factored, rtol=1e-4, atol=1e-5)
