"""The training loop every recipe shares: compile, resume, fit, score, write outputs.

>>> results = fine_tune(classifier, train_batches, args, loss=...,
...                     evaluate=lambda model: {"accuracy": ...}, monitor="val_accuracy")

`evaluate(model)` scores the validation set after every epoch from the
model's predictions on every example (padded to full batches, so nothing is
dropped on any number of devices); its numbers enter the logs prefixed `val_`.
Writes to `args.output_dir`: `checkpoints/` (per epoch, for resuming; the run's
settings are checked on resume), `history.json` (per epoch, and every step's loss and
learning rate under `steps`), `curves.png` and, with `--tensorboard`, `tensorboard/`
(per-step loss and learning rate, per-epoch validation scores). The model
ends with the weights of its best validation epoch.

Under a `keras.distribution` (see `klora.distribution`), each host feeds its
shard of every global batch, and only the primary process (process 0) writes
`history.json` and `curves.png`; every other process keeps its own resume
checkpoints in `checkpoints/process-N/`.
"""

import os
import shutil
import time

import keras

from klora.atomic import write_json
from klora.distribution import is_primary_process, process_index, shard_batches
from klora.loraplus import loraplus
from klora.speed.compile_cache import CompileTime
from klora.training.arguments import run_settings
from klora.training.checkpoint import ResumableTraining
from klora.training.evaluation import EpochEvaluation
from klora.training.optimizer import adamw_with_warmup
from klora.training.plot import plot_history
from klora.training.step_history import StepHistory, StepLoss


def _sharded_training_batches(batches):
    sharded = shard_batches(batches)
    dropped = batches.examples_per_epoch() - sharded.examples_per_epoch()
    if dropped:
        print(f"Training uses full global batches only: {dropped} of "
              f"{batches.examples_per_epoch()} examples (a different few each epoch) are "
              "left out of every epoch. Validation scores every example.")
    return sharded


def fine_tune(model, train_batches, args, loss, evaluate, metrics=(), monitor="val_accuracy",
              mode="max", callbacks=(), title=None):
    """Trains `model` with resumable checkpoints and early stopping; returns final results.

    Args:
        model: The model to train (adapted with `klora.apply`, or not).
        train_batches: A `klora.data.TokenBatches` of the training set.
        args: The recipe's flags (`add_training_arguments`).
        loss: The training loss.
        evaluate: `evaluate(model) -> {name: value}` on the validation set.
        metrics: Keras metrics reported on the training batches.
        monitor, mode: The validation score that picks the best epoch.
        callbacks: More Keras callbacks; they run after the validation scores are in
            the logs and before the epoch's checkpoint.
        title: Title of `curves.png`.
    """
    if getattr(args, "distribution", "none") != "none" and keras.distribution.distribution() is None:
        raise ValueError(f"--distribution {args.distribution} was not configured: call "
                         "klora.distribution.configure_from_arguments(args) before building "
                         "the model.")
    if args.batching == "random":
        train_batches = train_batches.random_lengths()
    optimizer = adamw_with_warmup(args.learning_rate, len(train_batches) * args.epochs,
                                  weight_decay=args.weight_decay, schedule=args.schedule,
                                  clip_norm=args.clip_norm or None)
    if args.loraplus_ratio:
        optimizer = loraplus(optimizer, args.loraplus_ratio)
    model.compile(optimizer=optimizer, loss=loss, metrics=[*metrics, StepLoss(loss)])
    train_batches = _sharded_training_batches(train_batches)
    checkpoints = os.path.join(args.output_dir, "checkpoints")
    if args.restart and is_primary_process():
        shutil.rmtree(checkpoints, ignore_errors=True)
    if not is_primary_process():
        checkpoints = os.path.join(checkpoints, f"process-{process_index()}")
    os.makedirs(args.output_dir, exist_ok=True)
    training = ResumableTraining(checkpoints, monitor=monitor, mode=mode,
                                 patience=args.patience, settings=run_settings(args))
    done = training.resume(model)
    if done:
        print(f"Resuming after epoch {done} from {checkpoints}")
    start = time.time()
    compiling = CompileTime()
    if done < args.epochs and not training.stopped_early():
        tensorboard = (os.path.join(args.output_dir, "tensorboard")
                       if args.tensorboard and is_primary_process() else None)
        with compiling:
            model.fit(train_batches.dataset(shuffle=True, seed=args.seed, first_epoch=done),
                      epochs=args.epochs, initial_epoch=done,
                      callbacks=[EpochEvaluation(evaluate),
                                 StepHistory(training.history, tensorboard), *callbacks, training],
                      verbose=2 if os.environ.get("CI") else 1)
    best = training.restore_best()
    results = {"best_epoch": None if best is None else best + 1,
               "epochs_run": len(training.history.get("loss", [])),
               "train_seconds_this_run": round(time.time() - start, 1),
               "compile_seconds_this_run": round(compiling.seconds, 1),
               "backend": keras.backend.backend(),
               **{k: v[best] for k, v in training.history.items()
                  if best is not None and k != "steps"}}
    if is_primary_process():
        write_json(os.path.join(args.output_dir, "history.json"), training.history)
        plot_history(training.history, os.path.join(args.output_dir, "curves.png"), title=title)
    return results
