"""A klora model as a keras-hub preset folder, loadable with `from_preset` without klora.

The preset holds a plain float copy of the model (keras-hub's own classes) with the
adapters merged into its kernels (a quantized kernel dequantized), the tokenizer, and for a text classifier its preprocessor:
`keras_hub.models.TextClassifier.from_preset(folder)` classifies raw strings.
keras-hub has no token-classification or question-answering task, so klora's
`TokenClassifier` and `SpanExtractor` cannot be presets of their own: export their
backbone (`model.backbone`) in this format, or the whole model as `transformers`,
whose `*ForTokenClassification` / `*ForQuestionAnswering` hold their heads.
"""

import keras_hub


def plain_copy(model, weights, preprocessor=None):
    """A new instance of `model`'s own keras-hub class holding `weights` (by variable path);
    a Task gets `preprocessor`."""
    base = getattr(model, "_klora_base_class", type(model))
    config = model.get_config() if base is type(model) else model.get_config()["model"]["config"]
    if isinstance(model, keras_hub.models.Task):
        config = {**config, "backbone": plain_copy(model.backbone, weights),
                  "preprocessor": preprocessor}
    if isinstance(model, keras_hub.models.Backbone):  # float layers: quantization is merged
        policy = model.dtype_policy
        config = {**config, "dtype": getattr(policy, "default_policy", policy).name}
    copy = base.from_config(config)
    for variable in copy.weights:
        if variable.path not in weights:
            raise ValueError(f"No weight for '{variable.path}' in the exported model.")
        variable.assign(weights[variable.path])
    return copy


def write_keras_hub(model, directory, weights, tokenizer, sequence_length=None):
    """Writes the keras-hub preset of `model` with `weights` into `directory` (empty)."""
    if not isinstance(model, (keras_hub.models.Backbone, keras_hub.models.TextClassifier)):
        raise ValueError(f"format='keras-hub' holds a keras-hub backbone or text classifier; "
                         f"keras-hub has no task for a {type(model).__name__}: export "
                         "`model.backbone` in this format, or the model as "
                         "format='transformers'.")
    preprocessor = None
    if isinstance(model, keras_hub.models.TextClassifier):  # raw strings in, logits out
        base = getattr(model, "_klora_base_class", type(model))
        preprocessor = base.preprocessor_cls(
            tokenizer=tokenizer,
            sequence_length=sequence_length or model.backbone.max_sequence_length)
    copy = plain_copy(model, weights, preprocessor)
    copy.save_to_preset(directory)  # a Task saves its preprocessor and tokenizer too
    if preprocessor is None:
        tokenizer.save_to_preset(directory)
