"""SQuAD-style extractive QA data: reading, windowing and span decoding.

Each question is packed with its context as `[CLS] question [SEP] window
[SEP]`. A context longer than the room left after the question is cut into
overlapping windows whose starts are `doc_stride` sub-tokens apart. Answer
character spans map to token spans through each sub-token's character offsets
(`WordPieces.offsets`); a window that does not contain the whole answer is
labelled `[0, 0]` (the `[CLS]` token: "not in this window").

SQuAD 2.0 data (questions with an `is_impossible` field) may hold unanswerable
questions: every window of one is labelled `[0, 0]`. Decoding then weighs each
question's best span against its null score (the `[CLS]` start + end logits, lowest
over its windows): `null_margin = null score - best span score`, and the answer is
empty when the margin is above a threshold tuned on validation data
(`klora.metrics.best_null_threshold`).

>>> examples = read_squad("dev-v1.1.json")
>>> windows = make_windows(examples, WordPieces(tokenizer), max_length=384, doc_stride=128)
>>> answers = decode_answers(examples, windows, logits, n_best=20, max_answer_length=30)
"""

import dataclasses
import json
import os

import numpy as np

from klora.data.labelled_text import decode_file
from klora.data.tfds_text import prepared_builder
from klora.data.word_alignment import split_words


@dataclasses.dataclass
class QAExample:
    id: str
    title: str
    context: str
    question: str
    answers: list  # [(text, answer_start)]; empty for an unanswerable question
    is_impossible: object = None  # SQuAD 2.0's flag; None for SQuAD 1.1 data


def is_squad_v2(examples):
    """Whether `examples` come from SQuAD 2.0-style data (questions carry `is_impossible`)."""
    return any(e.is_impossible is not None for e in examples)


