"""Figures (matplotlib) and the study report: one self-contained HTML file and a Markdown summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from lesionlab.io import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: str | Path, *, normalize: bool, title: str = "") -> None:
    """Confusion matrix heatmap (rows = truth, columns = prediction), counts or row-normalised."""
    cm = np.asarray(cm, float)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(shown.max(), 1))
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            v = shown[i, j]
            txt = f"{v:.2f}" if normalize else f"{int(v)}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="white" if v > shown.max() * 0.6 else "black")
    ax.set_title((title + " - " if title else "") + ("row-normalised" if normalize else "counts"), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, Path(path))


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: str | Path, *, title: str = "") -> None:
    """One-vs-rest ROC curve per class (classes without positives are left out, and say so)."""
    from sklearn.metrics import auc as _auc

    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    for k, c in enumerate(classes):
        pos = np.asarray(y_true) == k
        if not pos.any() or pos.all():
            ax.plot([], [], " ", label=f"{c}: no positives")
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, k])
        ax.plot(fpr, tpr, lw=1.6 if c == "MEL" else 1.0, label=f"{c} (AUC {_auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title or "ROC", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, Path(path))


def plot_history(histories: dict[str, pd.DataFrame], path: str | Path) -> None:
    """Train and validation loss per epoch for each model."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, h) in enumerate(histories.items()):
        ax.plot(h["epoch"], h["train_loss"], c=f"C{i}", ls="--", lw=1)
        ax.plot(h["epoch"], h["val_loss"], c=f"C{i}", lw=1.5, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted CE loss (dashed: train)")
    ax.set_yscale("log")  # one diverging epoch must not flatten every other curve
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    _save(fig, Path(path))


def plot_model_comparison(table: pd.DataFrame, path: str | Path) -> None:
    """Bar chart of macro metrics per model (rows = models, columns = metrics)."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    table.plot.bar(ax=ax, rot=0, width=0.8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncols=3)
    ax.set_title("macro averages, test split", fontsize=10)
    _save(fig, Path(path))

