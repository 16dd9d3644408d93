"""`klora.summary`: how many parameters train, and where they are."""

import math

from klora.adapted_model import adapted_layers


def _count(variables):
    return sum(math.prod(v.shape) for v in variables)


def summary(model, print_fn=print):
    """Prints and returns adapter, head, trainable and total parameter counts.

    `adapter` counts the LoRA A and B weights, `head` the other trainable
    weights (e.g. a classifier layer), `total` every weight of the model, and
    `trainable_percent` the share that trains (PEFT's
    `print_trainable_parameters`).

    >>> klora.summary(classifier)
    adapter params: 73,728 || head params: 770 || trainable params: 74,498 || all params: 22,788,866 || trainable%: 0.3269
    """
    adapters = [v for l in adapted_layers(model) for v in l.lora_variables()]
    adapter_ids = {id(v) for v in adapters}
    trainable = model.trainable_weights
    counts = {
        "adapter": _count(v for v in trainable if id(v) in adapter_ids),
        "head": _count(v for v in trainable if id(v) not in adapter_ids),
        "trainable": _count(trainable),
        "total": _count(model.weights),
    }
    counts["trainable_percent"] = 100.0 * counts["trainable"] / max(counts["total"], 1)
    print_fn(
        f"adapter params: {counts['adapter']:,} || head params: {counts['head']:,} || "
        f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || "
        f"trainable%: {counts['trainable_percent']:.4f}"
    )
    return counts
