"""klora.distribution: layout rules, checks, per-host batches, and 8-device training on JAX.

The 8-device tests run tests/distribution_worker.py in a fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before
JAX starts); they run only when this suite runs on the JAX backend.
"""

import json
import os
import re
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest

import klora
from klora import distribution as kd
from klora.data import TokenBatches
from klora.training import add_training_arguments, check_training_arguments
from tests.conftest import tiny_bert, tiny_distil_bert

JAX = keras.backend.backend() == "jax"
requires_jax = pytest.mark.skipif(
    not JAX, reason=f"keras.distribution needs the JAX backend (running {keras.backend.backend()})")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distribution_worker.py")
M = kd.MODEL_AXIS


# ---- layout rules (any backend: pure path matching) -------------------------------------


def adapted_classifier(arch):
    if arch == "bert":
        model = keras_hub.models.BertTextClassifier(backbone=tiny_bert(), num_classes=2,
                                                    preprocessor=None)
    else:
        model = keras_hub.models.DistilBertTextClassifier(backbone=tiny_distil_bert(),
                                                          num_classes=2, preprocessor=None)
    klora.apply(model.backbone, rank=2, targets="all-linear")
    return model


@pytest.fixture(scope="module", params=["bert", "distil_bert"])
def model(request):
    return adapted_classifier(request.param)


def linear_layers(model):
    return [l for l in model._flatten_layers(include_self=False)
            if isinstance(l, (keras.layers.Dense, keras.layers.EinsumDense))]


def test_every_kernel_has_exactly_one_rule(model):
    kernels = [v.path for l in linear_layers(model) for v in l.weights
               if v.path.endswith("/kernel")]
    assert len(kernels) >= 12
    for path in kernels:
        assert len(kd.layout_rule(path)) == 1, path
    kd.check_layouts(model, model_parallel=2)  # raises on any problem


def test_kernel_rules_never_match_lora_variables(model):
    lora = [v.path for v in model.weights if re.search(r"/lora_[ab]$", v.path)]
    assert len(lora) == 2 * len(klora.adapted_layers(model))
    for path in lora:
        rules = kd.layout_rule(path)
        assert len(rules) == 1, path
        pattern, axes, _ = rules[0]
        # Its own rule names lora_a / lora_b explicitly; no `kernel$` rule catches it.
        assert re.search(r"lora_(?:a|b|\(\?:a\|b\))\$$", pattern), pattern
    kernel_rules = [r[0] for r in kd.LAYOUT_RULES if "kernel" in r[0]]
    assert len(kernel_rules) == 5
    assert not [(p, q) for p in lora for q in kernel_rules if re.search(q, p)]
    # Anchored: `re.search` (older Keras LayoutMap, keras issue 19496) agrees with
    # `re.fullmatch` (Keras 3.15) on every variable path.
    for variable in model.weights:
        for pattern, _, _ in kd.LAYOUT_RULES:
            assert (re.search(pattern, variable.path) is None) == (
                re.fullmatch(pattern, variable.path) is None), (pattern, variable.path)


def test_lora_sharded_consistently_with_its_kernel(model):
    checked = 0
    for layer in klora.adapted_layers(model):
        (_, kernel_axes, _), = kd.layout_rule(layer.kernel.path)
        (_, a_axes, _), = kd.layout_rule(layer.lora_a.path)
        (_, b_axes, _), = kd.layout_rule(layer.lora_b.path)
        if kernel_axes is None:  # replicated head
            assert a_axes is None and b_axes is None
            continue
        in_dims, _ = layer._lora_dims()
        input_sharded = M in kernel_axes[:len(in_dims)]
        output_sharded = M in kernel_axes[len(in_dims):]
        assert (a_axes, b_axes) == {
            (False, True): ((None, None), (None, M)),   # column-parallel: B's columns
            (True, False): ((M, None), (None, None)),   # row-parallel: A's rows
        }[(input_sharded, output_sharded)], layer.path
        checked += 1
    assert checked >= 12


def test_rules_say_what_they_match():
    for pattern, axes, description in kd.LAYOUT_RULES:
        assert pattern.endswith("$") and description, pattern
        assert axes is None or M in axes or axes == (None, None) or axes == (None,)


def test_check_layouts_names_axes_that_do_not_divide(model):
    with pytest.raises(ValueError, match=r"does not divide by --model-parallel 3"):
        kd.check_layouts(model, model_parallel=3)


# ---- checks and arguments ----------------------------------------------------------------


@pytest.mark.parametrize("batch, devices, nearest", [
    (30, 8, "24 or 32"), (4, 8, "8"), (33, 32, "32 or 64"), (100, 16, "96 or 112")])
