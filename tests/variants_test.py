"""The LoRA variants against hand-computed references: DoRA, PiSSA / OLoRA, a quantized
base, per-layer ranks and alphas, blocks to transform, LoRA+ (every backend)."""


import keras
import keras_hub
import numpy as np
import pytest

import klora
from klora import LoRADense, LoRAEinsumDense
from klora.adapted_model import lora_class
from klora.layers.variants import host_column_norms
from klora.training import quantize_backbone
from tests.conftest import (randomize_adapters, sequence_output, tiny_bert, tiny_distil_bert,
                            to_numpy, token_inputs)

RNG = np.random.default_rng(0)


def flat(layer):
    return to_numpy(layer.flat_kernel())


def randomize_magnitudes(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in klora.adapted_layers(model):
        if layer.lora_config.use_dora:
            layer.lora_magnitude.assign(to_numpy(layer.lora_magnitude) *
                                        rng.uniform(0.5, 1.5, layer.lora_magnitude.shape))


# ---- DoRA -------------------------------------------------------------------------------


def dora_reference(x, layer):
    """PEFT's DoRA on flattened x: x W + b + (f - 1) x W + f s x A B, f = m / ||W + s A B||."""
    w, a, b = flat(layer), to_numpy(layer.lora_a), to_numpy(layer.lora_b)
    factor = to_numpy(layer.lora_magnitude) / host_column_norms(w + layer.scale * a @ b)
    base = x @ w
    return base + (factor - 1) * base + factor * layer.scale * ((x @ a) @ b)


LAYERS = {  # layer, input shape, output as (rows, fan_out)
    "dense": (lambda: LoRADense(6, rank=3, alpha=5, use_dora=True), (4, 7, 10),
              lambda y: y.reshape(-1, 6)),
    "einsum": (lambda: LoRAEinsumDense("abc,cde->abde", (7, 2, 4), rank=3, use_dora=True,
                                       bias_axes="de"), (4, 7, 10), lambda y: y.reshape(-1, 8)),
    # The output axis is not last: the factor is applied along it by einsum.
    "einsum_transposed": (lambda: LoRAEinsumDense("abc,cd->adb", (6, 7), rank=3, use_dora=True),
                          (4, 7, 10), lambda y: y.transpose(0, 2, 1).reshape(-1, 6)),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_dora_layer_matches_the_reference_and_merges(kind):
    make, shape, rows = LAYERS[kind]
    layer = make()
    x = RNG.normal(size=shape).astype("float32")
    layer.build(shape)
    if layer.bias is not None:
        layer.bias.assign(RNG.normal(size=layer.bias.shape).astype("float32"))
    bias = 0 if layer.bias is None else to_numpy(layer.bias).reshape(-1)
    xs = x.reshape(-1, shape[-1])
    np.testing.assert_allclose(rows(to_numpy(layer(x))), xs @ flat(layer) + bias, atol=1e-5)
    layer.lora_b.assign(RNG.normal(size=layer.lora_b.shape).astype("float32"))
    layer.lora_magnitude.assign(RNG.uniform(1, 3, layer.lora_magnitude.shape))
    for training in (True, False):  # factored, and folded into the kernel at inference
        np.testing.assert_allclose(rows(to_numpy(layer(x, training=training))),
                                   dora_reference(xs, layer) + bias, rtol=1e-5, atol=1e-5)
    expected = to_numpy(layer(x, training=True))
    kernel = flat(layer)
    layer.merge()
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, atol=1e-5)
    norms = host_column_norms(flat(layer))  # the merged kernel's norms are the magnitudes
    np.testing.assert_allclose(norms, to_numpy(layer.lora_magnitude), rtol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(flat(layer), kernel, atol=1e-5)


def test_dora_dropout_recomputes_the_base_on_the_dropped_input():
    layer = LoRADense(6, rank=3, alpha=5, use_dora=True, dropout=0.5, seed=3)
    layer.build((None, 10))
    layer.lora_b.assign(RNG.normal(size=(3, 6)).astype("float32"))
    layer.lora_magnitude.assign(RNG.uniform(1, 3, (6,)).astype("float32"))
    x = np.ones((256, 10), "float32")
    w, a, b = flat(layer), to_numpy(layer.lora_a), to_numpy(layer.lora_b)
    factor = to_numpy(layer.lora_magnitude) / host_column_norms(w + layer.scale * a @ b)
    delta = to_numpy(layer(x, training=True)) - (x @ w + to_numpy(layer.bias))
    # Each row: (f - 1) x_d W + f s x_d A B for a mask x_d of 0s and 2s (rate 0.5).
    masks = (np.arange(2**10)[:, None] >> np.arange(10) & 1) * 2.0
    candidates = (factor - 1) * (masks @ w) + factor * layer.scale * (masks @ a @ b)
    assert np.abs(delta[:, None] - candidates[None]).max(-1).min(1).max() < 1e-4


@pytest.mark.parametrize("arch", ["bert", "distil_bert"])
def test_dora_model_saves_loads_merges_and_switches(arch, tmp_path):
    make = {"bert": tiny_bert, "distil_bert": tiny_distil_bert}[arch]
    backbone = make()
    weights = backbone.get_weights()
    x = token_inputs(backbone)
    base = sequence_output(backbone, x)
    klora.apply(backbone, rank=2, targets="all-linear", use_dora=True, seed=1)
    np.testing.assert_allclose(sequence_output(backbone, x), base, atol=1e-5)
    assert {w.name for w in backbone.trainable_weights} == {"lora_a", "lora_b", "lora_magnitude"}
    randomize_adapters(backbone)
    randomize_magnitudes(backbone)
    out = sequence_output(backbone, x)
    backbone.save(tmp_path / "m.keras")
    np.testing.assert_allclose(sequence_output(keras.saving.load_model(tmp_path / "m.keras"), x),
                               out, atol=1e-6)
    klora.save_adapter(backbone, tmp_path / "adapter")
    fresh = make()
    fresh.set_weights(weights)
    klora.load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(sequence_output(fresh, x), out, atol=1e-5)
    klora.apply(backbone, rank=3, targets="query", adapter_name="plain", seed=2)  # plain LoRA
    np.testing.assert_allclose(sequence_output(backbone, x), base, atol=1e-5)
    klora.set_adapter(backbone, "default")
    np.testing.assert_allclose(sequence_output(backbone, x), out, atol=1e-5)
    with klora.disable_adapters(backbone):
        np.testing.assert_allclose(sequence_output(backbone, x), base, atol=1e-5)
    klora.merge(backbone)
    backbone.save(tmp_path / "merged.keras")
    merged = keras.saving.load_model(tmp_path / "merged.keras")
    np.testing.assert_allclose(sequence_output(merged, x), out, atol=1e-5)
    klora.unmerge(merged)
    klora.unload(merged)  # (unmerged, then merged again and unloaded)
    np.testing.assert_allclose(sequence_output(merged, x), out, atol=1e-5)


# ---- PiSSA / OLoRA ------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("arch", ["bert", "distil_bert"])
def test_kernel_inits_keep_outputs_and_convert_on_save(arch, init, tmp_path):
    make = {"bert": tiny_bert, "distil_bert": tiny_distil_bert}[arch]
    backbone = make()
    weights = backbone.get_weights()
    x = token_inputs(backbone)
    base = sequence_output(backbone, x)
    kernels = [to_numpy(l.kernel).copy() for l in backbone._flatten_layers()
               if isinstance(l, keras.layers.EinsumDense) and l.name == "query"]
    klora.apply(backbone, rank=2, alpha=4, targets="all-linear", init=init, seed=1)
    np.testing.assert_allclose(sequence_output(backbone, x), base, atol=1e-5)
    query = [l for l in klora.adapted_layers(backbone) if l.name == "query"]
    assert not np.allclose(to_numpy(query[0]._kernel), kernels[0])  # the residual
    assert np.abs(to_numpy(query[0].lora_b)).max() > 1e-2  # B starts from the kernel
    randomize_adapters(backbone, seed=2)
    trained = sequence_output(backbone, x)
    with klora.disable_adapters(backbone):  # the original kernels: A0, B0 put back
        np.testing.assert_allclose(sequence_output(backbone, x), base, atol=1e-5)
    klora.save_adapter(backbone, tmp_path / "adapter")
    fresh = make()
    fresh.set_weights(weights)  # the original, unmodified base
    klora.load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(sequence_output(fresh, x), trained, atol=1e-5)
    assert klora.adapted_layers(fresh)[0].lora_config.rank == 4  # rank-2r plain LoRA
    klora.unload(backbone)
    np.testing.assert_allclose(sequence_output(backbone, x), trained, atol=1e-5)


def test_kernel_inits_refuse_other_adapters_and_quantized_kernels():
    backbone = tiny_bert()
    klora.apply(backbone, rank=2, adapter_name="a")
    with pytest.raises(ValueError, match="other adapters"):
        klora.apply(backbone, rank=2, init="pissa", adapter_name="b")
    pissa = tiny_bert()
    klora.apply(pissa, rank=2, init="olora")
    with pytest.raises(ValueError, match="cannot take other adapters"):
        klora.apply(pissa, rank=2, targets="key", adapter_name="b")
    quantized = tiny_bert()
    quantized.quantize("int8")
    with pytest.raises(ValueError, match="quantized"):
        klora.apply(quantized, rank=2, init="pissa")
    assert not klora.adapted_layers(quantized)
    with pytest.raises(ValueError, match="`init` must be one of"):
        klora.apply(tiny_bert(), rank=2, init="pissa_niter_0")


# ---- quantized base ----------------------------------------------------------------------


QUANTIZATIONS = {
    "int8": ("int8", None),
    "int8_weights": ("int8", lambda: keras.quantizers.Int8QuantizationConfig(
        weight_quantizer=None, activation_quantizer=None)),
    "int4": ("int4", lambda: keras.quantizers.Int4QuantizationConfig(block_size=4)),
    "int4_channel": ("int4", lambda: keras.quantizers.Int4QuantizationConfig(block_size=-1)),
}


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_quantized_layers_add_the_update_to_what_keras_computes(quantization):
    """Keras' own quantized output of each layer, plus scale * x A B (and it trains)."""
    mode, config = QUANTIZATIONS[quantization]
    backbone = tiny_bert()
    backbone.quantize(mode, config=config() if config else None)
    layers = [l for l in backbone._flatten_layers()
              if isinstance(l, (keras.layers.Dense, keras.layers.EinsumDense))]
    expected = {}
    for layer in layers:  # inputs of shape (3, 5, *input axes), Keras' quantized outputs
        in_dims = lora_class(layer)._lora_dims(layer)[0]
        x = RNG.normal(size=(3, 5, *in_dims)).astype("float32")
        expected[layer.path] = (x, to_numpy(layer(x)))
    klora.apply(backbone, rank=2, alpha=4, targets="all-linear", seed=1)
    randomize_adapters(backbone)
    # Every linear layer without an activation (which would hide the sum).
    checked = [l for l in klora.adapted_layers(backbone)
               if l.activation in (None, keras.activations.linear)]
    assert len(checked) == 10  # query, key, value, attention output, ffn output; 2 blocks
    for layer in checked:
        x, before = expected[layer.path]
        a, b = to_numpy(layer.lora_a), to_numpy(layer.lora_b)
        update = layer.scale * (x.reshape(-1, a.shape[0]) @ a) @ b
        got = to_numpy(layer(x, training=True)).reshape(update.shape)
        assert np.abs(update).max() > 1e-2
        np.testing.assert_allclose(got, before.reshape(update.shape) + update, rtol=1e-5,
                                   atol=1e-5, err_msg=layer.path)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_quantized_base_trains_factored_adapters_and_merges_to_float(quantization, tmp_path):
    mode, config = QUANTIZATIONS[quantization]
    keras.utils.set_random_seed(0)
    float_backbone = tiny_bert()
    backbone = tiny_bert()
    backbone.set_weights(float_backbone.get_weights())
    backbone.quantize(mode, config=config() if config else None)
    x = token_inputs(backbone)
    quantized = sequence_output(backbone, x)
    classifier = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2,
                                                     preprocessor=None)
    klora.apply(classifier, rank=2, targets="all-linear", use_dora=quantization == "int8",
                seed=1)
    np.testing.assert_allclose(sequence_output(backbone, x), quantized, rtol=1e-5, atol=1e-5)
    layers = klora.adapted_layers(classifier)
    assert {l.quantization_mode for l in layers} == {mode}
    assert all(l.lora_a.dtype == "float32" for l in layers)
    classifier.compile(optimizer=keras.optimizers.Adam(0.02),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    big = token_inputs(backbone, batch=16, seed=1)
    before = classifier.evaluate(big, np.arange(16) % 2, verbose=0)
    classifier.fit(big, np.arange(16) % 2, epochs=5, verbose=0)
    assert classifier.evaluate(big, np.arange(16) % 2, verbose=0) < before
    untrained = [l.path for l in layers if not np.abs(to_numpy(l.lora_b)).max() > 1e-5]
    assert not untrained, untrained  # every adapter trained
    assert all(v.dtype != "float32" for l in layers for v in (l._kernel,))
    out = to_numpy(classifier(x))
    classifier.save(tmp_path / "q.keras")
    np.testing.assert_allclose(to_numpy(keras.saving.load_model(tmp_path / "q.keras")(x)), out,
                               atol=1e-5)
    klora.save_adapter(classifier, tmp_path / "adapter")
    klora.merge(classifier)  # a float model holding the merged weights
    assert {l.quantization_mode for l in layers} == {None}
    assert all(l._kernel.dtype == "float32" for l in layers)
    # Keras' default int8 also quantized the activations; the float model does not.
    tolerance = (5e-2 if quantization == "int8" else 1e-4) * np.abs(out).max()
    assert np.abs(to_numpy(classifier(x)) - out).max() <= tolerance
    klora.unload(classifier)
    assert np.abs(to_numpy(classifier(x)) - out).max() <= tolerance
    # The adapter file is a normal LoRA adapter: it loads into the float model too.
    fresh = keras_hub.models.BertTextClassifier(backbone=float_backbone, num_classes=2,
                                                preprocessor=None)
    klora.load_adapter(fresh, tmp_path / "adapter")
    assert np.abs(to_numpy(fresh(x)) - out).max() < 0.5  # the quantization error only


def test_quantizing_after_apply_is_refused_before_anything_changes():
    classifier = keras_hub.models.BertTextClassifier(backbone=tiny_bert(), num_classes=2,
                                                     preprocessor=None)
    klora.apply(classifier, rank=2)
    for model in (classifier, klora.adapted_layers(classifier)[0]):
        with pytest.raises(ValueError, match="quantize it before `klora.apply`|quantize the "
                                             "model before"):
            model.quantize("int8")
    assert all(l.quantization_mode is None for l in classifier._flatten_layers())


def test_a_quantized_head_is_refused():
    classifier = keras_hub.models.BertTextClassifier(backbone=tiny_bert(), num_classes=2,
                                                     preprocessor=None)
    classifier.quantize("int8")
    with pytest.raises(ValueError, match="quantize the backbone"):
        klora.apply(classifier, rank=2)
    assert not klora.adapted_layers(classifier)


# ---- per-layer ranks, blocks ---------------------------------------------------------------


def test_rank_and_alpha_patterns_and_blocks(tmp_path):
    backbone = tiny_bert()
    klora.apply(backbone, rank=2, alpha=4, targets="all-linear",
                rank_pattern={"query": 4, r"transformer_layer_1/.*value": 3},
                alpha_pattern={"feedforward_output_dense": 1})
    ranks = {l.path: (l.lora_config.rank, l.scale) for l in klora.adapted_layers(backbone)}
    assert ranks["transformer_layer_0/self_attention_layer/query"] == (4, 1.0)
    assert ranks["transformer_layer_1/self_attention_layer/value"] == (3, 4 / 3)
    assert ranks["transformer_layer_0/self_attention_layer/value"] == (2, 2.0)
    assert ranks["transformer_layer_1/feedforward_output_dense"] == (2, 0.5)
    blocks = tiny_bert()
    klora.apply(blocks, rank=2, layers_to_transform=[1])
    assert [l.path for l in klora.adapted_layers(blocks)] == [
        "transformer_layer_1/self_attention_layer/value",
        "transformer_layer_1/self_attention_layer/query"] or {
        l.path.split("/")[0] for l in klora.adapted_layers(blocks)} == {"transformer_layer_1"}
    for kwargs, message in [
            (dict(rank_pattern={"nothing_like_this": 4}), "match none of the adapted"),
            (dict(alpha_pattern={"query": -1}), "`alpha`"),
            (dict(rank_pattern={"query": 99}), "too large"),
            (dict(layers_to_transform=[7]), "names blocks \\[7\\]"),
            (dict(rank_pattern={"(": 2}), "valid regular expression")]:
        model = tiny_bert()
        with pytest.raises(ValueError, match=message):
            klora.apply(model, rank=2, **kwargs)
        assert not klora.adapted_layers(model)


# ---- LoRA+ ----------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [keras.optimizers.SGD, keras.optimizers.AdamW])
def test_loraplus_gives_b_ratio_times_the_learning_rate(optimizer):
    def first_updates(ratio):
        keras.utils.set_random_seed(0)
        backbone = tiny_bert()
        klora.apply(backbone, rank=2, seed=1)
        randomize_adapters(backbone)  # nonzero B, so that A gets gradients too
        x = token_inputs(backbone)
        inputs = {k: keras.Input(v.shape[1:], dtype="int32", name=k) for k, v in x.items()}
        head = keras.layers.Dense(1, name="head")
        model = keras.Model(inputs, head(backbone(inputs)["pooled_output"]))
        opt = optimizer(0.01, weight_decay=None) if optimizer is keras.optimizers.SGD \
            else optimizer(0.01, weight_decay=0.0)
        model.compile(optimizer=klora.loraplus(opt, ratio) if ratio else opt, loss="mse")
        before = {v.path: to_numpy(v).copy() for v in model.trainable_variables}
        model.train_on_batch(x, np.ones((4, 1)))
        return {p: to_numpy(v) - before[p] for p, v in
                ((v.path, v) for v in model.trainable_variables)}

    plain, plus = first_updates(None), first_updates(4.0)
    for path in plain:
        factor = 4.0 if path.endswith("lora_b") else 1.0
        np.testing.assert_allclose(plus[path], factor * plain[path], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        klora.loraplus(keras.optimizers.Adam(), 0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_adapter_of_a_partly_adapted_quantized_backbone_saves_and_loads(mode, tmp_path):
    # Quantized layers left without adapters (pooled_dense, key, ...) are no head:
    # an int4 layer's `kernel` is an unpacked array, not a variable.
    keras.utils.set_random_seed(0)
    float_backbone = tiny_bert()
    classifier = keras_hub.models.BertTextClassifier(backbone=tiny_bert(), num_classes=2,
                                                     preprocessor=None)
    classifier.backbone.set_weights(float_backbone.get_weights())
    quantize_backbone(classifier, mode)
    klora.apply(classifier, rank=2, seed=0)
    randomize_adapters(classifier, seed=1)
    klora.save_adapter(classifier, tmp_path / "adapter")
    x = token_inputs(float_backbone)
    again = keras_hub.models.BertTextClassifier(backbone=tiny_bert(), num_classes=2,
                                                preprocessor=None)
    again.backbone.set_weights(float_backbone.get_weights())
    klora.load_adapter(quantize_backbone(again, mode), tmp_path / "adapter")
    np.testing.assert_allclose(to_numpy(again(x)), to_numpy(classifier(x)), atol=1e-5)
    fresh = keras_hub.models.BertTextClassifier(backbone=float_backbone, num_classes=2,
                                                preprocessor=None)
    klora.load_adapter(fresh, tmp_path / "adapter")
    assert np.abs(to_numpy(fresh(x)) - to_numpy(classifier(x))).max() < 0.5
