"""`klora.export`: transformers folders and keras-hub presets, loaded the way their users
load them, in a fresh process without klora, from the same raw strings."""

import json
import os
import subprocess
import sys

import keras_hub
import numpy as np
import pytest

import klora
from klora.presets import load_backbone
from klora.tasks import SpanExtractor, TokenClassifier
from klora.training import quantize_backbone
from tests.conftest import randomize_adapters, to_numpy

transformers = pytest.importorskip("transformers")

TEXTS = ["maria lopez flew to zurich , then oslo .", "the grandson of tom ."]
QUESTION = "where did maria fly ?"
CONTEXT = "maria lopez flew to zurich , then oslo ."


def klora_inputs(tokenizer, backbone, first, second=None):
    """`[CLS] first [SEP] (second [SEP])` ids, mask and segments, as the recipes pack them."""
    rows = []
    for text_a, text_b in zip(first, second or [None] * len(first)):
        ids = [tokenizer.cls_token_id, *to_numpy(tokenizer(text_a)).tolist(),
               tokenizer.sep_token_id]
        segments = [0] * len(ids)
        if text_b is not None:
            tail = [*to_numpy(tokenizer(text_b)).tolist(), tokenizer.sep_token_id]
            ids, segments = ids + tail, segments + [1] * len(tail)
        rows.append((ids, segments))
    length = max(len(ids) for ids, _ in rows)
    x = {"token_ids": np.zeros((len(rows), length), "int32"),
         "padding_mask": np.zeros((len(rows), length), "int32")}
    segments = np.zeros_like(x["token_ids"])
    for i, (ids, seg) in enumerate(rows):
        x["token_ids"][i, :len(ids)], x["padding_mask"][i, :len(ids)] = ids, 1
        segments[i, :len(ids)] = seg
    if "segment_ids" in backbone.input:
        x["segment_ids"] = segments
    return x


TRANSFORMERS_SCRIPT = """
import json, sys
sys.modules["klora"] = None  # any import of klora fails
import numpy as np, torch, transformers
folder, kind, out = sys.argv[1:4]
texts, question, context = json.loads(sys.argv[4])
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
auto = {"backbone": transformers.AutoModel, "seq": transformers.AutoModelForSequenceClassification,
        "token": transformers.AutoModelForTokenClassification,
        "qa": transformers.AutoModelForQuestionAnswering}[kind]
model = auto.from_pretrained(folder).eval()
inputs = tokenizer([question], [context], return_tensors="pt", padding=True) if kind == "qa" \\
    else tokenizer(texts, return_tensors="pt", padding=True)
with torch.no_grad():
    output = model(**inputs)
logits = {"backbone": lambda o: o.last_hidden_state, "seq": lambda o: o.logits,
          "token": lambda o: o.logits,
          "qa": lambda o: torch.stack([o.start_logits, o.end_logits], -1)}[kind](output)
np.savez(out, logits=logits.numpy(), mask=inputs["attention_mask"].numpy(),
         ids=inputs["input_ids"].numpy(), labels=json.dumps(model.config.id2label))
"""


def run_without_klora(script, *args):
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": ""}, timeout=600,
                            cwd=os.path.dirname(str(args[0])))
    assert result.returncode == 0, result.stderr[-3000:]


def build(kind, preset):
    backbone, tokenizer = load_backbone(preset)
    model = {"backbone": lambda: backbone,
             "seq": lambda: keras_hub.models.TextClassifier.from_preset(
                 preset, num_classes=3, preprocessor=None),
             "token": lambda: TokenClassifier(backbone, num_tags=3),
             "qa": lambda: SpanExtractor(backbone)}[kind]()
    klora.apply(model, rank=2, alpha=4, targets="all-linear", seed=0)
    randomize_adapters(model, seed=1)
    rng = np.random.default_rng(2)
    for variable in model.trainable_weights:  # a trained head
        if "lora" not in variable.path:
            variable.assign(0.3 * rng.normal(size=variable.shape).astype("float32"))
    return model, tokenizer


