"""A klora model as a Hugging Face `transformers` folder: `config.json`, `model.safetensors`
and the tokenizer files, loadable with `from_pretrained` without klora.

keras-hub BERT computes the tanh GELU, which is transformers' `gelu_pytorch_tanh`;
DistilBERT the exact `gelu`. The tokenizer files reproduce keras-hub's WordPiece
tokenizer (`do_lower_case`, `strip_accents` as it has them). Every weight of the
model is mapped to a transformers name (a weight with none is an error), except a
BERT backbone's pooler under a token-classification or question-answering head:
transformers' models for those tasks have no pooler.

>>> write_transformers(classifier, "out/", tokenizer, labels=["negative", "positive"])
"""

import json
import os
import re

import numpy as np

from klora.adapted_model import lora_class
from klora.peft.names import (BERT, DISTIL_BERT, HF_CLASSES, QUESTION_ANS, TOKEN_CLS,
                              architecture, is_task, peft_module_names, task_type)
from klora.peft.safetensors import write_safetensors

# Weights outside the linear layers: keras-hub variable path -> transformers name.
_OTHER_WEIGHTS = {
    BERT: [
        (r"token_embedding/embeddings", "embeddings.word_embeddings.weight"),
        (r"position_embedding/embeddings", "embeddings.position_embeddings.weight"),
        (r"segment_embedding/embeddings", "embeddings.token_type_embeddings.weight"),
        (r"embeddings_layer_norm/(gamma|beta)", r"embeddings.LayerNorm.\1"),
        (r"transformer_layer_(\d+)/self_attention_layer_norm/(gamma|beta)",
         r"encoder.layer.\1.attention.output.LayerNorm.\2"),
        (r"transformer_layer_(\d+)/feedforward_layer_norm/(gamma|beta)",
         r"encoder.layer.\1.output.LayerNorm.\2"),
    ],
    DISTIL_BERT: [
        (r"token_and_position_embedding/token_embedding/embeddings",
         "embeddings.word_embeddings.weight"),
        (r"token_and_position_embedding/position_embedding/embeddings",
         "embeddings.position_embeddings.weight"),
        (r"embeddings_layer_norm/(gamma|beta)", r"embeddings.LayerNorm.\1"),
        (r"transformer_layer_(\d+)/self_attention_layer_norm/(gamma|beta)",
         r"transformer.layer.\1.sa_layer_norm.\2"),
        (r"transformer_layer_(\d+)/feedforward_layer_norm/(gamma|beta)",
         r"transformer.layer.\1.output_layer_norm.\2"),
    ],
}
_TORCH_NAMES = {"gamma": "weight", "beta": "bias"}


def _config(model, arch, kind, labels, pad_id):
    backbone = getattr(model, "backbone", model)
    common = {"architectures": [HF_CLASSES[arch][kind]], "vocab_size": backbone.vocabulary_size,
              "max_position_embeddings": backbone.max_sequence_length, "pad_token_id": pad_id,
              "initializer_range": 0.02, "torch_dtype": "float32"}
    if labels is not None:
        common["id2label"] = {str(i): str(name) for i, name in enumerate(labels)}
        common["label2id"] = {str(name): i for i, name in enumerate(labels)}
    if arch == BERT:
        return {**common, "model_type": "bert", "hidden_size": backbone.hidden_dim,
                "num_hidden_layers": backbone.num_layers, "num_attention_heads": backbone.num_heads,
                "intermediate_size": backbone.intermediate_dim,
                "hidden_act": "gelu_pytorch_tanh",  # keras-hub's BERT uses the tanh GELU
                "hidden_dropout_prob": backbone.dropout,
                "attention_probs_dropout_prob": backbone.dropout,
                "type_vocab_size": backbone.num_segments, "layer_norm_eps": 1e-12}
    return {**common, "model_type": "distilbert", "dim": backbone.hidden_dim,
            "n_layers": backbone.num_layers, "n_heads": backbone.num_heads,
            "hidden_dim": backbone.intermediate_dim, "activation": "gelu",
            "dropout": backbone.dropout, "attention_dropout": backbone.dropout,
            "sinusoidal_pos_embds": False}


