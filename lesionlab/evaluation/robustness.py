"""Acquisition robustness: metrics under perturbation and how often a prediction flips (pure functions over arrays).

For a model, `clean` are its probabilities on the unperturbed images and `perturbed[(name, level)]` its
probabilities on the same images after one perturbation (lesionlab.data.perturbations). Per condition:
balanced accuracy, melanoma sensitivity (argmax decision) and macro one-vs-rest AUC, their change against the
clean images, and the flip rate: the share of images whose predicted class differs from the clean prediction
(labels are not needed for it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from lesionlab.evaluation.metrics import (
    auc_one_vs_rest,
    balanced_accuracy,
    confusion,
    per_class_from_confusion,
)
from lesionlab.labels import CLASS_INDEX

METRICS = ("balanced_accuracy", "mel_sensitivity", "macro_auc")


def flip_rate(clean_probs: np.ndarray, perturbed_probs: np.ndarray) -> float:
    """Share of images whose argmax class differs between the clean and the perturbed probabilities."""
    a, b = np.asarray(clean_probs), np.asarray(perturbed_probs)
    if a.shape != b.shape:
        raise ValueError(f"clean {a.shape} and perturbed {b.shape} probabilities differ in shape")
    return float(np.mean(a.argmax(1) != b.argmax(1))) if len(a) else float("nan")


def condition_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, MEL sensitivity and macro AUC (over classes present) of one set of probabilities."""
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, float)
    pred = probs.argmax(1)
    pc = per_class_from_confusion(confusion(y_true, pred, np.asarray(probs).shape[1]))
    auc = auc_one_vs_rest(y_true, probs)
    return {
        "balanced_accuracy": balanced_accuracy(y_true, pred),
        "mel_sensitivity": float(pc["sensitivity"][CLASS_INDEX["MEL"]]),
        "macro_auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
    }


def robustness_table(
    y_true: np.ndarray | None,
    clean: Mapping[str, np.ndarray],
    perturbed: Mapping[str, Mapping[tuple[str, float], np.ndarray]],
) -> pd.DataFrame:
    """One row per model and condition: metrics, their change against clean, and the flip rate.

    Args:
        y_true: class indices (N,), or None for unlabelled images (then only flip rates).
        clean: {model: (N, K) clean probabilities}.
        perturbed: {model: {(perturbation, level): (N, K) probabilities}}.

    Returns:
        Columns model, perturbation, level, n, flip_rate, then per metric `<m>`, `<m>_clean`, `delta_<m>`.
        A `clean` row per model (perturbation "none") carries the reference values.
    """
    rows = []
    for model, ref in clean.items():
        base = condition_metrics(y_true, ref) if y_true is not None else {}
        rows.append({"model": model, "perturbation": "none", "level": np.nan, "n": len(ref), "flip_rate": 0.0,
                     **{m: base.get(m, np.nan) for m in METRICS},
                     **{f"{m}_clean": base.get(m, np.nan) for m in METRICS},
                     **{f"delta_{m}": 0.0 if m in base else np.nan for m in METRICS}})
        for (name, level), probs in perturbed.get(model, {}).items():
            cur = condition_metrics(y_true, probs) if y_true is not None else {}
            row = {"model": model, "perturbation": name, "level": float(level), "n": len(probs),
                   "flip_rate": flip_rate(ref, probs)}
            for m in METRICS:
                row[m] = cur.get(m, np.nan)
                row[f"{m}_clean"] = base.get(m, np.nan)
                row[f"delta_{m}"] = cur.get(m, np.nan) - base.get(m, np.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def summarize_robustness(table: pd.DataFrame) -> pd.DataFrame:
    """Per model and perturbation: mean and worst flip rate and the worst drop of each metric over the severities."""
    t = table[table["perturbation"] != "none"]
    agg = t.groupby(["model", "perturbation"], sort=False).agg(
        mean_flip_rate=("flip_rate", "mean"), max_flip_rate=("flip_rate", "max"),
        **{f"worst_delta_{m}": (f"delta_{m}", "min") for m in METRICS},
    )
    return agg.reset_index()
