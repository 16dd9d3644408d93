"""The training loop every recipe shares: compile, resume, fit, write outputs.

>>> metrics = fine_tune(classifier, train_batches, val_batches, args,
...                     loss=..., metrics=[...], monitor="val_accuracy")

Writes to `args.output_dir`: `checkpoints/` (per epoch, for resuming),
`history.json`, `metrics.json` and `curves.png`. The model ends with the
weights of its best validation epoch.

Under a `keras.distribution` (see `klora.distribution`), each host feeds its
shard of every global batch, and only the primary process (process 0) writes
`history.json` and `curves.png`; every other process keeps its own resume
checkpoints in `checkpoints/process-N/`.
"""

import os
import time

import keras

from klora.atomic import write_json
from klora.distribution import is_primary_process, process_index, shard_batches
from klora.training.checkpoint import ResumableTraining
from klora.training.plot import plot_history


def adamw_with_warmup(learning_rate, total_steps, warmup_fraction=0.1, weight_decay=0.01):
    """AdamW with linear warm-up then cosine decay to zero over `total_steps`."""
    warmup = int(total_steps * warmup_fraction)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(total_steps - warmup, 1),
        warmup_target=learning_rate, warmup_steps=warmup)
    return keras.optimizers.AdamW(schedule, weight_decay=weight_decay)


def fine_tune(model, train_batches, val_batches, args, loss, metrics, monitor="val_accuracy",
              mode="max", callbacks=(), title=None):
    """Trains `model` with resumable checkpoints and early stopping; returns final metrics.

    `train_batches` / `val_batches` are `TokenBatches`-like objects with
    `dataset(...)` and `len()`. `callbacks` run before checkpointing each epoch
    (an evaluation callback adding `val_f1` to the logs, say).
    """
    if getattr(args, "distribution", "none") != "none" and keras.distribution.distribution() is None:
        raise ValueError(f"--distribution {args.distribution} was not configured: call "
                         "klora.distribution.configure_from_arguments(args) before building "
                         "the model.")
    model.compile(optimizer=adamw_with_warmup(args.learning_rate, len(train_batches) * args.epochs),
                  loss=loss, metrics=list(metrics))
    train_batches, val_batches = shard_batches(train_batches), shard_batches(val_batches)
    os.makedirs(args.output_dir, exist_ok=True)
    checkpoints = os.path.join(args.output_dir, "checkpoints")
    if not is_primary_process():
        checkpoints = os.path.join(checkpoints, f"process-{process_index()}")
    training = ResumableTraining(checkpoints,
                                 monitor=monitor, mode=mode, patience=args.patience)
    done = training.resume(model)
    if done:
        print(f"Resuming after epoch {done} from {args.output_dir}/checkpoints")
    start = time.time()
    if done < args.epochs and not training.stopped_early():
        model.fit(train_batches.dataset(shuffle=True, seed=args.seed, first_epoch=done),
                  validation_data=val_batches.dataset(), epochs=args.epochs, initial_epoch=done,
                  callbacks=[*callbacks, training], verbose=2 if os.environ.get("CI") else 1)
    best = training.restore_best()
    results = {"best_epoch": None if best is None else best + 1,
               "epochs_run": len(training.history.get("loss", [])),
               "train_seconds_this_run": round(time.time() - start, 1),
               **{k: v[best] for k, v in training.history.items() if best is not None}}
    if is_primary_process():
        write_json(os.path.join(args.output_dir, "history.json"), training.history)
        plot_history(training.history, os.path.join(args.output_dir, "curves.png"), title=title)
    return results
