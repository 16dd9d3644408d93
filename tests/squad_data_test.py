"""SQuAD reading, window splitting, answer -> token mapping and span decoding."""

import json

import keras_hub
import numpy as np
import pytest

from klora.data.squad import (QAExample, best_spans, decode_answers, is_squad_v2,
                              load_qa_splits, make_windows, read_squad, span_answers,
                              split_by_article)
from klora.data.word_alignment import WordPieces
from tests.conftest import TASK_DATA, task_vocabulary


@pytest.fixture(scope="module")
def pieces():
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=task_vocabulary(), lowercase=True)
    return WordPieces(tokenizer)


def squad_file(tmp_path, qas, context="Anna lives in Zürich."):
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_reads_the_sample():
    examples = read_squad(f"{TASK_DATA}/squad_train.json")
    assert len(examples) == 9 and {e.title for e in examples} == {"Harbour", "Café", "Glacier"}
    assert examples[3].answers == [("Zürich", 22)]  # "Café Müller opened in " is 22 characters


@pytest.mark.parametrize("qa, message", [
    ({"id": "x", "question": "Where?", "answers": [{"text": "Zurich", "answer_start": 14}]},
     r"question 'x': answer 'Zurich' does not occur at answer_start 14 \(the context has 'Zürich'"),
    ({"id": "x", "question": "Where?", "answers": []}, r"has no answer\. SQuAD 1\.1 data"),
    ({"id": "x", "question": "Where?", "answers": [], "is_impossible": False},
     r"has no answer\. SQuAD 1\.1 data"),
    ({"id": "x", "question": "Where?", "is_impossible": True,
      "answers": [{"text": "Anna", "answer_start": 0}]}, "marked unanswerable .* has answers"),
    ({"id": "x", "question": "Where?", "answers": [], "is_impossible": "yes"},
     "'is_impossible' must be true or false"),
    ({"id": "x", "answers": [{"text": "Anna", "answer_start": 0}]}, "lacks an 'id' or a 'question'"),
    ({"id": "x", "question": "Who?", "answers": [{"text": "Anna"}]}, "integer 'answer_start'"),
])
def test_malformed_questions(tmp_path, qa, message):
    with pytest.raises(ValueError, match=message):
        read_squad(squad_file(tmp_path, [qa]))


def test_not_squad_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_squad(str(bad))
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="expected SQuAD JSON"):
        read_squad(str(bad))


def test_split_by_article_keeps_articles_whole():
    examples = read_squad(f"{TASK_DATA}/squad_train.json")
    train, val = split_by_article(examples, 0.34, seed=0)
    assert len(train) + len(val) == 9 and len(val) == 3
    assert not {e.title for e in train} & {e.title for e in val}
    train, val = load_qa_splits(f"{TASK_DATA}/squad_train.json", f"{TASK_DATA}/squad_valid.json")
    assert (len(train), len(val)) == (9, 3)


def window_text(example, windows, k, span):
    offsets = windows.offsets[k]
    return example.context[offsets[span[0]][0]:offsets[span[1]][1]]


@pytest.mark.parametrize("answer", ["Zürich", "Anna Müller", "1875", "great-grandson",
                                    "her great-grandson", "bread", "whole street;"])
def test_answer_maps_to_its_tokens(pieces, answer):
    context = ("Café Müller opened in Zürich in 1875. Its founder, Anna Müller, baked bread "
               "for the whole street; today the café is run by her great-grandson.")
    example = QAExample("q", "t", context, "Who founded it?", [(answer, context.index(answer))])
    windows = make_windows([example], pieces, max_length=64, doc_stride=16)
    assert len(windows.sequences) == 1
    assert window_text(example, windows, 0, windows.labels[0]) == answer


def test_long_context_is_split_into_overlapping_windows(pieces):
    context = ("The city library holds 40,000 books. Children read in the garden room, and the "
               "reading hall closes at nine in the evening.")
    answer = "at nine in the evening"
    example = QAExample("q", "t", context, "When does the hall close?",
                        [(answer, context.index(answer))])
    windows = make_windows([example], pieces, max_length=20, doc_stride=4)
    question = 1 + 6 + 1                        # [CLS] when does the hall close ? [SEP]
    room = 20 - question - 1
    context_tokens = sum(o is not None for o in windows.offsets[0])
    assert context_tokens == room
    assert len(windows.sequences) > 2
    assert all(len(s) <= 20 for s in windows.sequences)
    for k, sequence in enumerate(windows.sequences):
        assert windows.segments[k] == [0] * question + [1] * (len(sequence) - question)
        assert sequence[:question] == windows.sequences[0][:question]
    inside = [k for k, label in enumerate(windows.labels) if label != [0, 0]]
    assert inside, "some window holds the whole answer"
    for k in inside:
        assert window_text(example, windows, k, windows.labels[k]) == answer
    # Windows start doc_stride context tokens apart.
    first = [next(o for o in offsets if o is not None) for offsets in windows.offsets]
    assert first[1][0] > first[0][0]