def test_check_global_batch_names_nearest_valid_sizes(batch, devices, nearest):
    with pytest.raises(ValueError, match=rf"global batch size {batch} .* {devices}.*"
                                         rf"--batch-size {nearest}\."):
        kd.check_global_batch(batch, devices)


def test_check_global_batch_accepts_multiples():
    for batch, devices in ((32, 8), (8, 8), (64, 32), (7, 1)):
        kd.check_global_batch(batch, devices)


def parse(*argv):
    import argparse

    return add_training_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_flags_default_to_no_distribution():
    args = parse()
    assert (args.distribution, args.model_parallel, args.coordinator_address) == ("none", 2, None)
    check_training_arguments(args)
    assert kd.configure_from_arguments(args) is None
    assert keras.distribution.distribution() is None


def test_flags_are_validated():
    with pytest.raises(SystemExit):
        parse("--distribution", "pipeline")
    with pytest.raises(ValueError, match="--model-parallel must be >= 1"):
        check_training_arguments(parse("--distribution", "model", "--model-parallel", "0"))
    with pytest.raises(ValueError, match="must be one of"):
        kd.configure_distribution("pipeline")


@pytest.mark.skipif(JAX, reason="checks the error on non-JAX backends")
@pytest.mark.parametrize("kind", ["data", "model"])
def test_non_jax_backends_get_a_clear_error(kind):
    with pytest.raises(ValueError, match="needs the JAX backend"):
        kd.configure_distribution(kind)
    with pytest.raises(ValueError, match="needs the JAX backend"):
        check_training_arguments(parse("--distribution", kind))


def test_single_process_is_primary():
    assert kd.process_count() == 1 and kd.process_index() == 0 and kd.is_primary_process()


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, None),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"}, "lists 4 hosts"),
    ({"KLORA_MULTI_HOST": "1"}, "KLORA_MULTI_HOST"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_multi_host_detection(monkeypatch, env, expected):
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "KLORA_MULTI_HOST",
                 "JAX_COORDINATOR_ADDRESS", "KERAS_DISTRIBUTION_JOB_ADDRESSES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reason = kd._multi_host_requested()
    assert (reason is None) if expected is None else (expected in reason)
    assert "given" in kd._multi_host_requested("10.0.0.2:1234")
    if expected is None:
        assert kd.initialize_multi_host() is False


# ---- per-host batches ----------------------------------------------------------------------


def token_batches(batch_size=4):
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "very"]
    texts = [" ".join(["very"] * (i % 5) + ["good" if i % 2 else "bad"]) for i in range(18)]
    return TokenBatches(texts, list(range(18)), keras_hub.models.BertTokenizer(vocabulary=vocabulary),
                        max_length=16, batch_size=batch_size)


def test_shards_split_every_full_global_batch_and_drop_the_rest():
    batches = token_batches()
    full = [(x, y) for x, y in batches.batches(shuffle=True, seed=3) if len(y) == 4]
    assert len(batches) == 5 and len(full) == 4  # 18 examples: 4 full batches + 2 left over
    parts = [batches.shard(i, 2, drop_remainder=True) for i in range(2)]
    assert [len(p) for p in parts] == [4, 4] and len(batches) == 5  # the original is unchanged
    streams = [list(p.batches(shuffle=True, seed=3)) for p in parts]
    for (x, y), (x0, y0), (x1, y1) in zip(full, *streams):
        np.testing.assert_array_equal(np.concatenate([y0, y1]), y)
        for key in x:
            assert x0[key].shape == x1[key].shape == (2, x[key].shape[1])
            np.testing.assert_array_equal(np.concatenate([x0[key], x1[key]]), x[key])
    single = batches.shard(0, 1, drop_remainder=True)
    assert len(single) == 4 and len(list(single.dataset())) == 4


def test_shard_rejects_uneven_splits():
    with pytest.raises(ValueError, match="must divide"):
        token_batches(batch_size=6).shard(0, 4, drop_remainder=True)
    with pytest.raises(ValueError, match="drop_remainder"):
        token_batches().shard(0, 2, drop_remainder=False)


def test_shard_batches_is_identity_without_distribution():
    batches = token_batches()
    assert kd.shard_batches(batches) is batches


# ---- 8 simulated devices (JAX) -------------------------------------------------------------


