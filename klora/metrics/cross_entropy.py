"""Softmax cross-entropy from logits in NumPy: a validation loss computed from the same
predictions as the validation scores (every example, whatever the batching).

>>> cross_entropy(np.array([[2.0, 0.0]]), np.array([0]))
0.1269...
"""

import numpy as np


def cross_entropy(logits, labels):
    """Mean cross-entropy of the rows of `logits` `(n, classes)` against integer `labels`."""
    logits = np.asarray(logits, "float64")
    labels = np.asarray(labels, "int64")
    if len(labels) == 0:
        return 0.0
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probabilities[np.arange(len(labels)), labels].mean())


def span_cross_entropy(window_logits, spans):
    """The span loss (mean of start and end cross-entropies over the positions) of
    each window's `(length, 2)` logits against its `[start, end]` token positions."""
    starts = [cross_entropy(l[None, :, 0], [s]) for l, (s, _) in zip(window_logits, spans)]
    ends = [cross_entropy(l[None, :, 1], [e]) for l, (_, e) in zip(window_logits, spans)]
    return float(np.mean(starts + ends)) if spans else 0.0
