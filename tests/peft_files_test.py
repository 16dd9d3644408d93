import json
import os
import warnings

import keras
import keras_hub
import numpy as np
import pytest

import klora
from klora.peft.safetensors import read_safetensors
from tests.conftest import (randomize_adapters, sequence_output, tiny_bert, tiny_distil_bert,
                            token_inputs, to_numpy)

BACKBONES = {"bert": tiny_bert, "distil_bert": tiny_distil_bert}
CLASSIFIERS = {
    "bert": keras_hub.models.BertTextClassifier,
    "distil_bert": keras_hub.models.DistilBertTextClassifier,
}


def fresh(arch, weights, task=False):
    """A new model with `weights` as its base weights (as `from_preset` would give)."""
    backbone = BACKBONES[arch]()
    backbone.set_weights(weights)
    if not task:
        return backbone
    return CLASSIFIERS[arch](backbone=backbone, num_classes=3, preprocessor=None)


def trained(arch, task=False, **apply_kwargs):
    backbone = BACKBONES[arch]()
    weights = backbone.get_weights()
    model = CLASSIFIERS[arch](backbone=backbone, num_classes=3, preprocessor=None) \
        if task else backbone
    klora.apply(model, **{"rank": 2, "alpha": 4, **apply_kwargs})
    randomize_adapters(model)
    if task:
        model.compile(optimizer="adam",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(token_inputs(backbone, batch=8), np.arange(8) % 3, epochs=1, verbose=0)
    return model, weights


def outputs(model, x):
    return to_numpy(model(x)) if hasattr(model, "backbone") else sequence_output(model, x)


@pytest.mark.parametrize("task", [False, True], ids=["backbone", "classifier"])
@pytest.mark.parametrize("arch", BACKBONES)
def test_round_trip_reproduces_outputs_exactly(arch, task, tmp_path):
    model, weights = trained(arch, task, targets="all-linear")
    x = token_inputs(getattr(model, "backbone", model))
    labels = {"label_map": {"0": "negative", "1": "neutral", "2": "positive"}}
    klora.save_adapter(model, tmp_path / "adapter", metadata=labels)
    assert sorted(os.listdir(tmp_path / "adapter")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = fresh(arch, weights, task)
    assert klora.read_adapter_metadata(tmp_path / "adapter") == labels
    assert klora.load_adapter(loaded, tmp_path / "adapter") == labels
    np.testing.assert_array_equal(outputs(loaded, x), outputs(model, x))
    assert klora.summary(loaded, print_fn=None or (lambda _: None)) == klora.summary(
        model, print_fn=lambda _: None)


def _layer_norm_trained(arch, weights):
    model = fresh(arch, weights)
    klora.apply(model, rank=2, seed=1)
    variable = next(v for v in model.weights if v.path.endswith("_layer_norm/gamma"))
    variable.trainable = True
    variable.assign(variable + 0.5)
    return model


def _mixed_ranks(arch, weights):
    model = fresh(arch, weights, task=True)
    klora.apply(model, rank=2, targets=("value",), seed=1)
    klora.apply(model, rank=4, alpha=3, targets=("query",), seed=2)
    return model


def _named(arch, weights):
    """A classifier whose inactive adapter "a" (with its own head) is the one saved."""
    model = fresh(arch, weights, task=True)
    klora.apply(model, rank=2, adapter_name="a", seed=1)
    randomize_adapters(model, seed=4)
    model.get_layer("logits").kernel.assign(model.get_layer("logits").kernel + 1.0)
    klora.apply(model, rank=3, targets=("key",), adapter_name="b", seed=2)
    return model


ROUND_TRIPS = {  # name: (arch, task, build(arch, base weights) -> model, adapter saved)
    "head_targeted": ("bert", True, lambda a, w: klora.apply(
        fresh(a, w, task=True), rank=2, targets=("query", "logits"), seed=1), None),
    "extra_trainable": ("bert", False, _layer_norm_trained, None),
    "all_linear_classifier": ("bert", True, lambda a, w: klora.apply(
        fresh(a, w, task=True), rank=2, targets="all-linear", dropout=0.1, seed=1), None),
    "mixed_ranks": ("bert", True, _mixed_ranks, None),
    "distil_bert_classifier": ("distil_bert", True, lambda a, w: klora.apply(
        fresh(a, w, task=True), rank=2, targets="all-linear", use_rslora=True), None),
    "distil_bert_backbone": ("distil_bert", False, lambda a, w: klora.apply(
        fresh(a, w), rank=2, init="gaussian", seed=3), None),
    "named_inactive": ("bert", True, _named, "a"),
    "named_active": ("distil_bert", True, _named, "b"),
}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_every_saved_adapter_loads_back_with_equal_outputs(case, tmp_path):
    arch, task, build, name = ROUND_TRIPS[case]
    weights = BACKBONES[arch]().get_weights()
    keras.utils.set_random_seed(0)
    model = build(arch, weights)
    randomize_adapters(model, seed=7)
    if name is not None:
        klora.set_adapter(model, name)
    x = token_inputs(getattr(model, "backbone", model))
    expected = outputs(model, x)
    klora.save_adapter(model, tmp_path / "adapter")
    keras.utils.set_random_seed(1)  # a fresh head differs from the saved one
    loaded = fresh(arch, weights, task)
    klora.load_adapter(loaded, tmp_path / "adapter")
    np.testing.assert_allclose(outputs(loaded, x), expected, rtol=1e-6, atol=1e-6)
    assert klora.summary(loaded, print_fn=None or (lambda _: None))["trainable"] == \
        klora.summary(model, print_fn=lambda _: None)["trainable"]


def test_peft_names_shapes_and_config(tmp_path):
    model, _ = trained("bert", targets=("query", "attention_output"), rank=2, alpha=6)
    klora.save_adapter(model, tmp_path)
    tensors, metadata = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
                   ].shape == (2, 8)
    assert tensors["base_model.model.encoder.layer.1.attention.output.dense.lora_B.weight"
                   ].shape == (8, 2)
    assert len(tensors) == 8 and metadata["format"] == "pt"
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 6, False)
    assert config["peft_type"] == "LORA" and config["modules_to_save"] is None
    assert "encoder.layer.0.attention.self.query" in config["target_modules"]
    distil, _ = trained("distil_bert", task=True)
    klora.save_adapter(distil, tmp_path / "d")
    tensors, _ = read_safetensors(tmp_path / "d" / "adapter_model.safetensors")
    assert "base_model.model.distilbert.transformer.layer.1.attention.q_lin.lora_A.weight" \
        in tensors
    assert tensors["base_model.model.classifier.weight"].shape == (3, 8)
    assert tensors["base_model.model.pre_classifier.bias"].shape == (8,)
    config = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["classifier", "pre_classifier"]


