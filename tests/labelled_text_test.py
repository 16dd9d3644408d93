import json

import pytest

from klora.data import build_label_map, encode_labels, read_labelled_text, read_lines, split_off


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def test_tsv_csv_and_jsonl(tmp_path):
    tsv = write(tmp_path, "a.tsv", "text\tlabel\ngreat \"fun\" film\tpositive\ndull\tnegative\n")
    assert read_labelled_text(tsv) == (['great "fun" film', "dull"], ["positive", "negative"])
    csv_file = write(tmp_path, "a.csv", 'review,stars\n"good, really",1\nbad,0\n')
    assert read_labelled_text(csv_file, "review", "stars") == (["good, really", "bad"], [1, 0])
    lines = [json.dumps({"text": "fine", "label": 2}), "", json.dumps({"text": "meh", "label": 0})]
    jsonl = write(tmp_path, "a.jsonl", "\n".join(lines))
    assert read_labelled_text(jsonl) == (["fine", "meh"], [2, 0])


def test_label_map_and_encoding():
    label_map = build_label_map(["pos", "neg", "pos"])
    assert label_map == {"neg": 0, "pos": 1}
    assert encode_labels(["pos", "neg"], label_map) == [1, 0]
    with pytest.raises(ValueError, match=r"\['neutral'\] not in the label map"):
        encode_labels(["neutral"], label_map, "valid.tsv")


@pytest.mark.parametrize("name, content, message", [
    ("empty.tsv", "", "no examples"),
    ("header.tsv", "text\tlabel\n", "no examples"),
    ("cols.tsv", "sentence\tscore\nhi\t1\n", r"missing column\(s\) \['text', 'label'\]; the file has \['sentence', 'score'\]"),
    ("mixed.tsv", "text\tlabel\na\t1\nb\tgood\n", "mix numbers and words"),
    ("blank.tsv", "text\tlabel\n\t1\n", "empty or non-text"),
    ("latin1.tsv", "text\tlabel\nna\xefve\t1\n".encode("latin-1"), "not valid UTF-8.*line 2"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{oops\n', "bad.jsonl:2: not a JSON object"),
    ("float.jsonl", '{"text": "a", "label": 0.5}\n', "integer or a string"),
    ("mixed.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n', "mix numbers"),
    ("data.parquet", "x", "unknown format"),
])
def test_bad_files(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(ValueError, match=message):
        read_labelled_text(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_labelled_text(str(tmp_path / "nope.tsv"))


def test_split_off_is_seeded_partition():
    texts, labels = [str(i) for i in range(20)], list(range(20))
    train, train_y, val, val_y = split_off(texts, labels, 0.25, seed=3)
    assert len(val) == 5 and sorted(train + val, key=int) == texts
    assert split_off(texts, labels, 0.25, seed=3) == (train, train_y, val, val_y)


def test_read_lines(tmp_path):
    assert read_lines(write(tmp_path, "s.txt", "one\n\n two \n")) == ["one", "two"]
    with pytest.raises(ValueError, match="no non-empty"):
        read_lines(write(tmp_path, "e.txt", "\n"))
