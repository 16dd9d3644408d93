"""SQuAD exact match and F1 with the official answer normalization.

Answers are compared after lower-casing and removing punctuation, the
articles a/an/the and extra whitespace; each prediction scores the maximum
over its reference answers (as the official `evaluate-v1.1.py`).

>>> squad_scores({"q1": "the Eiffel Tower"}, {"q1": ["Eiffel Tower", "tower"]})
{'exact_match': 100.0, 'f1': 100.0}

SQuAD 2.0 (`squad_v2_scores`, as the official `evaluate-v2.0.py`): an unanswerable
question (no reference answers) is right when the prediction is empty, and the scores
come overall and split into `HasAns_*` and `NoAns_*`. `best_null_threshold` picks the
null-margin threshold that maximizes F1, as the official script's `best_f1_thresh`.
"""

import collections
import re
import string

import numpy as np

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text):
    """Lower-case, drop punctuation and articles, collapse whitespace."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction, reference):
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction, reference):
    """Token-overlap F1 of two answers after normalization."""
    predicted, true = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((collections.Counter(predicted) & collections.Counter(true)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(true)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions, references):
    """`{"exact_match", "f1"}` in percent over `references` (`{id: [answers]}`).

    A question missing from `predictions` scores 0.
    """
    if not references:
        raise ValueError("No reference answers to score against.")
    em = f1 = 0.0
    for qid, answers in references.items():
        prediction = predictions.get(qid, "")
        em += max(exact_match(prediction, a) for a in answers)
        f1 += max(f1_score(prediction, a) for a in answers)
    return {"exact_match": 100.0 * em / len(references), "f1": 100.0 * f1 / len(references)}


def _v2_pair(prediction, answers):
    """`(exact, f1)` of one SQuAD 2.0 question: an empty reference list means no answer."""
    golds = [a for a in answers if normalize_answer(a)] or [""]
    predicted = normalize_answer(prediction).split()
    exact = max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
    f1 = max(f1_score(prediction, g) if predicted and normalize_answer(g)
             else float(predicted == normalize_answer(g).split()) for g in golds)
    return exact, f1


def squad_v2_scores(predictions, references):
    """The official SQuAD 2.0 scores in percent: `exact_match`, `f1`, and both for the
    `HasAns` and `NoAns` questions, with their counts (`references`: `{id: [answers]}`,
    `[]` for an unanswerable question; a missing prediction is the empty answer)."""
    if not references:
        raise ValueError("No reference answers to score against.")
    pairs = {q: _v2_pair(predictions.get(q, ""), answers) for q, answers in references.items()}
    scores = {}
    for prefix, ids in (("", list(references)),
                        ("HasAns_", [q for q, a in references.items() if a]),
                        ("NoAns_", [q for q, a in references.items() if not a])):
        if ids or not prefix:
            scores[f"{prefix}exact_match"] = 100.0 * sum(pairs[q][0] for q in ids) / len(ids)
            scores[f"{prefix}f1"] = 100.0 * sum(pairs[q][1] for q in ids) / len(ids)
        scores[f"{prefix}total" if prefix else "total"] = len(ids)
    return scores


def best_null_threshold(texts, margins, references):
    """`(threshold, f1)`: the null-margin threshold with the best SQuAD 2.0 F1.

    `texts` are the best non-empty spans, `margins` their null margins (answer empty
    where the margin is above the threshold). Every threshold between consecutive
    margins is tried, from "always empty" up.
    """
    f1 = {q: _v2_pair(texts.get(q, ""), answers)[1] for q, answers in references.items()}
    order = sorted((m, q) for q, m in margins.items() if q in references and np.isfinite(m))
    score = best = float(sum(1 for a in references.values() if not a))
    threshold = (order[0][0] - 1.0) if order else 0.0
    for margin, q in order:
        score += f1[q] if references[q] else (-1.0 if texts.get(q) else 0.0)
        if score > best:
            best, threshold = score, margin
    return threshold, 100.0 * best / len(references)
