"""A recipe's model from its flags: backbone, length check, task head, LoRA."""

import keras

import klora
from klora.presets import load_backbone, max_sequence_length
from klora.training.arguments import lora_targets


def build_task_model(args, head, lora=True):
    """`(model, tokenizer)`: `head(backbone)` on `args.preset`'s backbone, with LoRA from the flags.

    Seeds Keras with `--seed`, rejects a `--max-length` beyond the backbone's
    position embedding, (unless `lora=False`, full fine-tuning) applies
    `--rank/--alpha/--dropout/--targets` adapters to the backbone, and with
    `--remat` rematerializes its transformer blocks.

    >>> model, tokenizer = build_task_model(args, lambda backbone: SpanExtractor(backbone))
    """
    keras.utils.set_random_seed(args.seed)
    backbone, tokenizer = load_backbone(args.preset)
    limit = max_sequence_length(backbone)
    if args.max_length > limit:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's limit of {limit}.")
    model = head(backbone)
    if lora:
        klora.apply(model.backbone, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                    targets=lora_targets(args), seed=args.seed)
        klora.summary(model)
    if args.remat:
        klora.enable_remat(model)
    return model, tokenizer
