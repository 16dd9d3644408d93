"""SQuAD exact match and F1 with the official answer normalization.

Answers are compared after lower-casing and removing punctuation, the
articles a/an/the and extra whitespace; each prediction scores the maximum
over its reference answers (as the official `evaluate-v1.1.py`).

>>> squad_scores({"q1": "the Eiffel Tower"}, {"q1": ["Eiffel Tower", "tower"]})
{'exact_match': 100.0, 'f1': 100.0}
"""

import collections
import re
import string

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