@pytest.mark.parametrize("kind", ["backbone", "seq", "token", "qa"])
def test_transformers_folder_gives_klora_logits(task_preset, kind, tmp_path):
    model, tokenizer = build(kind, task_preset)
    backbone = getattr(model, "backbone", model)
    if kind == "qa":
        x = klora_inputs(tokenizer, backbone, [QUESTION], [CONTEXT])
    else:
        x = klora_inputs(tokenizer, backbone, TEXTS)
    out = model(x)
    ours = to_numpy(out["sequence_output"] if isinstance(out, dict) else out)
    labels = ["O", "B-PER", "I-PER"] if kind in ("seq", "token") else None
    klora.export(model, tmp_path / "hf", tokenizer=tokenizer, labels=labels)
    np.testing.assert_array_equal(to_numpy(model(x)) if kind != "backbone" else ours, ours)
    assert klora.adapted_layers(model)  # the model is left as it was
    run_without_klora(TRANSFORMERS_SCRIPT, tmp_path / "hf", kind, tmp_path / "out.npz",
                      json.dumps([TEXTS, QUESTION, CONTEXT]))
    theirs = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(theirs["ids"] * theirs["mask"],
                                  x["token_ids"])  # the same tokens from the same strings
    real = x["padding_mask"].astype(bool)
    np.testing.assert_allclose(theirs["logits"][real] if kind != "seq" else theirs["logits"],
                               ours[real] if kind != "seq" else ours, atol=1e-4)
    if labels:
        assert json.loads(str(theirs["labels"])) == {str(i): l for i, l in enumerate(labels)}


KERAS_HUB_SCRIPT = """
import json, sys
sys.modules["klora"] = None
import numpy as np, keras, keras_hub
folder, kind, out = sys.argv[1:4]
texts = json.loads(sys.argv[4])
if kind == "seq":
    model = keras_hub.models.TextClassifier.from_preset(folder)
    logits = model.predict(texts, verbose=0)
else:
    backbone = keras_hub.models.Backbone.from_preset(folder)
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(folder)
    ids = [[tokenizer.cls_token_id, *np.asarray(tokenizer(t)).tolist(), tokenizer.sep_token_id]
           for t in texts]
    length = max(map(len, ids))
    x = {"token_ids": np.array([i + [0] * (length - len(i)) for i in ids], "int32"),
         "padding_mask": np.array([[1] * len(i) + [0] * (length - len(i)) for i in ids], "int32")}
    if "segment_ids" in backbone.input:
        x["segment_ids"] = np.zeros_like(x["token_ids"])
    out_ = backbone(x)
    logits = keras.ops.convert_to_numpy(out_["sequence_output"] if isinstance(out_, dict) else out_)
np.save(out, logits)
"""


@pytest.mark.parametrize("kind", ["backbone", "seq"])
def test_keras_hub_preset_gives_klora_outputs(task_preset, kind, tmp_path):
    model, tokenizer = build(kind, task_preset)
    backbone = getattr(model, "backbone", model)
    x = klora_inputs(tokenizer, backbone, TEXTS)
    out = model(x)
    ours = to_numpy(out["sequence_output"] if isinstance(out, dict) else out)
    klora.export(model, tmp_path / "preset", format="keras-hub", tokenizer=tokenizer,
                 sequence_length=32)
    run_without_klora(KERAS_HUB_SCRIPT, tmp_path / "preset", kind, tmp_path / "out.npy",
                      json.dumps(TEXTS))
    theirs = np.load(tmp_path / "out.npy")
    if kind == "seq":
        np.testing.assert_allclose(theirs, ours, atol=1e-4)
    else:
        real = x["padding_mask"].astype(bool)
        np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4)


def test_bad_exports_write_nothing(task_preset, tmp_path):
    model, tokenizer = build("token", task_preset)
    with pytest.raises(ValueError, match="`format` must be one of"):
        klora.export(model, tmp_path / "a", format="onnx", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="keras-hub has no task for a TokenClassifier"):
        klora.export(model, tmp_path / "b", format="keras-hub", tokenizer=tokenizer)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        klora.export(model, tmp_path / "c", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="`tokenizer` must be"):
        klora.export(model, tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == ["c"]
    assert os.listdir(tmp_path / "c") == ["keep.txt"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_base_exports_as_float(task_preset, mode, tmp_path):
    # Adapted and unadapted quantized kernels alike leave dequantized, in float layers.
    _, tokenizer = load_backbone(task_preset)
    model = keras_hub.models.TextClassifier.from_preset(task_preset, num_classes=3,
                                                        preprocessor=None)
    klora.apply(quantize_backbone(model, mode), rank=2, alpha=4, seed=0)
    randomize_adapters(model, seed=1)
    x = klora_inputs(tokenizer, model.backbone, TEXTS)
    ours = to_numpy(model(x))
    klora.export(model, tmp_path / "hf", tokenizer=tokenizer, labels=["a", "b", "c"])
    run_without_klora(TRANSFORMERS_SCRIPT, tmp_path / "hf", "seq", tmp_path / "out.npz",
                      json.dumps([TEXTS, QUESTION, CONTEXT]))
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["logits"], ours, atol=1e-4)
    klora.export(model, tmp_path / "preset", format="keras-hub", tokenizer=tokenizer,
                 sequence_length=32)
    run_without_klora(KERAS_HUB_SCRIPT, tmp_path / "preset", "seq", tmp_path / "out.npy",
                      json.dumps(TEXTS))
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), ours, atol=1e-4)
