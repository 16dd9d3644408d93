"""`klora.LoraConfig` and the per-layer seeds `klora.apply` derives from one seed."""

import dataclasses

import keras
import numpy as np
import pytest

import klora
from klora import LoraConfig
from klora.config import derive_seed
from klora.speed.fast_dropout import dropout
from tests.conftest import tiny_bert, to_numpy


def test_defaults_scale_and_validation_once():
    config = LoraConfig(rank=16, alpha=32, dropout=0.1)
    assert config.scale == 2.0 and LoraConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 4
    assert config.replace(rank=8).scale == 4.0
    assert LoraConfig.from_dict(config.to_dict()) == config
    # klora 0.1 files name the dropout `lora_dropout`.
    assert LoraConfig.from_dict({"rank": 2, "lora_dropout": 0.1}).dropout == 0.1


@pytest.mark.parametrize("fields, message", [
    (dict(rank=0), "`rank` must be an integer >= 1"),
    (dict(rank=True), "`rank`"),
    (dict(alpha=-1), "`alpha`"),
    (dict(alpha=float("nan")), "`alpha`"),
    (dict(dropout=1.0), r"`dropout` must be a number in \[0, 1\)"),
    (dict(use_rslora="yes"), "`use_rslora`"),
    (dict(init="xavier"), "`init` must be one of"),
    (dict(seed=1.5), "`seed`"),
])
def test_invalid_settings_name_the_argument(fields, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**fields)
    with pytest.raises(ValueError, match=message):
        klora.apply(tiny_bert(), **fields)


def test_unknown_field_in_a_saved_config():
    with pytest.raises(ValueError, match=r"Unknown LoRA setting\(s\) \['rnak'\] in x.json"):
        LoraConfig.from_dict({"rnak": 2}, "x.json")


def test_apply_accepts_a_config_object_but_not_both():
    backbone = tiny_bert()
    klora.apply(backbone, config=LoraConfig(rank=2, alpha=6), targets="query")
    assert {l.lora_config.scale for l in klora.adapted_layers(backbone)} == {3.0}
    with pytest.raises(ValueError, match="either as `config` or as arguments"):
        klora.apply(tiny_bert(), rank=4, config=LoraConfig(rank=2))


def _a_matrices(seed, global_seed=123):
    keras.utils.set_random_seed(global_seed)  # same base weights, different global RNG state
    backbone = tiny_bert()
    keras.utils.set_random_seed(global_seed + 1)
    klora.apply(backbone, rank=2, dropout=0.5, targets="all-linear", seed=seed)
    return backbone, {l.path: to_numpy(l.lora_a) for l in klora.adapted_layers(backbone)}


def test_a_seed_gives_every_layer_its_own_reproducible_a():
    _, first = _a_matrices(5)
    _, again = _a_matrices(5, global_seed=7)  # the seed alone decides A
    _, other = _a_matrices(6)
    for path, a in first.items():
        np.testing.assert_array_equal(again[path], a)
        assert not np.allclose(other[path], a), path
    flat = [a.ravel()[:8] for a in first.values()]
    for i in range(len(flat)):
        for j in range(i):
            assert not np.allclose(flat[i], flat[j]), "two layers share A"


def test_a_seed_gives_every_layer_its_own_dropout_masks():
    backbone, _ = _a_matrices(5)
    layers = {l.path: l for l in klora.adapted_layers(backbone)}
    block = "transformer_layer_0/self_attention_layer/"
    query, value = layers[block + "query"], layers[block + "value"]  # they share their input
    ones = keras.ops.ones((64, 8))
    masks = [to_numpy(dropout(ones, 0.5, l.lora_seed_generator)) for l in (query, value)]
    assert 0.4 < (masks[0] == 0).mean() < 0.6
    assert 0.4 < (masks[0] == masks[1]).mean() < 0.6  # independent, not identical
    assert derive_seed(5, "default", block + "query") != derive_seed(5, "default", block + "value")
    assert derive_seed(None, "x") is None


def test_each_named_adapter_gets_its_own_streams():
    backbone = tiny_bert()
    klora.apply(backbone, rank=2, targets="query", adapter_name="a", seed=5)
    klora.apply(backbone, rank=2, targets="query", adapter_name="b", seed=5)
    layer = klora.adapted_layers(backbone)[0]
    assert layer.adapter_config("a").seed != layer.adapter_config("b").seed
    assert not np.allclose(layer.adapter_values("a")["lora_a"], layer.adapter_values("b")["lora_a"])