def test_keyed_by_path_not_order(tmp_path):
    # Adapters added in another order (key first) still land on the right layers.
    model, weights = trained("bert", targets=("value",))
    klora.apply(model, rank=2, targets=("query",))
    randomize_adapters(model, seed=5)
    klora.save_adapter(model, tmp_path)
    loaded = fresh("bert", weights)
    klora.apply(loaded, rank=2, targets=("query",), adapter_name="other")
    klora.load_adapter(loaded, tmp_path, adapter_name="mine")
    x = token_inputs(model)
    np.testing.assert_array_equal(sequence_output(loaded, x), sequence_output(model, x))


def test_rank_patterns_and_rslora_round_trip(tmp_path):
    model, weights = trained("bert", targets=("value",), rank=2, use_rslora=True)
    klora.apply(model, rank=4, alpha=2, targets=("query",), use_rslora=True)
    randomize_adapters(model, seed=3)
    klora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] and len(config["rank_pattern"]) == 2
    loaded = fresh("bert", weights)
    klora.load_adapter(loaded, tmp_path)
    x = token_inputs(model)
    np.testing.assert_array_equal(sequence_output(loaded, x), sequence_output(model, x))


def test_custom_model_falls_back_to_layer_paths(tmp_path):
    def build():
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(5, name="hidden")(inputs)
        return keras.Model(inputs, keras.layers.Dense(3, name="out")(hidden))

    keras.utils.set_random_seed(0)
    model = build()
    weights = model.get_weights()
    klora.apply(model, rank=2, targets=("hidden",))
    randomize_adapters(model)
    model.get_layer("out").kernel.trainable = True  # a trained "head"
    model.get_layer("out").kernel.assign(np.ones((5, 3), "float32"))
    klora.save_adapter(model, tmp_path)
    tensors, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.hidden.lora_A.weight" in tensors
    loaded = build()
    loaded.set_weights(weights)
    klora.load_adapter(loaded, tmp_path)
    x = np.random.default_rng(0).normal(size=(2, 6)).astype("float32")
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


