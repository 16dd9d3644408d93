"""`klora.export`: a trained model, adapters merged, in a format that loads without klora.

- `"transformers"`: a Hugging Face folder (`config.json`, `model.safetensors`, tokenizer
  files) for `AutoModel*.from_pretrained` and `AutoTokenizer` (`klora.export.transformers`);
- `"keras-hub"`: a keras-hub preset for `Backbone.from_preset` / `TextClassifier.from_preset`
  (`klora.export.keras_hub`).

The adapters are merged into a copy of the weights: the model is left as it was.

>>> klora.export(classifier, "sst2-transformers", tokenizer=tokenizer,
...              labels=["negative", "positive"])
"""

import os

from klora.atomic import atomic_directory
from klora.export.keras_hub import write_keras_hub
from klora.export.transformers import write_transformers
from klora.merge import merged_weights

FORMATS = ("transformers", "keras-hub")


def export(model, path, format="transformers", tokenizer=None, labels=None,
           sequence_length=None):
    """Writes `model` with its active adapter merged into folder `path`, without changing it.

    Args:
        model: A keras-hub BERT / DistilBERT backbone or text classifier, or one of
            klora's task models (`format="transformers"` only), adapted or not.
        path: The output folder; it must not exist or be empty.
        format: `"transformers"` or `"keras-hub"`.
        tokenizer: The keras-hub tokenizer of the model (its vocabulary is written).
        labels: Class names in class-index order (`id2label` for transformers).
        sequence_length: The longest input the tokenizer or preprocessor makes
            (default: the model's position limit).

    The folder is written atomically; anything wrong raises a `ValueError` before
    anything is written.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}. Received: format={format!r}")
    if tokenizer is None or not hasattr(tokenizer, "get_vocabulary"):
        raise ValueError("`tokenizer` must be the model's keras-hub tokenizer (its vocabulary "
                         f"goes into the export). Received: {tokenizer!r}")
    path = os.fspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"The output folder '{path}' exists and is not empty: choose a new "
                         "folder (nothing was written).")
    weights = merged_weights(model)
    write = {"transformers": lambda d: write_transformers(model, d, weights, tokenizer, labels,
                                                          sequence_length),
             "keras-hub": lambda d: write_keras_hub(model, d, weights, tokenizer,
                                                    sequence_length)}[format]
    with atomic_directory(path) as directory:
        write(directory)
    return path
