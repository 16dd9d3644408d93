"""Training and validation splits of a text-classification set, from a file or tfds.

>>> splits = load_text_classification("reviews.csv", text_column="review", label_column="stars")
>>> splits.labels          # class names/values in class-index order
"""

import dataclasses
import os

from klora.data.labelled_text import (FORMATS, build_label_map, encode_labels,
                                      read_labelled_text, split_off)
from klora.data.tfds_text import load_tfds_text


@dataclasses.dataclass
class TextClassificationSplits:
    train_texts: list
    train_ids: list
    val_texts: list
    val_ids: list
    labels: list  # labels[i] is the label of class index i


def _is_file(data):
    return os.path.splitext(data)[1].lower() in FORMATS or os.path.exists(data)


def load_text_classification(data, validation_data=None, text_column=None, label_column=None,
                             validation_fraction=0.1, seed=0):
    """Reads `data` (a `.csv`/`.tsv`/`.jsonl` file or a tfds name) into splits.

    Validation comes from `validation_data` (a file, or a tfds split name),
    else a tfds 'validation' split, else a seeded held-out fraction of `data`.
    Every label of the validation data must occur in the training data.
    """
    if _is_file(data):
        text_column, label_column = text_column or "text", label_column or "label"
        texts, raw = read_labelled_text(data, text_column, label_column)
        label_map = build_label_map(raw)
        ids = encode_labels(raw, label_map, data)
        if validation_data:
            val_texts, val_raw = read_labelled_text(validation_data, text_column, label_column)
            val_ids = encode_labels(val_raw, label_map, validation_data)
        else:
            texts, ids, val_texts, val_ids = split_off(texts, ids, validation_fraction, seed)
        return TextClassificationSplits(texts, ids, val_texts, val_ids, list(label_map))
    texts, ids, labels = load_tfds_text(data, "train", text_column, label_column)
    try:
        val_texts, val_ids, _ = load_tfds_text(data, validation_data or "validation",
                                               text_column, label_column)
    except ValueError:
        if validation_data:
            raise
        texts, ids, val_texts, val_ids = split_off(texts, ids, validation_fraction, seed)
    return TextClassificationSplits(texts, ids, val_texts, val_ids, labels)


def load_labelled_set(data, split, text_column, label_column, labels):
    """`(texts, label_ids)` of a labelled file or a tfds split, with class indices of
    `labels` (the trained model's class names, in class-index order)."""
    index = {label: i for i, label in enumerate(labels)}
    if _is_file(data):
        texts, raw = read_labelled_text(data, text_column or "text", label_column or "label")
        if all(isinstance(l, str) for l in labels) and not all(isinstance(l, str) for l in raw):
            raw = [str(l) for l in raw]
        return texts, encode_labels(raw, index, data)
    texts, ids, names = load_tfds_text(data, split, text_column, label_column)
    if [str(n) for n in names] != [str(l) for l in labels]:
        raise ValueError(f"Dataset '{data}' has the labels {names}; the adapter was trained "
                         f"with {labels}.")
    return texts, ids