# ------------------------------------------------------------------ bad input


def state(model):
    return ([l.path for l in klora.adapted_layers(model)],
            [to_numpy(w).copy() for w in model.weights])


def assert_untouched(model, before):
    paths, values = state(model)
    assert paths == before[0]
    assert len(values) == len(before[1])
    for a, b in zip(values, before[1]):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def saved(tmp_path):
    model, weights = trained("bert", targets=("query", "value"))
    klora.save_adapter(model, tmp_path / "a")
    return tmp_path / "a", weights


def edit_config(directory, **changes):
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(directory, edit):
    from safetensors.numpy import save_file

    filename = directory / "adapter_model.safetensors"
    tensors, metadata = read_safetensors(filename)
    metadata.pop("klora")  # as a PEFT-made file: no config hash
    save_file(edit(dict(tensors)), str(filename), metadata=metadata)


QUERY = "base_model.model.encoder.layer.0.attention.self.query"
BAD_INPUTS = {
    "missing_dir": (lambda d: d.parent / "nope", "does not exist"),
    "missing_weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "has no adapter_model"),
    "truncated": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-7]), "truncated"),
    "garbage": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 3),
                "not a valid safetensors"),
    "corrupt_header": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (40).to_bytes(8, "little") + b"{not json" + b" " * 60), "unreadable header"),
    "bad_json": (lambda d: (d / "adapter_config.json").write_text("{"), "not valid JSON"),
    "unknown_field": (lambda d: edit_config(d, secret_sauce=1), "Unknown field"),
    "dora_without_magnitudes": (lambda d: edit_tensors(d, lambda t: t) or edit_config(
        d, use_dora=True),
                                r"missing key \S+query.lora_magnitude_vector"),
    "lora_bias": (lambda d: edit_config(d, lora_bias=True), "does not implement"),
    "unconverted_pissa": (lambda d: edit_config(d, init_lora_weights="pissa_niter_4"),
                          "change the base"),
    "unconverted_olora": (lambda d: edit_config(d, init_lora_weights="olora"),
                          "change the base"),
    "loftq": (lambda d: edit_config(d, init_lora_weights="loftq"), "change the base"),
    "astra": (lambda d: edit_config(d, init_lora_weights="astra"), "change the base"),
    "mica": (lambda d: edit_config(d, init_lora_weights="mica"), "trains only A"),
    "unknown_config_object": (lambda d: edit_config(d, future_config={"k": 1}),
                              "Unknown field"),
    "unknown_field_zero": (lambda d: edit_config(d, future_scale=0), "Unknown field"),
    "unknown_field_empty_text": (lambda d: edit_config(d, future_mode=""), "Unknown field"),
    "rank_mismatch": (lambda d: edit_tensors(d, lambda t: t) or edit_config(d, r=3),
                      "rank mismatch"),
    "other_config": (lambda d: edit_config(d, lora_alpha=7), "different saves"),
    "missing_key": (lambda d: edit_tensors(d, lambda t: {
        k: v for k, v in t.items() if k != QUERY + ".lora_B.weight"}), "missing key"),
    "extra_key": (lambda d: edit_tensors(d, lambda t: {
        **t, "base_model.model.encoder.layer.7.attention.self.query.lora_A.weight":
        t[QUERY + ".lora_A.weight"], "base_model.model.encoder.layer.7.attention.self.query"
        ".lora_B.weight": t[QUERY + ".lora_B.weight"]}), "unexpected keys"),
    "int_tensor": (lambda d: edit_tensors(d, lambda t: {
        **t, QUERY + ".lora_A.weight": t[QUERY + ".lora_A.weight"].astype("int32")}),
        "floating point"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_adapter_files_raise_and_leave_model_untouched(case, saved):
    directory, weights = saved
    make_bad, message = BAD_INPUTS[case]
    target = make_bad(directory)
    target = target if isinstance(target, os.PathLike) else directory
    model = fresh("bert", weights)
    before = state(model)
    with pytest.raises(ValueError, match=message):
        klora.load_adapter(model, target)
    assert_untouched(model, before)


@pytest.mark.parametrize("changes", [
    dict(future_config=None, future_flag=False, future_list=[]),  # a newer PEFT, features off
    dict(init_lora_weights="nora"),  # an init that leaves the base weights alone
    dict(astra_config=None, corda_config={"cache_file": None}),
])
def test_fields_that_change_nothing_load(changes, saved):
    directory, weights = saved
    reference = fresh("bert", weights)
    klora.load_adapter(reference, directory)
    edit_tensors(directory, lambda t: t)  # as a PEFT-made file: no config hash
    edit_config(directory, **changes)
    model = fresh("bert", weights)
    klora.load_adapter(model, directory)
    x = token_inputs(model)
    np.testing.assert_array_equal(outputs(model, x), outputs(reference, x))


def test_partial_head_warns(tmp_path):
    # PEFT's SEQ_CLS default saves a DistilBERT `classifier` but not `pre_classifier`:
    # the file loads, and says which head layer keeps its untrained weights.
    model, weights = trained("distil_bert", task=True)
    klora.save_adapter(model, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora.load_adapter(fresh("distil_bert", weights, task=True), tmp_path)
    assert not [w for w in caught if "restores the head" in str(w.message)]
    edit_tensors(tmp_path, lambda t: {k: v for k, v in t.items() if "pre_classifier" not in k})
    edit_config(tmp_path, modules_to_save=["classifier"])
    loaded = fresh("distil_bert", weights, task=True)
    with pytest.warns(UserWarning, match=r"not \['pre_classifier'\]"):
        klora.load_adapter(loaded, tmp_path)
    np.testing.assert_array_equal(to_numpy(loaded.get_layer("logits").kernel),
                                  to_numpy(model.get_layer("logits").kernel))


def test_other_architecture_or_width_rejected(saved, tmp_path):
    directory, _ = saved
    distil = tiny_distil_bert()
    with pytest.raises(ValueError, match="BertBackbone"):
        klora.load_adapter(distil, directory)
    assert not klora.adapted_layers(distil)
    wide = tiny_bert(hidden_dim=16)
    before = state(wide)
    with pytest.raises(ValueError, match="another width"):
        klora.load_adapter(wide, directory)
    assert_untouched(wide, before)
    # A PEFT-made file (no klora header) for DistilBERT is recognised by its names.
    model, _ = trained("distil_bert")
    klora.save_adapter(model, tmp_path / "d")
    edit_tensors(tmp_path / "d", lambda t: t)
    with pytest.raises(ValueError, match="is for distilbert"):
        klora.load_adapter(tiny_bert(), tmp_path / "d")


def test_classifier_head_mismatch_and_bad_metadata(tmp_path):
    model, weights = trained("bert", task=True)
    klora.save_adapter(model, tmp_path)
    backbone = tiny_bert()
    backbone.set_weights(weights)
    two = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2,
                                              preprocessor=None)
    before = state(two)
    with pytest.raises(ValueError, match="number of classes"):
        klora.load_adapter(two, tmp_path)
    assert_untouched(two, before)
    with pytest.raises(ValueError, match="unexpected keys"):  # head keys, no head
        klora.load_adapter(fresh("bert", weights), tmp_path)
    with pytest.raises(ValueError, match="string keys"):
        klora.save_adapter(model, tmp_path / "m", metadata={"label_map": {0: "neg"}})
    assert not (tmp_path / "m").exists()


def test_name_clash_and_unadapted_model(saved):
    directory, weights = saved
    model = fresh("bert", weights)
    with pytest.raises(ValueError, match="no adapters"):
        klora.save_adapter(model, directory)
    klora.load_adapter(model, directory)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        klora.load_adapter(model, directory)
    klora.load_adapter(model, directory, adapter_name="copy")
    assert klora.adapter_names(model) == ["default", "copy"]


def test_model_card_tells_what_the_adapter_is(tmp_path):
    model, _ = trained("bert", task=True, use_dora=True)
    klora.save_adapter(model, tmp_path, metadata={
        "base_model": "minilm", "task": "sentiment", "labels": ["negative", "positive"],
        "metrics": {"accuracy": 0.9125, "loss": 0.28}, "command": "recipes/sentiment.py train"})
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nbase_model: \"minilm\"")
    for text in ("for sentiment", "`recipes/sentiment.py train`", "`negative`, `positive`",
                 "| accuracy | 0.9125 |", "| DoRA | True |", "| rank (`r`) | 2 |",
                 f"klora {klora.__version__}"):
        assert text in card, text
