"""Entity-level precision, recall and F1, CoNLL style (as `conlleval` and `seqeval`).

An entity is a maximal chunk of tags of one type: it starts at `B-`/`S-`, or
at an `I-`/`E-` that follows a tag of another type (or `O`, or an `E-`/`S-`),
and ends where the next tag does not continue it. A predicted entity counts
only when its type and its exact word span match a reference entity.

>>> entity_scores([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]])["f1"]
0.0
"""


def _split(tag):
    if tag == "O":
        return "O", ""
    return tag[0], tag[2:]


def _ends(prev_tag, tag, prev_type, type_):
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag != "O" and prev_type != type_))


def _starts(prev_tag, tag, prev_type, type_):
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag != "O" and prev_type != type_))


def entities(tags):
    """`[(type, first, last)]` word index ranges (inclusive) of the entities in `tags`."""
    found, prev_tag, prev_type, begin = [], "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        position, type_ = _split(tag)
        if _ends(prev_tag, position, prev_type, type_):
            found.append((prev_type, begin, i - 1))
        if _starts(prev_tag, position, prev_type, type_):
            begin = i
        prev_tag, prev_type = position, type_
    return found


def _prf(correct, predicted, true):
    precision = correct / predicted if predicted else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_scores(true_tags, predicted_tags):
    """Micro-averaged and per-type entity scores of tag sequences (fractions in [0, 1]).

    Returns `{"precision", "recall", "f1", "per_type": {type: {"precision",
    "recall", "f1", "support"}}}`; support is the number of reference entities.
    """
    if len(true_tags) != len(predicted_tags):
        raise ValueError(f"{len(true_tags)} reference and {len(predicted_tags)} predicted sequences.")
    true, predicted = set(), set()
    for s, (t, p) in enumerate(zip(true_tags, predicted_tags)):
        if len(t) != len(p):
            raise ValueError(f"Sequence {s}: {len(t)} reference tags but {len(p)} predicted.")
        true.update((s, *e) for e in entities(t))
        predicted.update((s, *e) for e in entities(p))
    correct = true & predicted
    per_type = {}
    for type_ in sorted({e[1] for e in true | predicted}):
        count = lambda entries: sum(1 for e in entries if e[1] == type_)  # noqa: E731
        p, r, f = _prf(count(correct), count(predicted), count(true))
        per_type[type_] = {"precision": p, "recall": r, "f1": f, "support": count(true)}
    p, r, f = _prf(len(correct), len(predicted), len(true))
    return {"precision": p, "recall": r, "f1": f, "per_type": per_type}
