"""A PNG of training curves: loss and each metric per epoch, train vs validation."""

from klora.atomic import atomic_path


def plot_history(history, path, title=None):
    """Plots a Keras-style history dict (`{"loss": [...], "val_loss": [...], ...}`).

    >>> plot_history({"loss": [0.7, 0.4], "val_loss": [0.6, 0.5]}, "curves.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in history if not k.startswith("val_") and k != "learning_rate"]
    # Validation-only metrics (e.g. `val_f1` from an evaluation callback) get a panel too.
    names += [k for k in history if k.startswith("val_") and k[4:] not in history]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        epochs = range(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], marker="o",
                label="validation" if name.startswith("val_") else "train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
