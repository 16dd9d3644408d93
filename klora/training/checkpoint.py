"""Resumable training: per-epoch checkpoints, history and early stopping."""

import json
import os
import zipfile

import keras
import numpy as np

from klora.atomic import atomic_path, write_json

START_AFRESH = "pass --restart (or delete the checkpoints folder) to train from the start"


def _values(variables):
    return {v.path: keras.ops.convert_to_numpy(v) for v in variables}


def _optimizer_key(path):
    # An optimizer's variable paths start with its auto-numbered name (adam_w,
    # adam_w_1, ...), which differs between two trainings in one process.
    return path.split("/", 1)[-1]


def _assign(variables, values, source, key=lambda v: v.path):
    missing = [v.path for v in variables if key(v) not in values]
    if missing:
        raise ValueError(f"Checkpoint {source} does not match this model (missing "
                         f"{missing[:3]}): use another --output-dir, or {START_AFRESH}.")
    for v in variables:
        v.assign(values[key(v)])


def _changes(saved, settings):
    keys = sorted(set(saved) | set(settings))
    return [f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in keys
            if saved.get(k) != settings.get(k)]


class ResumableTraining(keras.callbacks.Callback):
    """Checkpoints trainable weights and optimizer state after every epoch.

    Rerunning the same training resumes after the last finished epoch:
    call `resume()` before `fit` and pass its result as `initial_epoch`. The
    callback also stops training when `monitor` has not improved for
    `patience` epochs, and `restore_best()` loads the best epoch's weights.

    `settings` (a JSON dict: learning rate, epochs, targets, ...) is stored in
    every checkpoint; resuming with other settings raises a `ValueError`
    listing what changed, as does a truncated or corrupt checkpoint.

    >>> training = ResumableTraining("out/checkpoints", monitor="val_accuracy")
    >>> start = training.resume(model)
    >>> model.fit(data, epochs=5, initial_epoch=start, callbacks=[training])
    >>> training.restore_best()
    """

    def __init__(self, directory, monitor="val_accuracy", mode="max", patience=2,
                 settings=None):
        super().__init__()
        self.directory = os.fspath(directory)
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.settings = settings
        self.history = {}

    def _file(self, name):
        return os.path.join(self.directory, name)

    def _save(self, name, model):
        # One file holds weights, optimizer state and history, so they never disagree.
        with atomic_path(self._file(name)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **_values(model.trainable_variables),
                         **{f"optimizer:{_optimizer_key(k)}": v
                            for k, v in _values(model.optimizer.variables).items()},
                         **{"history:json": np.array(json.dumps(self.history)),
                            "settings:json": np.array(json.dumps(self.settings))})

    def _read(self, name):
        """Every array of checkpoint `name`; a `ValueError` if it is unreadable."""
        filename = self._file(name)
        try:
            with np.load(filename) as data:
                values = {k: data[k] for k in data.files}
            history = json.loads(str(values["history:json"]))
            settings = json.loads(str(values.get("settings:json", "null")))
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"Checkpoint {filename} is unreadable (truncated or corrupt: "
                             f"{type(e).__name__}: {e}); {START_AFRESH}.") from None
        if not isinstance(history, dict):
            raise ValueError(f"Checkpoint {filename} has no training history; {START_AFRESH}.")
        return values, history, settings

    def _load(self, values, source, model, optimizer=True):
        _assign(model.trainable_variables, values, source)
        if optimizer:
            model.optimizer.build(model.trainable_variables)
            saved = {_optimizer_key(k.removeprefix("optimizer:")): v for k, v in values.items()
                     if k.startswith("optimizer:")}
            _assign(model.optimizer.variables, saved, source,
                    key=lambda v: _optimizer_key(v.path))

    def resume(self, model):
        """Loads the last checkpoint into `model` (compiled); returns the epochs done."""
        self.set_model(model)
        if not os.path.exists(self._file("last.npz")):
            return 0
        values, history, settings = self._read("last.npz")
        if settings is not None and self.settings is not None:
            changed = _changes(settings, self.settings)
            if changed:
                raise ValueError(
                    f"The checkpoint in {self.directory} was written by a run with other "
                    f"settings ({'; '.join(changed)}). Rerun with the original flags to "
                    f"resume, or {START_AFRESH}.")
        self.history = history
        self._load(values, self._file("last.npz"), model)
        return len(self.history.get(self.monitor, []))

    def _best_epoch(self):
        scores = self.history.get(self.monitor, [])
        if not scores:
            return None
        return int(np.argmax(scores) if self.mode == "max" else np.argmin(scores))

    def stopped_early(self):
        """Whether `monitor` has not improved for `patience` epochs."""
        best = self._best_epoch()
        return best is not None and len(self.history[self.monitor]) - 1 - best >= self.patience

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            if key != "step_loss":  # per-step values live in history["steps"]
                self.history.setdefault(key, []).append(float(value))
        if self.monitor not in self.history:
            raise ValueError(f"Metric '{self.monitor}' not in the logs {sorted(logs or {})}.")
        self._save("last.npz", self.model)
        write_json(self._file("history.json"), self.history)
        if self._best_epoch() == len(self.history[self.monitor]) - 1:
            self._save("best.npz", self.model)
        if self.stopped_early():
            print(f"\nEarly stopping: {self.monitor} has not improved for {self.patience} epochs.")
            self.model.stop_training = True

    def restore_best(self):
        """Loads the weights of the epoch with the best `monitor` value."""
        if os.path.exists(self._file("best.npz")):
            values, _, _ = self._read("best.npz")
            self._load(values, self._file("best.npz"), self.model, optimizer=False)
        return self._best_epoch()
