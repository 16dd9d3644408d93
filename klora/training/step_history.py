"""The training loss of every step, and where it goes: `curves.png`, TensorBoard, checkpoints.

Keras logs, after each batch, the epoch's running mean of the loss. `StepLoss` is a
metric whose value is the last batch's loss itself; `StepHistory` records it and
the learning rate every step into the training history (which checkpoints keep, so
a resumed run continues the same curve), and writes them, with each epoch's
validation scores, to TensorBoard when asked.

>>> model.compile(optimizer, loss=loss, metrics=[StepLoss(loss)])
>>> model.fit(data, callbacks=[StepHistory(history, tensorboard_dir="runs/x/tensorboard")])
"""

import os

import keras


class StepLoss(keras.metrics.Metric):
    """The loss of the last batch (not a running mean): `loss(y_true, y_pred)`."""

    def __init__(self, loss, name="step_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.loss = loss
        self.value = self.add_variable(shape=(), initializer="zeros", name="value")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.value.assign(keras.ops.cast(self.loss(y_true, y_pred, sample_weight), "float32"))

    def result(self):
        return keras.ops.convert_to_tensor(self.value)

    def reset_state(self):
        self.value.assign(0.0)


def _learning_rate(optimizer):
    rate = optimizer.learning_rate
    return float(keras.ops.convert_to_numpy(rate))


class StepHistory(keras.callbacks.Callback):
    """Appends each step's loss and learning rate, and the step each epoch ends at, to
    `history["steps"]` (`history` is e.g. `ResumableTraining.history`); with
    `tensorboard_dir`, writes those per step and the epoch logs per epoch there."""

    def __init__(self, history, tensorboard_dir=None):
        super().__init__()
        self.history, self.tensorboard_dir = history, tensorboard_dir
        self.writer = None

    @property
    def steps(self):
        return self.history.setdefault("steps", {"loss": [], "learning_rate": [],
                                                 "epoch_end": []})

    def _write(self, values, step):
        if self.tensorboard_dir is None:
            return
        import tensorflow as tf

        if self.writer is None:
            os.makedirs(self.tensorboard_dir, exist_ok=True)
            self.writer = tf.summary.create_file_writer(self.tensorboard_dir)
        with self.writer.as_default():
            for name, value in values.items():
                tf.summary.scalar(name, value, step=step)
        self.writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        if not logs or "step_loss" not in logs:
            return
        loss, rate = float(logs["step_loss"]), _learning_rate(self.model.optimizer)
        self.steps["loss"].append(loss)
        self.steps["learning_rate"].append(rate)
        self._write({"train/loss": loss, "train/learning_rate": rate}, len(self.steps["loss"]))

    def on_epoch_end(self, epoch, logs=None):
        done = len(self.steps["loss"])
        self.steps["epoch_end"].append(done)
        self._write({f"epoch/{k}": float(v) for k, v in (logs or {}).items()
                     if isinstance(v, (int, float)) and k != "step_loss"}, done)

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