def _linear_tensors(name, layer, kernel, bias):
    """transformers' `[out, in]` weight (and bias) of a linear layer's kernel and bias."""
    layout = lora_class(layer)
    axes = list(layout._kernel_axes(layer))
    flat = np.transpose(kernel, np.argsort(axes)).reshape(layout.layer_fans(layer))
    tensors = {f"{name}.weight": np.ascontiguousarray(flat.T)}
    if bias is not None:
        tensors[f"{name}.bias"] = bias.reshape(-1)
    return tensors


def transformers_tensors(model, weights):
    """`{transformers name: array}` of `weights` (`klora.merge.merged_weights(model)`)."""
    arch, kind = architecture(model), task_type(model)
    prefix = f"{arch}." if is_task(model) else ""
    tensors, used = {}, set()
    for name, layer in peft_module_names(model).items():
        if kind in (TOKEN_CLS, QUESTION_ANS) and layer.name == "pooled_dense":
            used |= {v.path for v in layer.weights}
            continue
        kernel_path = layer._kernel.path  # a quantized layer's `kernel` may be no variable
        kernel = weights[kernel_path]
        bias = None if layer.bias is None else weights[layer.bias.path]
        tensors.update(_linear_tensors(name, layer, kernel, bias))
        used |= {kernel_path} | ({layer.bias.path} if layer.bias is not None else set())
    for path, value in weights.items():
        if path in used or path.endswith("seed_generator_state"):
            continue
        for pattern, target in _OTHER_WEIGHTS[arch]:
            match = re.fullmatch(rf"(?:.*/)?{pattern}", path)
            if match:
                name = match.expand(target)
                name = re.sub(r"(gamma|beta)$", lambda m: _TORCH_NAMES[m.group(1)], name)
                tensors[prefix + name] = value
                break
        else:
            raise ValueError(f"Weight '{path}' has no transformers counterpart; klora exports "
                             "keras-hub BERT and DistilBERT models and klora's task heads.")
    return tensors


def _tokenizer_files(tokenizer, arch, sequence_length):
    vocabulary = tokenizer.get_vocabulary()
    lowercase = bool(getattr(tokenizer, "lowercase", False))
    config = {"tokenizer_class": "BertTokenizer" if arch == BERT else "DistilBertTokenizer",
              "do_lower_case": lowercase,
              "strip_accents": bool(getattr(tokenizer, "strip_accents", False)),
              "tokenize_chinese_chars": True, "model_max_length": sequence_length,
              "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
              "cls_token": "[CLS]", "mask_token": "[MASK]"}
    special = {k: config[k] for k in ("unk_token", "sep_token", "pad_token", "cls_token",
                                      "mask_token")}
    return {"vocab.txt": "\n".join(vocabulary) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}


def write_transformers(model, directory, weights, tokenizer, labels=None, sequence_length=None):
    """Writes the transformers folder of `model` with `weights` into `directory` (empty)."""
    arch = architecture(model)
    if arch is None:
        raise ValueError(f"format='transformers' holds keras-hub BERT and DistilBERT models; "
                         f"'{model.name}' is a {type(model).__name__}.")
    kind = task_type(model) if is_task(model) else None
    if is_task(model) and kind is None:
        raise ValueError(f"format='transformers' holds a backbone, a text classifier, klora's "
                         f"TokenClassifier or SpanExtractor, not a {type(model).__name__}.")
    tensors = transformers_tensors(model, weights)
    backbone = getattr(model, "backbone", model)
    length = sequence_length or backbone.max_sequence_length
    config = _config(model, arch, kind, labels, tokenizer.pad_token_id)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(write_safetensors(tensors, {"format": "pt"}))
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    for name, text in _tokenizer_files(tokenizer, arch, length).items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(text)
