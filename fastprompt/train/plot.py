"""The loss and top-1 curves of a run, as a PNG (matplotlib is optional: the ``bench`` extra)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["matplotlib_missing", "plot_curves"]


def matplotlib_missing() -> str | None:
    """None when matplotlib can be imported, else a one-line reason."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or fastprompt[bench])"
    return None


def plot_curves(metrics: Sequence[dict[str, Any]], path: str, title: str = "") -> str | None:
    """Write loss and accuracy per epoch (train and validation) to ``path``.

    Returns
    -------
    str or None
        ``path``, or None when matplotlib is missing or there is nothing to plot.
    """
    if matplotlib_missing() or not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] + 1 for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label, style in (("train_loss", "train", "-"), ("val_loss", "validation", "--")):
        values = [m.get(key) for m in metrics]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, values, style, marker=".", label=label)
    for key, label, style in (("train_acc", "train", "-"), ("val_acc", "validation", "--")):
        values = [m.get(key) for m in metrics]
        if any(v is not None for v in values):
            ax_acc.plot(epochs, [100 * v for v in values], style, marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
