"""Sentence-classification scores from logits: accuracy, cross-entropy, per-class
precision / recall / F1, macro-F1 and the confusion matrix.

>>> scores = classification_scores(logits, labels, ["negative", "positive"])
>>> scores["accuracy"], scores["macro_f1"], scores["per_class"]["positive"]["f1"]
"""

import numpy as np

from klora.metrics.cross_entropy import cross_entropy


def _ratio(numerator, denominator):
    return float(numerator / denominator) if denominator else 0.0


def classification_scores(logits, labels, label_names):
    """Scores of `logits` `(n, classes)` against integer `labels` `(n,)`.

    Returns `accuracy`, `loss` (mean cross-entropy of the softmax), `macro_f1`,
    `per_class` (`{name: {precision, recall, f1, support}}`) and `confusion`
    (`confusion[i][j]`: examples of class i predicted as class j).
    """
    logits = np.asarray(logits, "float64")
    labels = np.asarray(labels, "int64")
    classes = len(label_names)
    if logits.ndim != 2 or logits.shape != (len(labels), classes):
        raise ValueError(f"Expected logits of shape ({len(labels)}, {classes}); received "
                         f"{logits.shape}.")
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((classes, classes), "int64")
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for i, name in enumerate(label_names):
        tp = confusion[i, i]
        precision = _ratio(tp, confusion[:, i].sum())
        recall = _ratio(tp, confusion[i].sum())
        per_class[str(name)] = {
            "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "support": int(confusion[i].sum())}
    return {
        "accuracy": _ratio(np.trace(confusion), len(labels)),
        "loss": cross_entropy(logits, labels),
        "macro_f1": float(np.mean([s["f1"] for s in per_class.values()])),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }
