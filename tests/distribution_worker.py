"""Runs on 8 simulated CPU devices for tests/distribution_test.py (one fresh process).

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts,
so the test runs this file in a subprocess:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \\
        python tests/distribution_worker.py compare out.json
    ... python tests/distribution_worker.py recipe out.json

`compare` trains a tiny BERT classifier with LoRA on every linear layer for a
few steps without a distribution, with DataParallel and with ModelParallel
(mesh (4, 2)), from identical weights on identical batches, without and with
dropout, and writes the losses, the shardings of the variables and the saved
adapters' tensors.
`recipe` runs recipes/sentiment.py with --distribution model (which shards
each batch over the mesh's batch axis too) on a tiny preset, then with a batch
size that does not divide the device count, and writes what happened.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import klora  # noqa: E402
from klora import distribution as kd  # noqa: E402
from klora.peft.safetensors import read_safetensors  # noqa: E402
from tests.conftest import VOCAB, tiny_bert  # noqa: E402

STEPS, BATCH, SEQ = 3, 8, 6
WATCHED = ("token_embedding/embeddings",
           "transformer_layer_0/self_attention_layer/query/kernel",
           "transformer_layer_0/self_attention_layer/query/bias",
           "transformer_layer_0/self_attention_layer/query/lora_a",
           "transformer_layer_0/self_attention_layer/query/lora_b",
           "transformer_layer_0/self_attention_layer/attention_output/kernel",
           "transformer_layer_0/self_attention_layer/attention_output/lora_a",
           "transformer_layer_0/self_attention_layer/attention_output/lora_b",
           "transformer_layer_1/feedforward_intermediate_dense/kernel",
           "transformer_layer_1/feedforward_intermediate_dense/bias",
           "transformer_layer_1/feedforward_intermediate_dense/lora_a",
           "transformer_layer_1/feedforward_intermediate_dense/lora_b",
           "transformer_layer_1/feedforward_output_dense/kernel",
           "transformer_layer_1/feedforward_output_dense/lora_a",
           "transformer_layer_1/feedforward_output_dense/lora_b",
           "transformer_layer_0/self_attention_layer_norm/gamma",
           "logits/kernel")


def classifier(dropout=0.0):
    keras.utils.set_random_seed(0)
    model = keras_hub.models.BertTextClassifier(
        backbone=tiny_bert(dropout=dropout), num_classes=3, preprocessor=None, dropout=dropout)
    klora.apply(model.backbone, rank=2, alpha=4, dropout=dropout, targets="all-linear", seed=1)
    return model


def batches():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        x = {"token_ids": rng.integers(1, VOCAB, (BATCH, SEQ)).astype("int32"),
             "padding_mask": np.ones((BATCH, SEQ), "int32"),
             "segment_ids": np.zeros((BATCH, SEQ), "int32")}
        x["padding_mask"][::3, -2:] = 0
        out.append((x, rng.integers(0, 3, (BATCH,)).astype("int32")))
    return out


def spec(variable):
    sharding = variable.value.sharding
    return [None if a is None else str(a) for a in getattr(sharding, "spec", ())]


def train(kind, reference, tmp, remat=False, dropout=0.0):
    distribution = kd.configure_distribution(kind, model_parallel=2, batch_size=BATCH)
    try:
        model = classifier(dropout)
        model.set_weights(reference)
        if remat:
            klora.enable_remat(model)
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        losses = [float(model.train_on_batch(x, y, return_dict=True)["loss"]) for x, y in batches()]
        shardings = {v.path: spec(v) for v in model.weights if v.path in WATCHED}
        moments = {v.path: spec(v) for v in model.optimizer.variables
                   if "lora_b" in v.path and "query" in v.path}
        path = os.path.join(tmp, f"{kind}-{remat}-{dropout}")
        klora.save_adapter(model, path)
        tensors, _ = read_safetensors(os.path.join(path, "adapter_model.safetensors"))
        return dict(losses=losses, shardings=shardings, moments=moments,
                    devices=0 if distribution is None else len(distribution.device_mesh.devices.flat),
                    mesh=None if distribution is None else list(distribution.device_mesh.shape),
                    adapter={k: np.asarray(v).tolist() for k, v in tensors.items()})
    finally:
        keras.distribution.set_distribution(None)


def compare(out, tmp):
    import jax

    reference = classifier().get_weights()
    results = {kind: train(kind, reference, tmp) for kind in ("none", "data", "model")}
    results["model_remat"] = train("model", reference, tmp, remat=True)
    # FastDropout's masks hash each value's global position: the same on any mesh.
    for kind in ("none", "data", "model"):
        results[f"{kind}_dropout"] = train(kind, reference, tmp, dropout=0.3)
    results["device_count"] = jax.device_count()
    with open(out, "w") as f:
        json.dump(results, f)


def recipe(out, tmp):
    import importlib.util

    from tests.conftest import SAMPLE_DATA, _sample_vocabulary

    vocabulary = _sample_vocabulary()
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary), num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=64)
    preset = os.path.join(tmp, "preset")
    backbone.save_to_preset(preset)
    keras_hub.models.BertTokenizer(vocabulary=vocabulary).save_to_preset(preset)
    spec_ = importlib.util.spec_from_file_location(
        "sentiment_recipe", os.path.join(os.path.dirname(__file__), "..", "recipes", "sentiment.py"))
    sentiment = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(sentiment)
    with open(os.path.join(SAMPLE_DATA, "sentiment_valid.tsv"), encoding="utf-8") as f:
        lines = f.readlines()
    results = {}
    # Validation sets of 37 rows (a partial last global batch) and of 5 (less than one).
    for kind, rows, batch in (("model", 37, "16"), ("data", 5, "24")):
        valid = os.path.join(tmp, f"valid-{rows}.tsv")
        with open(valid, "w", encoding="utf-8") as f:
            f.writelines(lines[: rows + 1])
        run = os.path.join(tmp, kind)
        code = sentiment.main([
            "train", "--preset", preset, "--data", os.path.join(SAMPLE_DATA, "sentiment_train.tsv"),
            "--validation-data", valid, "--epochs", "1", "--batch-size", batch,
            "--max-length", "32", "--rank", "2", "--distribution", kind, "--output-dir", run])
        results[kind] = dict(code=code, files=sorted(os.listdir(run)))
        if code == 0:
            with open(os.path.join(run, "metrics.json")) as f:
                results[kind]["metrics"] = json.load(f)
        keras.distribution.set_distribution(None)
    bad = sentiment.main(["train", "--preset", preset, "--batch-size", "12",
                          "--distribution", "data", "--output-dir", os.path.join(tmp, "bad")])
    results["bad_batch_code"] = bad
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    import tempfile

    mode, out = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        {"compare": compare, "recipe": recipe}[mode](out, tmp)
