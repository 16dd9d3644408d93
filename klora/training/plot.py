"""PNG figures: training curves on a step axis, and a confusion matrix.

>>> plot_history(history, "curves.png")           # a fine_tune / ResumableTraining history
>>> plot_confusion([[40, 2], [5, 53]], ["negative", "positive"], "confusion.png")
"""

import numpy as np

from klora.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)


def smooth(values, weight=0.9):
    """An exponential moving average, debiased at the start (as TensorBoard smooths)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def plot_history(history, path, title=None):
    """Training loss per step (raw and smoothed) and the validation scores at each epoch's
    end, on a step axis with the epochs marked.

    `history` holds per-epoch lists (`loss`, `val_loss`, `val_accuracy`, ...) and, from
    `StepHistory`, `steps` (`loss`, `learning_rate`, `epoch_end`); without `steps` (an
    older run) the axis counts epochs.
    """
    plt = _pyplot()
    steps = history.get("steps") or {}
    ends = steps.get("epoch_end") or list(range(1, len(history.get("loss", [])) + 1))
    unit = "step" if steps.get("epoch_end") else "epoch"
    scores = [k for k in history if k.startswith("val_") and k != "val_loss"
              and len(history[k]) == len(ends)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if steps.get("loss"):
        x = range(1, len(steps["loss"]) + 1)
        left.plot(x, steps["loss"], color="tab:blue", alpha=0.25, linewidth=0.8,
                  label="training loss (each step)")
        left.plot(x, smooth(steps["loss"]), color="tab:blue", label="training loss (smoothed)")
    elif history.get("loss"):
        left.plot(ends, history["loss"], marker="o", label="training loss (epoch mean)")
    if len(history.get("val_loss", [])) == len(ends):
        left.plot(ends, history["val_loss"], marker="o", color="tab:orange",
                  label="validation loss")
    for name in scores:
        right.plot(ends, history[name], marker="o", label=name[4:])
    for ax in (left, right):
        for epoch, end in enumerate(ends, start=1):
            ax.axvline(end, color="gray", linestyle=":", linewidth=0.8)
            ax.annotate(f"epoch {epoch}", (end, 1), xycoords=("data", "axes fraction"),
                        ha="right", va="top", fontsize=8, color="gray", rotation=90)
        ax.set_xlabel(unit)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    left.set_title("loss")
    right.set_title("validation scores at each epoch's end")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(confusion, labels, path, title="confusion matrix"):
    """A confusion matrix (`confusion[i][j]`: true class i predicted as j) with counts."""
    plt = _pyplot()
    confusion = np.asarray(confusion)
    size = max(4, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(labels)), [str(l) for l in labels], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), [str(l) for l in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = confusion.max() / 2 if confusion.size else 0
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > threshold else "black")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