def _squad_articles(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Data file not found: {path}")
    try:
        data = json.loads(decode_file(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: expected SQuAD JSON: {{'version': ..., 'data': [articles]}}.")
    return path, data["data"]


def read_squad(path):
    """Returns the `QAExample`s of a SQuAD v1.1 or v2.0 JSON file.

    Raises a `ValueError` naming the file and question id for a missing field,
    an answer whose text does not occur at its `answer_start`, a question without
    answers in SQuAD 1.1 data, and a v2.0 question whose answers contradict its
    `is_impossible`.
    """
    path, articles = _squad_articles(path)
    examples = []
    for a, article in enumerate(articles):
        title = str(article.get("title", f"article {a}"))
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            if not isinstance(context, str) or not context.strip():
                raise ValueError(f"{path}: article {title!r} has a paragraph without a context.")
            for qa in paragraph.get("qas", []):
                qid, question = qa.get("id"), qa.get("question")
                where = f"{path}: question {qid!r}"
                if qid is None or not isinstance(question, str) or not question.strip():
                    raise ValueError(f"{where} (article {title!r}) lacks an 'id' or a 'question'.")
                answers = qa.get("answers") or []
                impossible = qa.get("is_impossible")
                if impossible is not None and not isinstance(impossible, bool):
                    raise ValueError(f"{where}: 'is_impossible' must be true or false "
                                     f"(got {impossible!r}).")
                if impossible and answers:
                    raise ValueError(f"{where} is marked unanswerable (is_impossible) but has "
                                     "answers; SQuAD 2.0 keeps those in 'plausible_answers'.")
                if not impossible and not answers:
                    raise ValueError(
                        f"{where} has no answer. SQuAD 1.1 data needs answers for every "
                        "question; in SQuAD 2.0 data, mark unanswerable questions with "
                        '"is_impossible": true.')
                pairs = []
                for answer in answers:
                    text, start = answer.get("text"), answer.get("answer_start")
                    if not isinstance(text, str) or not text or not isinstance(start, int):
                        raise ValueError(f"{where}: answer {answer!r} needs 'text' and an "
                                         "integer 'answer_start'.")
                    if context[start:start + len(text)] != text:
                        raise ValueError(
                            f"{where}: answer {text!r} does not occur at answer_start {start} "
                            f"(the context has {context[start:start + len(text)]!r} there).")
                    pairs.append((text, start))
                examples.append(QAExample(str(qid), title, context, question.strip(), pairs,
                                          impossible))
    if not examples:
        raise ValueError(f"{path}: no questions.")
    return examples


def split_by_article(examples, fraction, seed=0):
    """`(train, validation)` with a seeded `fraction` of the articles (by title) held out."""
    titles = sorted({e.title for e in examples})
    if len(titles) < 2:
        raise ValueError(f"Cannot hold out articles for validation: the data has {len(titles)} "
                         "article; pass --validation-data.")
    order = np.random.default_rng(seed).permutation(len(titles))
    held = {titles[i] for i in order[:min(len(titles) - 1, max(1, round(len(titles) * fraction)))]}
    return ([e for e in examples if e.title not in held], [e for e in examples if e.title in held])


def load_tfds_squad(name, split, data_dir=None):
    """`QAExample`s of a tfds SQuAD split (`squad`, `squad/v1.1`, `squad/v2.0`)."""
    builder = prepared_builder(name, split, data_dir,
                               "a local SQuAD JSON file (--data train.json)")
    import tensorflow_datasets as tfds

    examples = []
    for x in tfds.as_numpy(builder.as_dataset(split=split)):
        texts = [t.decode("utf-8") for t in x["answers"]["text"]]
        answers = list(zip(texts, [int(s) for s in x["answers"]["answer_start"]]))
        impossible = bool(x["is_impossible"]) if "is_impossible" in x else None
        examples.append(QAExample(x["id"].decode(), x["title"].decode(), x["context"].decode(),
                                  x["question"].decode(), [] if impossible else answers,
                                  impossible))
    return examples


@dataclasses.dataclass
class QAWindows:
    """Packed sequences of question + context windows and their token -> character map.

    `offsets[k][t]` is the `(start, end)` character span in the context of
    token `t` of window `k`, or None for question and special tokens.
    `labels[k]` is `[start, end]` (token positions, `[0, 0]` when the answer
    is not inside the window; None without answers).
    """

    sequences: list
    segments: list
    offsets: list
    example: list
    labels: list


def _context_tokens(context, pieces):
    words = split_words(context)
    ids, spans = [], []
    for (word, start, _), word_ids in zip(words, pieces.ids([w for w, _, _ in words])):
        ids.extend(word_ids)
        spans.extend((start + s, start + e) for s, e in pieces.offsets(word, word_ids))
    return ids, spans


def _token_span(spans, start_char, end_char):
    """First and last context token overlapping the character range `[start, end)`."""
    first = next((i for i, (s, e) in enumerate(spans) if e > start_char), None)
    if first is None:
        return None
    last = max(i for i, (s, e) in enumerate(spans) if s < end_char)
    return first, max(first, last)


def make_windows(examples, pieces, max_length, doc_stride, max_question_length=64,
                 with_labels=True):
    """Packs every example into one or more windows (see the module docstring).

    Questions longer than `max_question_length` sub-tokens are truncated.
    """
    tokenizer = pieces.tokenizer
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    windows = QAWindows([], [], [], [], [])
    cache = {}
    for e, example in enumerate(examples):
        question = [t for ids in pieces.ids([w for w, _, _ in split_words(example.question)])
                    for t in ids][:max_question_length]
        if example.context not in cache:
            cache = {example.context: _context_tokens(example.context, pieces)}
        ids, spans = cache[example.context]
        room = max_length - len(question) - 3
        if room < 1:
            raise ValueError(f"--max-length {max_length} leaves no room for the context after "
                             f"a {len(question)}-token question.")
        if doc_stride > room:
            raise ValueError(f"--doc-stride {doc_stride} is larger than the {room} context "
                             f"tokens a window holds at --max-length {max_length}: windows "
                             "would skip text. Lower --doc-stride.")
        answer = None
        if with_labels and example.answers and ids:
            text, start = example.answers[0]
            answer = _token_span(spans, start, start + len(text))
        start = 0
        while True:
            end = min(start + room, len(ids))
            head = [cls_id] + question + [sep_id]
            windows.sequences.append(head + ids[start:end] + [sep_id])
            windows.segments.append([0] * len(head) + [1] * (end - start + 1))
            windows.offsets.append([None] * len(head) + spans[start:end] + [None])
            windows.example.append(e)
            if answer is None:
                windows.labels.append(None if not with_labels else [0, 0])
            elif start <= answer[0] and answer[1] < end:
                windows.labels.append([answer[0] - start + len(head),
                                       answer[1] - start + len(head)])
            else:
                windows.labels.append([0, 0])
            if end == len(ids):
                break
            start += doc_stride
    return windows


def best_spans(logits, offsets, n_best=20, max_answer_length=30):
    """Top `(score, first, last)` token spans of one window, context tokens only.

    `logits` is `(sequence, 2)`: start and end logits. Considers the `n_best`
    best starts and ends; a span needs `first <= last < first + max_answer_length`.
    """
    logits = np.asarray(logits, "float32")
    context = np.array([o is not None for o in offsets[:len(logits)]])
    if not context.any():
        return []
    start, end = np.where(context, logits[:, 0], -np.inf), np.where(context, logits[:, 1], -np.inf)
    starts = [i for i in np.argsort(-start)[:n_best] if context[i]]
    ends = [j for j in np.argsort(-end)[:n_best] if context[j]]
    spans = [(float(start[i] + end[j]), int(i), int(j)) for i in starts for j in ends
             if i <= j < i + max_answer_length]
    return sorted(spans, reverse=True)


def span_answers(examples, windows, logits, n_best=20, max_answer_length=30):
    """`({id: best span text}, {id: null margin})` over each example's windows.

    The null margin is the lowest `[CLS]` start + end score over the windows minus
    the best span's score (infinite when no window has a span).
    """
    best, null = {}, {}
    for k, window_logits in enumerate(logits):
        e = windows.example[k]
        window_logits = np.asarray(window_logits, "float32")
        null[e] = min(null.get(e, np.inf), float(window_logits[0, 0] + window_logits[0, 1]))
        spans = best_spans(window_logits, windows.offsets[k], n_best, max_answer_length)
        if spans and (e not in best or spans[0][0] > best[e][0]):
            score, i, j = spans[0]
            best[e] = (score, windows.offsets[k][i][0], windows.offsets[k][j][1])
    texts, margins = {}, {}
    for e, example in enumerate(examples):
        score, start, end = best.get(e, (-np.inf, 0, 0))
        texts[example.id] = example.context[start:end]
        margins[example.id] = float(null.get(e, np.inf) - score)
    return texts, margins


def decode_answers(examples, windows, logits, n_best=20, max_answer_length=30,
                   null_threshold=None):
    """The answer of each example over all its windows: `{id: text}`.

    With `null_threshold` (SQuAD 2.0), the answer is empty where the null margin
    exceeds it; without, it is always the best span (SQuAD 1.1).
    """
    texts, margins = span_answers(examples, windows, logits, n_best, max_answer_length)
    if null_threshold is None:
        return texts
    return {q: "" if margins[q] > null_threshold else text for q, text in texts.items()}


def load_qa_splits(data, validation_data=None, validation_fraction=0.1, seed=0):
    """`(train, validation)` examples from SQuAD JSON files or a tfds name.

    Validation comes from `validation_data` (a file, or a tfds split name),
    else the tfds 'validation' split, else a seeded held-out fraction of the
    articles (so no context is shared between the two).
    """
    if os.path.exists(data) or data.lower().endswith(".json"):
        train = read_squad(data)
        if validation_data:
            return train, read_squad(validation_data)
        return split_by_article(train, validation_fraction, seed)
    return (load_tfds_squad(data, "train"),
            load_tfds_squad(data, validation_data or "validation"))


def load_qa_set(data, split="validation"):
    """`QAExample`s of a SQuAD JSON file or of a tfds split (for evaluation)."""
    if os.path.exists(data) or data.lower().endswith(".json"):
        return read_squad(data)
    return load_tfds_squad(data, split)
