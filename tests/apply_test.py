import keras
import keras_hub
import numpy as np
import pytest

import klora
from klora import LoRADense, LoRAEinsumDense
from tests.conftest import (randomize_adapters, sequence_output, tiny_bert, tiny_distil_bert,
                            token_inputs, to_numpy)

BACKBONES = {"bert": tiny_bert, "distil_bert": tiny_distil_bert}
CLASSIFIERS = {
    "bert": keras_hub.models.BertTextClassifier,
    "distil_bert": keras_hub.models.DistilBertTextClassifier,
}


def peft_count(hidden, layers, rank, matrices_per_layer=2):
    """PEFT's adapter size for square (hidden x hidden) projections."""
    return layers * matrices_per_layer * rank * (hidden + hidden)


@pytest.mark.parametrize("arch", BACKBONES)
def test_apply_keeps_outputs_and_freezes_base(arch):
    backbone = BACKBONES[arch]()
    x = token_inputs(backbone)
    before = sequence_output(backbone, x)
    assert klora.apply(backbone, rank=2) is backbone
    layers = klora.adapted_layers(backbone)
    assert sorted(l.name for l in layers) == ["query", "query", "value", "value"]
    assert all(isinstance(l, LoRAEinsumDense) for l in layers)
    np.testing.assert_array_equal(sequence_output(backbone, x), before)
    assert {w.name for w in backbone.trainable_weights} == {"lora_a", "lora_b"}
    assert len(backbone.trainable_weights) == 8


@pytest.mark.parametrize("arch", BACKBONES)
def test_all_linear_covers_every_projection(arch):
    backbone = BACKBONES[arch]()
    klora.apply(backbone, rank=2, targets="all-linear")
    names = {l.name for l in klora.adapted_layers(backbone)}
    assert {"query", "key", "value", "attention_output", "feedforward_intermediate_dense",
            "feedforward_output_dense"} <= names
    linear = [l for l in backbone._flatten_layers() if isinstance(l, (keras.layers.Dense, keras.layers.EinsumDense))]
    assert all(isinstance(l, (LoRADense, LoRAEinsumDense)) for l in linear)


def test_path_patterns_and_exclude():
    backbone = tiny_bert()
    klora.apply(backbone, rank=2, targets=(r"transformer_layer_1/.*/(query|key)",),
                exclude=("key",))
    assert [l.path for l in klora.adapted_layers(backbone)] == [
        "transformer_layer_1/self_attention_layer/query"
    ]


@pytest.mark.parametrize(
    "hidden, layers, heads, expected",
    [(768, 12, 12, 294_912), (384, 6, 12, 73_728)],  # BERT-base, all-MiniLM-L6
)
def test_bert_parameter_counts_match_peft(hidden, layers, heads, expected):
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=8, num_layers=layers, num_heads=heads, hidden_dim=hidden,
        intermediate_dim=8, max_sequence_length=8,
    )
    klora.apply(backbone, rank=8)
    counts = klora.summary(backbone, print_fn=lambda _: None)
    assert counts["adapter"] == expected == peft_count(hidden, layers, 8)
    assert counts["trainable"] == expected


def test_distil_bert_base_parameter_count_matches_peft():
    backbone = keras_hub.models.DistilBertBackbone(
        vocabulary_size=8, num_layers=6, num_heads=12, hidden_dim=768,
        intermediate_dim=8, max_sequence_length=8,
    )
    klora.apply(backbone, rank=8)
    assert klora.summary(backbone, print_fn=lambda _: None)["adapter"] == 147_456


