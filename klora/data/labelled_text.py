"""Read labelled sentences from CSV, TSV or JSONL files, with clear errors.

>>> texts, labels = read_labelled_text("train.tsv", "sentence", "label")
>>> label_map = build_label_map(labels)          # {"negative": 0, "positive": 1}
>>> ids = encode_labels(labels, label_map, "train.tsv")
"""

import csv
import json
import os

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}


def decode_file(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: not valid UTF-8 (byte {raw[e.start]:#x} at line {line}); "
            "save the file as UTF-8."
        ) from None


def _rows(path, text):
    delimiter = FORMATS[os.path.splitext(path)[1].lower()]
    if delimiter is not None:
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter, quoting=csv.QUOTE_NONE
                                if delimiter == "\t" else csv.QUOTE_MINIMAL)
        return reader.fieldnames or [], [(i + 2, row) for i, row in enumerate(reader)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON object ({e.msg}).") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object per line.")
        rows.append((number, row))
    columns = sorted({key for _, row in rows for key in row})
    return columns, rows


def read_labelled_text(path, text_column="text", label_column="label"):
    """Returns `(texts, labels)` from a `.csv`, `.tsv` or `.jsonl` file.

    Labels are ints when every label is an integer (or a string of digits in
    CSV/TSV), otherwise strings. Raises a `ValueError` for a missing or empty
    file, an unknown format, missing columns (naming those that exist), empty
    cells, non-UTF-8 bytes and labels that mix numbers and words.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Data file not found: {path}")
    if os.path.splitext(path)[1].lower() not in FORMATS:
        raise ValueError(f"{path}: unknown format; use one of {sorted(FORMATS)}.")
    columns, rows = _rows(path, decode_file(path))
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty or has only a header).")
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; the file has {list(columns)}. "
            "Choose them with --text-column / --label-column."
        )
    texts, labels = [], []
    for number, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{number}: empty or non-text '{text_column}' value {text!r}.")
        if label is None or (isinstance(label, str) and not label.strip()) or isinstance(
                label, (bool, float, list, dict)):
            raise ValueError(
                f"{path}:{number}: '{label_column}' must be an integer or a string, got {label!r}."
            )
        texts.append(text.strip())
        labels.append(label.strip() if isinstance(label, str) else label)
    return texts, _normalize_labels(labels, path)


def _is_number(label):
    return isinstance(label, int) or label.lstrip("-").isdigit()


def _normalize_labels(labels, path):
    numbers = [l for l in labels if _is_number(l)]
    words = [l for l in labels if not _is_number(l)]
    if numbers and words:
        raise ValueError(
            f"{path}: labels mix numbers and words (e.g. {numbers[0]!r} and {words[0]!r}); "
            "use one kind for every example."
        )
    return [int(l) for l in labels] if numbers else labels


def build_label_map(labels):
    """Maps each distinct label, in sorted order, to a class index."""
    return {label: index for index, label in enumerate(sorted(set(labels)))}


def encode_labels(labels, label_map, source="data"):
    """Class indices for `labels`; raises for a label the map does not know."""
    unknown = sorted({l for l in labels if l not in label_map}, key=str)
    if unknown:
        raise ValueError(
            f"{source}: label(s) {unknown[:5]} not in the label map {list(label_map)} "
            "(built from the training data)."
        )
    return [label_map[l] for l in labels]


def split_off(texts, labels, fraction, seed=0):
    """Holds out a random `fraction` for validation: `(texts, labels, val_texts, val_labels)`."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(texts))
    n_val = max(1, int(round(len(texts) * fraction)))
    if n_val >= len(texts):
        raise ValueError(f"Cannot hold out {fraction:.0%} of {len(texts)} examples for validation.")
    val, train = order[:n_val], order[n_val:]
    return ([texts[i] for i in train], [labels[i] for i in train],
            [texts[i] for i in val], [labels[i] for i in val])


def read_lines(path):
    """Non-empty lines of a UTF-8 text file, e.g. sentences to label."""
    if not os.path.isfile(path):
        raise ValueError(f"File not found: {path}")
    lines = [line.strip() for line in decode_file(path).splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no non-empty lines.")
    return lines