def test_doc_stride_larger_than_the_window_is_rejected(pieces):
    example = QAExample("q", "t", "Anna lives in Zürich.", "Where?", [])
    with pytest.raises(ValueError, match="--doc-stride 30 is larger than"):
        make_windows([example], pieces, max_length=16, doc_stride=30)


def test_best_spans_by_hand():
    offsets = [None, None, None, (0, 4), (5, 10), (11, 13), None]
    logits = np.array([[9, 9], [0, 0], [8, 8], [3, 0.5], [1, 2], [0, 1], [0, 0]], "float32")
    spans = best_spans(logits, offsets, n_best=20, max_answer_length=30)
    assert spans[0] == (5.0, 3, 4)              # question / [CLS] positions are never chosen
    assert (2.0, 4, 3) not in spans and all(i <= j for _, i, j in spans)
    assert best_spans(logits, offsets, max_answer_length=1)[0] == (3.5, 3, 3)
    assert best_spans(logits, offsets, n_best=1) == [(5.0, 3, 4)]
    assert best_spans(logits, offsets, n_best=1, max_answer_length=1) == []


def test_decode_picks_the_best_window_and_maps_back_to_text(pieces):
    context = "Anna lives in Zürich, near the lake."
    examples = [QAExample("q1", "t", context, "Where?", [])]
    windows = make_windows(examples, pieces, max_length=12, doc_stride=3, with_labels=False)
    assert len(windows.sequences) > 1
    target = context.index("Zürich")
    logits = []
    for k, offsets in enumerate(windows.offsets):
        row = np.zeros((len(offsets), 2), "float32")
        for t, o in enumerate(offsets):
            if o is not None and o[0] == target:
                row[t] = [5.0 + k, 0]            # the later window is more confident
            if o is not None and o[1] == target + len("Zürich"):
                row[t, 1] = 5.0
        logits.append(row)
    assert decode_answers(examples, windows, logits) == {"q1": "Zürich"}


def test_reads_squad_v2_and_labels_unanswerable_windows_null(tmp_path, pieces):
    path = squad_file(tmp_path, [
        {"id": "a", "question": "Where?", "is_impossible": False,
         "answers": [{"text": "Zürich", "answer_start": 14}]},
        {"id": "n", "question": "When?", "is_impossible": True, "answers": [],
         "plausible_answers": [{"text": "Anna", "answer_start": 0}]}],
        context="Anna lives in Zürich, near the lake.")
    answerable, unanswerable = read_squad(path)
    assert is_squad_v2([answerable, unanswerable]) and not is_squad_v2(
        read_squad(f"{TASK_DATA}/squad_train.json"))
    assert answerable.is_impossible is False and answerable.answers == [("Zürich", 14)]
    assert unanswerable.is_impossible is True and unanswerable.answers == []
    windows = make_windows([answerable, unanswerable], pieces, max_length=12, doc_stride=2)
    labels = {e: [l for l, k in zip(windows.labels, windows.example) if k == e] for e in (0, 1)}
    assert len(labels[1]) > 1 and all(l == [0, 0] for l in labels[1])
    assert any(l != [0, 0] for l in labels[0])


def test_null_margin_and_threshold(pieces):
    context = "Anna lives in Zürich, near the lake."
    examples = [QAExample("q", "t", context, "Where?", [])]
    windows = make_windows(examples, pieces, max_length=12, doc_stride=3, with_labels=False)
    target = context.index("Zürich")
    logits = []
    for k, offsets in enumerate(windows.offsets):
        row = np.zeros((len(offsets), 2), "float32")
        row[0] = [2.0 + k, 1.0]                  # null scores 3, 4, ...: the lowest counts
        for t, o in enumerate(offsets):
            if o is not None and o[0] == target:
                row[t, 0] = 2.0
            if o is not None and o[1] == target + len("Zürich"):
                row[t, 1] = 2.5                  # the span scores 4.5
        logits.append(row)
    texts, margins = span_answers(examples, windows, logits)
    assert texts == {"q": "Zürich"} and margins["q"] == pytest.approx(3.0 - 4.5)
    assert decode_answers(examples, windows, logits, null_threshold=-2.0) == {"q": ""}
    assert decode_answers(examples, windows, logits, null_threshold=-1.0) == {"q": "Zürich"}
    assert decode_answers(examples, windows, logits) == {"q": "Zürich"}  # SQuAD 1.1: a span
