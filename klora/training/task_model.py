"""A recipe's model from its flags: the backbone of `--preset` under a task head."""

import keras

from klora.presets import load_backbone, max_sequence_length


def check_max_length(args, backbone):
    """Raises a `ValueError` if `--max-length` exceeds the backbone's position embedding."""
    limit = max_sequence_length(backbone)
    if args.max_length > limit:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's limit of {limit}.")


def quantize_backbone(model, mode):
    """Quantizes the linear layers of `model.backbone` to `mode` (`"int8"`, `"int4"`, or
    `None` for nothing), weights only: activations stay float, the head stays float."""
    if mode is None:
        return model
    config = {"int8": keras.quantizers.Int8QuantizationConfig(weight_quantizer=None,
                                                             activation_quantizer=None),
              "int4": keras.quantizers.Int4QuantizationConfig()}[mode]
    model.backbone.quantize(config=config, filters=lambda layer: isinstance(
        layer, (keras.layers.Dense, keras.layers.EinsumDense)))
    return model


def load_task_model(args, head):
    """`(model, tokenizer)`: `head(backbone)` on `args.preset`'s backbone, seeded by `--seed`,
    its backbone quantized if `--quantize` says so.

    >>> model, tokenizer = load_task_model(args, SpanExtractor)
    >>> klora.apply(model, config=lora_config(args), targets=lora_targets(args))
    """
    keras.utils.set_random_seed(args.seed)
    backbone, tokenizer = load_backbone(args.preset)
    check_max_length(args, backbone)
    return quantize_backbone(head(backbone), args.quantize), tokenizer
