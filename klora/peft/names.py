"""Hugging Face module names of keras-hub BERT and DistilBERT layers.

PEFT keys an adapter by the `transformers` module it adapts, e.g.
`encoder.layer.0.attention.self.query` for the keras-hub layer
`transformer_layer_0/self_attention_layer/query`. A Task corresponds to a
`transformers` task model, whose backbone modules get the `bert.` /
`distilbert.` prefix: keras-hub's `*TextClassifier` to `*ForSequenceClassification`
(PEFT `task_type` `SEQ_CLS`; head `classifier`, keras `logits`, and for
DistilBERT `pre_classifier`, keras `pooled_dense`), klora's `TokenClassifier`
to `*ForTokenClassification` (`TOKEN_CLS`; `classifier`, keras `token_logits`)
and `SpanExtractor` to `*ForQuestionAnswering` (`QUESTION_ANS`; `qa_outputs`,
keras `span_logits`). Layers without such a name (other models) are keyed by
their keras `layer.path`.

Both libraries flatten a kernel's input and output axes in the same order
(heads major, head dimension minor), so a keras `A: (fan_in, r)` is PEFT's
`lora_A.weight` transposed, `[r, fan_in]`, and likewise for `B`.

>>> peft_module_names(keras_hub.models.BertTextClassifier(...))["bert.pooler.dense"].path
'pooled_dense'
"""

import re

import keras

BERT = "bert"
DISTIL_BERT = "distilbert"

# keras-hub path inside a transformer layer -> Hugging Face name inside layer N.
_LAYER_NAMES = {
    BERT: {
        "self_attention_layer/query": "attention.self.query",
        "self_attention_layer/key": "attention.self.key",
        "self_attention_layer/value": "attention.self.value",
        "self_attention_layer/attention_output": "attention.output.dense",
        "feedforward_intermediate_dense": "intermediate.dense",
        "feedforward_output_dense": "output.dense",
    },
    DISTIL_BERT: {
        "self_attention_layer/query": "attention.q_lin",
        "self_attention_layer/key": "attention.k_lin",
        "self_attention_layer/value": "attention.v_lin",
        "self_attention_layer/attention_output": "attention.out_lin",
        "feedforward_intermediate_dense": "ffn.lin1",
        "feedforward_output_dense": "ffn.lin2",
    },
}
_STACK = {BERT: "encoder.layer", DISTIL_BERT: "transformer.layer"}
_BACKBONE_EXTRA = {BERT: {"pooled_dense": "pooler.dense"}, DISTIL_BERT: {}}
SEQ_CLS, TOKEN_CLS, QUESTION_ANS = "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"
_HEADS = {  # (architecture, PEFT task type): {keras head layer: transformers module}
    (BERT, SEQ_CLS): {"logits": "classifier"},
    (DISTIL_BERT, SEQ_CLS): {"pooled_dense": "pre_classifier", "logits": "classifier"},
    (BERT, TOKEN_CLS): {"token_logits": "classifier"},
    (DISTIL_BERT, TOKEN_CLS): {"token_logits": "classifier"},
    (BERT, QUESTION_ANS): {"span_logits": "qa_outputs"},
    (DISTIL_BERT, QUESTION_ANS): {"span_logits": "qa_outputs"},
}
# The transformers classes a klora model corresponds to, by PEFT task type.
HF_CLASSES = {
    BERT: {None: "BertModel", SEQ_CLS: "BertForSequenceClassification",
           TOKEN_CLS: "BertForTokenClassification", QUESTION_ANS: "BertForQuestionAnswering"},
    DISTIL_BERT: {None: "DistilBertModel", SEQ_CLS: "DistilBertForSequenceClassification",
                  TOKEN_CLS: "DistilBertForTokenClassification",
                  QUESTION_ANS: "DistilBertForQuestionAnswering"},
}


def architecture(model):
    """`"bert"`, `"distilbert"` or `None` (another model) for a backbone or Task."""
    import keras_hub

    backbone = getattr(model, "backbone", model)
    if isinstance(backbone, keras_hub.models.DistilBertBackbone):
        return DISTIL_BERT
    if isinstance(backbone, keras_hub.models.BertBackbone):
        return BERT
    return None


def is_task(model):
    """Whether `model` is a Task wrapping a backbone (its names get a prefix)."""
    return isinstance(getattr(model, "backbone", None), keras.layers.Layer)


def task_type(model):
    """PEFT's `task_type` of a model: `SEQ_CLS` for a keras-hub text classifier, what a
    klora task declares (`TokenClassifier`: `TOKEN_CLS`, `SpanExtractor`: `QUESTION_ANS`),
    else `None`."""
    import keras_hub

    if isinstance(model, keras_hub.models.TextClassifier):
        return SEQ_CLS
    return getattr(model, "peft_task_type", None) if is_task(model) else None


def head_modules(model):
    """The Hugging Face names of `model`'s task head layers (`[]` for a backbone or an
    unknown task), e.g. `["pre_classifier", "classifier"]` for a DistilBERT text classifier."""
    return list(_HEADS.get((architecture(model), task_type(model)), {}).values())


def architecture_of_module(name):
    """The architecture a Hugging Face module name belongs to, or `None`."""
    if re.match(r"(bert\.)?(encoder\.layer\.\d+|pooler)\.", name):
        return BERT
    if re.match(r"(distilbert\.)?transformer\.layer\.\d+\.", name):
        return DISTIL_BERT
    return None


def _backbone_name(arch, path):
    for keras_suffix, hf_suffix in _LAYER_NAMES[arch].items():
        match = re.fullmatch(rf"(?:.*/)?transformer_layer_(\d+)/{keras_suffix}", path)
        if match:
            return f"{_STACK[arch]}.{match.group(1)}.{hf_suffix}"
    return _BACKBONE_EXTRA[arch].get(path)


def _linear_layers(layer, include_self=False):
    return [l for l in layer._flatten_layers(include_self=include_self)
            if isinstance(l, (keras.layers.Dense, keras.layers.EinsumDense))]


def peft_module_names(model):
    """`{module name: layer}` for every `Dense` / `EinsumDense` layer of `model`.

    The name is the Hugging Face module name for BERT / DistilBERT layers
    and the keras `layer.path` otherwise.
    """
    arch = architecture(model)
    names = {}
    if is_task(model):
        backbone = model.backbone
        prefix = f"{arch}." if arch else ""
        inner = {id(l) for l in _linear_layers(backbone, include_self=True)}
        for layer in _linear_layers(backbone, include_self=True):
            name = _backbone_name(arch, layer.path) if arch else None
            names[prefix + name if name else layer.path] = layer
        heads = _HEADS.get((arch, task_type(model)), {})
        for layer in _linear_layers(model):
            if id(layer) not in inner:
                names[heads.get(layer.path, layer.path)] = layer
    else:
        for layer in _linear_layers(model):
            name = _backbone_name(arch, layer.path) if arch else None
            names[name or layer.path] = layer
    return names


def resolve_module(module, names, model):
    """The key in `names` (from `peft_module_names(model)`) of a file's module name,
    allowing the `bert.` / `distilbert.` prefix to differ between a Task and a
    backbone; `None` if the model has no such module."""
    if module in names:
        return module
    paths = {layer.path: name for name, layer in names.items()}
    if module in paths:  # klora 0.1 keyed task heads by their keras names
        return paths[module]
    arch = architecture(model)
    if arch and is_task(model) and f"{arch}.{module}" in names:
        return f"{arch}.{module}"
    if arch and not is_task(model) and module.startswith(f"{arch}.") and \
            module[len(arch) + 1:] in names:
        return module[len(arch) + 1:]
    return None
