"""CoNLL / JSONL readers for tagged sentences, and their errors."""

import json
import re

import pytest

from klora.data.conll import (build_tag_list, encode_tags, load_tagged_splits,
                              read_tagged_sentences)
from tests.conftest import TASK_DATA


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_conll_columns_docstart_and_blank_lines(tmp_path):
    path = write(tmp_path, "a.txt", "-DOCSTART- -X- O\n\nAnna NNP B-PER\nsings VBZ O\n\n\n"
                                     "Oslo NNP B-LOC\n")
    assert read_tagged_sentences(path) == ([["Anna", "sings"], ["Oslo"]],
                                           [["B-PER", "O"], ["B-LOC"]])


def test_jsonl(tmp_path):
    rows = [{"tokens": ["Anna", "sings"], "tags": ["B-PER", "O"]}, {"tokens": [], "tags": []}]
    path = write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert read_tagged_sentences(path) == ([["Anna", "sings"]], [["B-PER", "O"]])


@pytest.mark.parametrize("name, text, message", [
    ("a.txt", "Anna NNP B-PER\nsings O\n", r"a.txt:2: 2 columns, but earlier lines have 3"),
    ("a.txt", "Anna B-PER\nsings\n", r"a.txt:2: expected 'token ... TAG'"),
    ("a.txt", "Anna PERSON\n", r"a.txt:1: tag 'PERSON' is not 'O' or B-/I-/E-/S-TYPE"),
    ("a.txt", "\n\n", "no tagged sentences"),
    ("a.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', r"a.jsonl:1: 2 tokens but 1 tags"),
    ("a.jsonl", '{"tokens": ["a"]}\n', r"a.jsonl:1: expected an object with 'tokens' and 'tags'"),
    ("a.jsonl", '\n{"tokens": ["a"], "tags": ["X-1"]}\n', r"a.jsonl:2: tag 'X-1'"),
    ("a.jsonl", '{"tokens": ["a"], "tags": [1]}\n', "lists of non-empty strings"),
    ("a.jsonl", "not json\n", r"a.jsonl:1: not a JSON object"),
])
def test_malformed_files(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        read_tagged_sentences(write(tmp_path, name, text))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_tagged_sentences(str(tmp_path / "nope.txt"))


def test_tag_list_and_unknown_tags():
    tags = [["B-PER", "I-PER", "O"], ["B-LOC"]]
    tag_list = build_tag_list(tags)
    assert tag_list == ["O", "B-LOC", "B-PER", "I-PER"]
    assert encode_tags(tags, tag_list) == [[2, 3, 0], [1]]
    with pytest.raises(ValueError, match=re.escape("valid.txt: unknown tag(s) ['B-ORG']")):
        encode_tags([["B-ORG"]], tag_list, "valid.txt")


def test_splits_from_files_and_held_out(tmp_path):
    train = f"{TASK_DATA}/ner_train.txt"
    s, t, vs, vt, tags = load_tagged_splits(train, f"{TASK_DATA}/ner_valid.txt")
    assert (len(s), len(vs)) == (12, 4) and "B-MISC" in tags
    s, t, vs, vt, _ = load_tagged_splits(train, validation_fraction=0.25, seed=1)
    assert (len(s), len(vs)) == (9, 3)
    bad = write(tmp_path, "valid.txt", "Anna B-ART\n")
    with pytest.raises(ValueError, match=r"unknown tag\(s\) \['B-ART'\]"):
        load_tagged_splits(train, bad)
