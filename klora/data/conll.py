"""Tagged sentences for NER: CoNLL column files, JSONL, or tfds `conll2003`.

A CoNLL file has one `token ... TAG` line per word (the token first, the tag
last, any columns between), a blank line between sentences, and optional
`-DOCSTART-` lines. A JSONL file has one `{"tokens": [...], "tags": [...]}`
object per line. Tags follow the IOB2/IOBES scheme (`O`, `B-PER`, `I-PER`,
`E-PER`, `S-PER`).

>>> sentences, tags = read_tagged_sentences("train.txt")
>>> tag_names = build_tag_list(tags)          # ["O", "B-LOC", "I-LOC", ...]
"""

import json
import os
import re

from klora.data.labelled_text import decode_file, split_off
from klora.data.tfds_text import prepared_builder

TAG = re.compile(r"O|[BIES]-\S+")
JSONL = (".jsonl", ".json")


def _check_tag(tag, where):
    if not TAG.fullmatch(tag):
        raise ValueError(f"{where}: tag {tag!r} is not 'O' or B-/I-/E-/S-TYPE (IOB2/IOBES).")


def _read_conll(path, text):
    sentences, tags, words, labels = [], [], [], []
    columns = None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if fields and fields[0] == "-DOCSTART-":
            continue
        if not fields:
            if words:
                sentences.append(words)
                tags.append(labels)
                words, labels = [], []
            continue
        if len(fields) < 2:
            raise ValueError(f"{path}:{number}: expected 'token ... TAG', got {line.strip()!r}.")
        if columns is None:
            columns = len(fields)
        elif len(fields) != columns:
            raise ValueError(
                f"{path}:{number}: {len(fields)} columns, but earlier lines have {columns} "
                f"(ragged line {line.strip()!r}).")
        _check_tag(fields[-1], f"{path}:{number}")
        words.append(fields[0])
        labels.append(fields[-1])
    if words:
        sentences.append(words)
        tags.append(labels)
    return sentences, tags


def _read_jsonl(path, text):
    sentences, tags = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object ({e.msg}).") from None
        if not isinstance(row, dict) or "tokens" not in row or "tags" not in row:
            raise ValueError(f"{where}: expected an object with 'tokens' and 'tags' lists.")
        words, labels = row["tokens"], row["tags"]
        if not (isinstance(words, list) and isinstance(labels, list)
                and all(isinstance(w, str) and w.strip() for w in words)
                and all(isinstance(t, str) for t in labels)):
            raise ValueError(f"{where}: 'tokens' and 'tags' must be lists of non-empty strings.")
        if len(words) != len(labels):
            raise ValueError(f"{where}: {len(words)} tokens but {len(labels)} tags.")
        if not words:
            continue
        for tag in labels:
            _check_tag(tag, where)
        sentences.append([w.strip() for w in words])
        tags.append(labels)
    return sentences, tags


def read_tagged_sentences(path):
    """Returns `(sentences, tags)`: lists of word lists and of tag lists.

    `.jsonl`/`.json` files are read as JSONL, anything else as CoNLL columns.
    Raises a `ValueError` naming `file:line` for ragged lines, a token
    without a tag, a tag outside IOB2/IOBES, token/tag count mismatches, and
    for a missing or empty file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Data file not found: {path}")
    text = decode_file(path)
    reader = _read_jsonl if path.lower().endswith(JSONL) else _read_conll
    sentences, tags = reader(path, text)
    if not sentences:
        raise ValueError(f"{path}: no tagged sentences.")
    return sentences, tags


def build_tag_list(tags):
    """The tag set, `O` first, then by entity type and position (B, I, E, S)."""
    found = {t for sentence in tags for t in sentence} | {"O"}
    order = {"B": 0, "I": 1, "E": 2, "S": 3}
    return ["O"] + sorted(found - {"O"}, key=lambda t: (t[2:], order[t[0]]))


def encode_tags(tags, tag_list, source="data"):
    """Tag ids of each sentence; raises for a tag that `tag_list` lacks."""
    index = {t: i for i, t in enumerate(tag_list)}
    unknown = sorted({t for sentence in tags for t in sentence if t not in index})
    if unknown:
        raise ValueError(f"{source}: unknown tag(s) {unknown[:5]}: not in the training tags "
                         f"{tag_list}.")
    return [[index[t] for t in sentence] for sentence in tags]


def load_tfds_conll(name, split, data_dir=None):
    """`(sentences, tags)` of a tfds NER set with `tokens` and `ner` features (`conll2003`)."""
    builder = prepared_builder(name, split, data_dir,
                               "a local CoNLL or JSONL file (--data train.txt)")
    import tensorflow_datasets as tfds

    names = builder.info.features["ner"].feature.names
    sentences, tags = [], []
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
        words = [w.decode("utf-8") for w in example["tokens"]]
        if words:
            sentences.append(words)
            tags.append([names[int(i)] for i in example["ner"]])
    return sentences, tags


def _is_file(data):
    return os.path.exists(data) or os.sep in data or "." in os.path.basename(data)


def load_tagged_splits(data, validation_data=None, validation_fraction=0.1, seed=0):
    """`(train_sentences, train_tags, val_sentences, val_tags, tag_list)` from files or tfds.

    Validation comes from `validation_data` (a file, or a tfds split name),
    else the tfds 'validation' split, else a seeded held-out fraction. Every
    validation tag must occur in the training data.
    """
    if _is_file(data):
        sentences, tags = read_tagged_sentences(data)
        if validation_data:
            val_sentences, val_tags = read_tagged_sentences(validation_data)
        else:
            sentences, tags, val_sentences, val_tags = split_off(
                sentences, tags, validation_fraction, seed)
    else:
        sentences, tags = load_tfds_conll(data, "train")
        val_sentences, val_tags = load_tfds_conll(data, validation_data or "validation")
    tag_list = build_tag_list(tags)
    encode_tags(val_tags, tag_list, validation_data or "validation data")
    return sentences, tags, val_sentences, val_tags, tag_list


def load_tagged_set(data, split="validation"):
    """`(sentences, tags)` of a CoNLL / JSONL file or of a tfds split (for evaluation)."""
    if _is_file(data):
        return read_tagged_sentences(data)
    return load_tfds_conll(data, split)
