"""A recipe's model from its flags: the backbone of `--preset` under a task head."""

import keras

from klora.presets import load_backbone, max_sequence_length


def check_max_length(args, backbone):
    """Raises a `ValueError` if `--max-length` exceeds the backbone's position embedding."""
    limit = max_sequence_length(backbone)
    if args.max_length > limit:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's limit of {limit}.")


def load_task_model(args, head):
    """`(model, tokenizer)`: `head(backbone)` on `args.preset`'s backbone, seeded by `--seed`.

    >>> model, tokenizer = load_task_model(args, SpanExtractor)
    >>> klora.apply(model, config=lora_config(args), targets=lora_targets(args))
    """
    keras.utils.set_random_seed(args.seed)
    backbone, tokenizer = load_backbone(args.preset)
    check_max_length(args, backbone)
    return head(backbone), tokenizer
