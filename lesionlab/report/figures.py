"""Figures (matplotlib), each written to a PNG file; the study report that shows them is built in
lesionlab.report.study_report."""

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
from lesionlab.labels import LabelSet, metric_title  # noqa: E402


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


def plot_subgroup_forest(table: pd.DataFrame, path: str | Path, *, metrics: Sequence[str], title: str = "",
                         labels: LabelSet | str | None = None) -> None:
    """Forest plot of subgroup metrics (a `evaluation.subgroups.subgroup_table`): one panel per metric.

    Each row is a subgroup (point + CI); the dashed line and grey band are the overall value and its CI.
    Red: CI wholly below the overall value (flagged). Hollow grey: small subgroup (too few images or no image of
    the flag class). Panel titles name the flag metrics after `labels`' flag class (None: ham7, "melanoma").
    """
    overall = table[table["column"] == "all"].iloc[0]
    rows = table[table["column"] != "all"].reset_index(drop=True)
    ticks = [f"{c}: {s}  (n={n})" for c, s, n in zip(rows["column"], rows["subgroup"], rows["n_images"], strict=True)]
    ypos = np.arange(len(rows))[::-1]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics) + 2.4, 0.24 * len(rows) + 1.2),
                             sharey=True, squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        ref, lo, hi = overall[m], overall[f"{m}_lo"], overall[f"{m}_hi"]
        if pd.notna(lo) and pd.notna(hi):
            ax.axvspan(lo, hi, color="0.88", zorder=0)
        if pd.notna(ref):
            ax.axvline(ref, ls="--", c="0.4", lw=0.9, zorder=1)
        for y, (_, r) in zip(ypos, rows.iterrows(), strict=True):
            if pd.isna(r[m]):
                ax.text(0.02, y, "n/a", va="center", fontsize=6, color="0.5", transform=ax.get_yaxis_transform())
                continue
            color = "C3" if r[f"{m}_below"] else ("0.55" if r["small"] else "C0")
            if pd.notna(r[f"{m}_lo"]):
                ax.plot([r[f"{m}_lo"], r[f"{m}_hi"]], [y, y], c=color, lw=1.2, zorder=2)
            ax.plot(r[m], y, "o", ms=4, zorder=3, c=color, mfc="white" if r["small"] else color)
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(metric_title(m, labels), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        # a thin line between metadata columns
        for y in ypos[1:][rows["column"].to_numpy()[1:] != rows["column"].to_numpy()[:-1]]:
            ax.axhline(y + 0.5, c="0.8", lw=0.6)
    axes[0][0].set_yticks(ypos, ticks, fontsize=7)
    axes[0][0].set_ylim(-0.7, len(rows) - 0.3)
    fig.suptitle(title or "subgroups", fontsize=10)
    fig.text(0.01, 0.005, "dashed/grey band: overall value and CI; red: CI wholly below overall; hollow: small subgroup",
             fontsize=6, color="0.4")
    _save(fig, Path(path))


def plot_reliability(curves: dict[str, dict], path: str | Path, *, title: str = "") -> None:
    """Top-1 reliability diagram: accuracy against mean confidence per bin for each curve (e.g. before / after
    temperature scaling), with the diagonal of perfect calibration and the share of images per bin below.

    Args:
        curves: {label: `evaluation.calibration.reliability_curve(...)` output}.
    """
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(4.6, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
    for i, (label, c) in enumerate(curves.items()):
        conf = np.array([np.nan if v is None else v for v in c["confidence"]], float)
        acc = np.array([np.nan if v is None else v for v in c["accuracy"]], float)
        ok = np.isfinite(conf)
        ax.plot(conf[ok], acc[ok], marker="o", ms=3, lw=1.3, c=f"C{i}", label=label)
        count = np.asarray(c["count"], float)
        axh.stairs(count / max(count.sum(), 1), c["edges"], color=f"C{i}", lw=1.2)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title or "reliability (top-1)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    axh.set_xlabel("confidence (top-1 probability)")
    axh.set_ylabel("share", fontsize=8)
    _save(fig, Path(path))


def plot_robustness(table: pd.DataFrame, metric: str, path: str | Path, *, title: str = "",
                    labels: LabelSet | str | None = None) -> None:
    """`metric` vs severity, one panel per perturbation, one line per model (ensemble in black); the default title
    names a flag metric after `labels`' flag class (None: ham7).

    `table` is `evaluation.robustness.robustness_table` output; the clean value sits at the perturbation's
    identity level (`identity` column) when present.
    """
    t = table[table["perturbation"] != "none"]
    perts = list(dict.fromkeys(t["perturbation"]))
    models = list(dict.fromkeys(table["model"]))
    cols = min(4, max(1, len(perts)))
    rows = int(np.ceil(len(perts) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False, sharey=True)
    for ax, pert in zip(axes.flat, perts, strict=False):
        sub = t[t["perturbation"] == pert]
        for i, m in enumerate(models):
            s = sub[sub["model"] == m]
            if "identity" in s and len(s):  # the unperturbed image sits at the identity level: flip 0, delta 0
                ref = 0.0 if metric == "flip_rate" or metric.startswith("delta_") else s[f"{metric}_clean"].iloc[0]
                s = pd.concat([s, pd.DataFrame({"level": [float(s["identity"].iloc[0])], metric: [ref]})])
            s = s.sort_values("level")
            black = m == "ensemble"
            ax.plot(s["level"], s[metric], marker="o", ms=3, lw=2.0 if black else 1.1, c="black" if black else f"C{i}",
                    label=m)
        if "identity" in sub:
            ax.axvline(float(sub["identity"].iloc[0]), c="grey", ls=":", lw=0.8)
        ax.axhline(0.0, c="grey", lw=0.5)
        ax.set_title(pert, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(perts):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title or metric_title(metric, labels), fontsize=10)
    fig.tight_layout()
    _save(fig, Path(path))


def plot_ood_scores(scores: dict[str, np.ndarray], threshold: float, path: Path, *, first: str) -> Path:
    """Histograms of the ensemble OOD score per set (log scale), the in-distribution set `first` filled."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    allv = np.concatenate([np.asarray(v, float) for v in scores.values()])
    lo = max(float(allv[allv > 0].min()) if (allv > 0).any() else 1e-3, 1e-3)
    bins = np.logspace(np.log10(lo), np.log10(max(float(allv.max()), lo * 10)), 50)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for k, v in scores.items():
        ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, density=True, label=f"{k} ({len(v)})", linewidth=1.4,
                histtype="stepfilled" if k == first else "step", alpha=0.45 if k == first else 0.9)
    ax.axvline(threshold, color="k", linestyle="--", label="refusal threshold (95% of validation pass)")
    ax.set_xscale("log")
    ax.set_xlabel("ensemble OOD score (Mahalanobis distance / validation median)")
    ax.set_ylabel("density")
    ax.set_title(f"Out-of-distribution score: {first} vs. images the models should refuse")
    ax.legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    _save(fig, path)
    return path
