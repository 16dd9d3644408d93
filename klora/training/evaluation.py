"""Task metrics computed on the validation set after every epoch.

>>> scores = EpochEvaluation(lambda model: {"f1": compute_f1(model)})
>>> fine_tune(model, train, val, args, loss=..., metrics=[], monitor="val_f1",
...           callbacks=[scores])
"""

import keras


class EpochEvaluation(keras.callbacks.Callback):
    """Adds `evaluate(model)`'s scores to each epoch's logs, prefixed `val_`.

    Place it before checkpointing callbacks (`fine_tune` does), so they see
    the scores (for early stopping, the best epoch and `history.json`).
    Non-numeric values (e.g. per-type breakdowns) are kept in `self.details`.
    """

    def __init__(self, evaluate, prefix="val_", verbose=True):
        super().__init__()
        self.evaluate, self.prefix, self.verbose = evaluate, prefix, verbose
        self.details = []

    def on_epoch_end(self, epoch, logs=None):
        scores = self.evaluate(self.model)
        self.details.append(scores)
        numbers = {f"{self.prefix}{k}": float(v) for k, v in scores.items()
                   if isinstance(v, (int, float))}
        if logs is not None:
            logs.update(numbers)
        if self.verbose:
            print(f"\nepoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in numbers.items()))