@pytest.mark.parametrize("arch", BACKBONES)
def test_classifier_fit_trains_only_adapters_and_head(arch):
    keras.utils.set_random_seed(0)
    backbone = BACKBONES[arch]()
    klora.apply(backbone, rank=2, alpha=4, dropout=0.1, seed=0)
    classifier = CLASSIFIERS[arch](backbone=backbone, num_classes=2, preprocessor=None)
    x = token_inputs(backbone, batch=16, seed=1)
    y = (x["token_ids"][:, 0] > VOCAB_HALF).astype("int32")
    classifier.compile(optimizer=keras.optimizers.Adam(1e-2),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    head = {id(v) for v in classifier.trainable_weights} - {
        id(v) for l in klora.adapted_layers(classifier) for v in (l.lora_a, l.lora_b)}
    assert head and all("logits" in v.path or "classifier" in v.path or "pooled" in v.path
                        for v in classifier.trainable_weights if id(v) in head)
    before = {id(v): to_numpy(v).copy() for v in classifier.weights}
    history = classifier.fit(x, y, epochs=8, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    trainable = {id(v) for v in classifier.trainable_weights}
    for v in classifier.weights:
        changed = not np.array_equal(before[id(v)], to_numpy(v))
        if id(v) in trainable:
            assert changed, f"{v.path} did not train"
        elif "seed_generator" not in v.path:
            assert not changed, f"frozen {v.path} changed"


VOCAB_HALF = 20


def test_apply_on_task_keeps_head_trainable():
    classifier = keras_hub.models.BertTextClassifier(
        backbone=tiny_bert(), num_classes=3, preprocessor=None)
    klora.apply(classifier, rank=2)
    counts = klora.summary(classifier, print_fn=lambda _: None)
    assert counts["adapter"] == 2 * 2 * 2 * (8 + 8)
    assert counts["head"] == 8 * 3 + 3
    assert counts["total"] == sum(int(np.prod(v.shape)) for v in classifier.weights)


def test_summary_prints_counts():
    lines = []
    backbone = tiny_bert()
    klora.apply(backbone, rank=2)
    counts = klora.summary(backbone, print_fn=lines.append)
    assert "adapter params: 128" in lines[0] and "trainable%" in lines[0]
    assert counts["trainable_percent"] == pytest.approx(100 * 128 / counts["total"])


def test_merge_unmerge_on_backbone():
    backbone = tiny_bert()
    klora.apply(backbone, rank=2, targets="all-linear")
    randomize_adapters(backbone)
    x = token_inputs(backbone)
    factored = sequence_output(backbone, x)
    klora.merge(backbone)
    assert all(l.merged for l in klora.adapted_layers(backbone))
    np.testing.assert_allclose(sequence_output(backbone, x), factored,
                               rtol=1e-5, atol=1e-5)
    klora.unmerge(backbone)
    np.testing.assert_allclose(sequence_output(backbone, x), factored,
                               rtol=1e-5, atol=1e-5)


def test_merge_resets_compiled_predict():
    backbone = tiny_bert()
    klora.apply(backbone, rank=2)
    randomize_adapters(backbone)
    classifier = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2,
                                                     preprocessor=None)
    x = token_inputs(backbone)
    factored = classifier.predict(x, verbose=0)
    klora.merge(classifier)
    np.testing.assert_allclose(classifier.predict(x, verbose=0), factored, rtol=1e-5, atol=1e-5)


def test_unload_leaves_plain_layers():
    backbone = tiny_bert()
    klora.apply(backbone, rank=2)
    randomize_adapters(backbone)
    x = token_inputs(backbone)
    expected = sequence_output(backbone, x)
    klora.unload(backbone)
    assert type(backbone) is keras_hub.models.BertBackbone
    assert klora.adapted_layers(backbone) == []
    linear = [l for l in backbone._flatten_layers() if l.name in ("query", "value")]
    assert {type(l) for l in linear} == {keras.layers.EinsumDense}
    assert not any("lora" in v.path for v in backbone.variables)
    np.testing.assert_allclose(sequence_output(backbone, x), expected,
                               rtol=1e-5, atol=1e-5)


def test_mixed_bfloat16_backbone():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        backbone = tiny_bert()
        klora.apply(backbone, rank=2)
        out = backbone(token_inputs(backbone))["sequence_output"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert {l.lora_a.dtype for l in klora.adapted_layers(backbone)} == {"float32"}


# Errors --------------------------------------------------------------------


def test_no_match_lists_candidates():
    with pytest.raises(ValueError, match=r"matches targets.*'query'.*'value'"):
        klora.apply(tiny_bert(), targets=("q_lin",))


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank"), (dict(rank=-1), "rank"), (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.5), "dropout"), (dict(init="orthogonal"), "init"),
])
def test_invalid_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        klora.apply(tiny_bert(), **kwargs)


def test_rank_too_large_leaves_model_untouched():
    backbone = tiny_bert()
    with pytest.raises(ValueError, match="between 1 and 8"):
        klora.apply(backbone, rank=9)
    assert klora.adapted_layers(backbone) == []
    assert backbone.trainable_weights


def test_unbuilt_model():
    model = keras.Sequential([keras.layers.Dense(4, name="query")])
    with pytest.raises(ValueError, match="not built"):
        klora.apply(model)


def test_already_adapted():
    backbone = tiny_bert()
    klora.apply(backbone, rank=2)
    with pytest.raises(ValueError, match="already adapted"):
        klora.apply(backbone, rank=4)
    klora.apply(backbone, rank=4, targets=("key",))  # other layers are fine
    assert len(klora.adapted_layers(backbone)) == 6


def test_unsupported_layer_type_named():
    inputs = keras.Input((4,))
    outputs = keras.layers.Embedding(10, 4, name="query")(inputs)
    with pytest.raises(ValueError, match="Embedding"):
        klora.apply(keras.Model(inputs, outputs))


def test_keras_builtin_lora_conflict():
    backbone = tiny_bert()
    backbone.enable_lora(2)
    with pytest.raises(ValueError, match="enable_lora"):
        klora.apply(backbone, rank=2)


def test_all_linear_cannot_mix():
    with pytest.raises(ValueError, match="all-linear"):
        klora.apply(tiny_bert(), targets=("all-linear", "query"))


def test_merge_without_adapters():
    with pytest.raises(ValueError, match="no LoRA layers"):
        klora.merge(tiny_bert())