def run_worker(mode, tmp_path):
    out = tmp_path / f"{mode}.json"
    env = {**os.environ, "KERAS_BACKEND": "jax", "CI": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    for name in ("TPU_WORKER_HOSTNAMES", "KLORA_MULTI_HOST", "JAX_COORDINATOR_ADDRESS"):
        env.pop(name, None)
    process = subprocess.run([sys.executable, WORKER, mode, str(out)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return json.loads(out.read_text()), process.stdout + process.stderr


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    results, _ = run_worker("compare", tmp_path_factory.mktemp("compare"))
    return results


@requires_jax
def test_eight_devices_same_losses_as_one(compared):
    assert compared["device_count"] == 8
    assert compared["data"]["mesh"] == [8] and compared["model"]["mesh"] == [4, 2]
    reference = np.array(compared["none"]["losses"])
    assert len(reference) == 3 and np.ptp(reference) > 1e-4  # training moved the loss
    for kind in ("data", "model", "model_remat"):  # model_remat: klora.enable_remat on top
        np.testing.assert_allclose(compared[kind]["losses"], reference, rtol=0, atol=1e-5,
                                   err_msg=kind)


@requires_jax
def test_dropout_masks_do_not_depend_on_the_mesh(compared):
    reference = np.array(compared["none_dropout"]["losses"])
    # dropout is on: it moves the losses by far more than the 1e-5 tolerance below
    assert np.abs(reference - compared["none"]["losses"]).max() > 1e-4
    for kind in ("data_dropout", "model_dropout"):
        np.testing.assert_allclose(compared[kind]["losses"], reference, rtol=0, atol=1e-5,
                                   err_msg=kind)


@requires_jax
def test_model_parallel_shards_kernels_and_lora_as_specified(compared):
    shardings = compared["model"]["shardings"]
    attention, ffn = "transformer_layer_0/self_attention_layer/", "transformer_layer_1/feedforward_"
    expected = {
        "token_embedding/embeddings": [None, M],
        attention + "query/kernel": [None, M, None],
        attention + "query/bias": [M, None],
        attention + "query/lora_a": [None, None],
        attention + "query/lora_b": [None, M],
        attention + "attention_output/kernel": [M, None, None],
        attention + "attention_output/lora_a": [M, None],
        attention + "attention_output/lora_b": [None, None],
        ffn + "intermediate_dense/kernel": [None, M],
        ffn + "intermediate_dense/bias": [M],
        ffn + "intermediate_dense/lora_a": [None, None],
        ffn + "intermediate_dense/lora_b": [None, M],
        ffn + "output_dense/kernel": [M, None],
        ffn + "output_dense/lora_a": [M, None],
        ffn + "output_dense/lora_b": [None, None],
        "transformer_layer_0/self_attention_layer_norm/gamma": [None],
        "logits/kernel": [None, None],
    }
    for path, spec in expected.items():
        # A trailing run of None is the same sharding as a shorter spec.
        got = shardings[path] + [None] * (len(spec) - len(shardings[path]))
        assert got == spec, (path, shardings[path])
    # Optimizer slots follow their variable.
    assert compared["model"]["moments"]
    assert all(spec == [None, M] for spec in compared["model"]["moments"].values())


@requires_jax
def test_data_parallel_replicates_every_variable(compared):
    for path, spec in compared["data"]["shardings"].items():
        assert all(axis is None for axis in spec), (path, spec)


@requires_jax
def test_saved_adapters_match_one_device(compared):
    reference = compared["none"]["adapter"]
    lora = [name for name in reference if ".lora_" in name]
    assert len(lora) == 2 * 13  # 6 linear layers x 2 blocks + the pooler, A and B each
    for kind in ("data", "model"):
        adapter = compared[kind]["adapter"]
        assert sorted(adapter) == sorted(reference)
        for name, value in reference.items():
            # Same file contents up to float32 summation order across devices.
            np.testing.assert_allclose(adapter[name], value, rtol=0, atol=1e-6,
                                       err_msg=f"{kind} {name}")


@requires_jax
def test_recipe_trains_with_distribution_flags(tmp_path):
    results, output = run_worker("recipe", tmp_path)
    for kind, rows in (("model", 37), ("data", 5)):
        assert results[kind]["code"] == 0, output[-3000:]
        assert {"adapter", "checkpoints", "history.json", "metrics.json"} <= set(
            results[kind]["files"])
        metrics = results[kind]["metrics"]
        assert metrics["epochs_run"] == 1 and metrics["validation_examples"] == rows
        # Every validation example is scored, on 8 devices, even fewer than one batch.
        assert sum(map(sum, metrics["validation"]["confusion"])) == rows
        assert metrics["validation_accuracy"] * rows == pytest.approx(
            round(metrics["validation_accuracy"] * rows))
    assert "examples (a different few each epoch) are left out" in output
    assert results["bad_batch_code"] == 2  # --batch-size 12 on 8 devices
    assert "global batch size 12 must be divisible by the device count 8" in output
    assert "use --batch-size 8 or 16" in output
