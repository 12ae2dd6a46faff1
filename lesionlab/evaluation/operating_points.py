"""Melanoma operating points: sensitivity at fixed specificity, thresholds chosen for a target sensitivity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from lesionlab.evaluation.metrics import _div, _f


def sensitivity_at_specificity(y_bin: np.ndarray, score: np.ndarray, specificity: float) -> dict[str, float | None]:
    """Highest sensitivity among thresholds whose specificity is >= `specificity`."""
    if y_bin.all() or not y_bin.any():
        return {"target_specificity": specificity, "sensitivity": None, "specificity": None, "threshold": None}
    fpr, tpr, thr = roc_curve(y_bin, score, drop_intermediate=False)  # keep every threshold: collinear ones can be optimal
    ok = (1 - fpr) >= specificity - 1e-12
    i = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
    return {"target_specificity": specificity, "sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i]), "threshold": _thr(thr[i])}


def specificity_at_sensitivity(y_bin: np.ndarray, score: np.ndarray, sensitivity: float) -> dict[str, float | None]:
    """Highest specificity among thresholds whose sensitivity is >= `sensitivity`."""
    if y_bin.all() or not y_bin.any():
        return {"target_sensitivity": sensitivity, "sensitivity": None, "specificity": None, "threshold": None}
    fpr, tpr, thr = roc_curve(y_bin, score, drop_intermediate=False)  # keep every threshold: collinear ones can be optimal
    ok = tpr >= sensitivity - 1e-12
    i = int(np.flatnonzero(ok)[np.argmin(fpr[ok])])
    return {"target_sensitivity": sensitivity, "sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i]), "threshold": _thr(thr[i])}


def _thr(t: float) -> float:
    return float(min(t, 1.0))  # roc_curve's first threshold is +inf: "flag nothing"


def threshold_for_sensitivity(y_bin: np.ndarray, score: np.ndarray, target: float) -> float | None:
    """The highest threshold whose sensitivity on (y_bin, score) reaches `target` (choose it on validation)."""
    return specificity_at_sensitivity(np.asarray(y_bin, bool), np.asarray(score, float), target)["threshold"]


def at_threshold(y_bin: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Sensitivity, specificity, precision and counts when flagging `score >= threshold`."""
    y_bin = np.asarray(y_bin, bool)
    flag = np.asarray(score) >= threshold
    tp, fp = int((flag & y_bin).sum()), int((flag & ~y_bin).sum())
    fn, tn = int((~flag & y_bin).sum()), int((~flag & ~y_bin).sum())
    return {
        "threshold": float(threshold), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "sensitivity": _f(_div(np.array(tp), np.array(tp + fn))), "specificity": _f(_div(np.array(tn), np.array(tn + fp))),
        "precision": _f(_div(np.array(tp), np.array(tp + fp))),
    }


def operating_points(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    cls: int,
    fixed_specificities: Sequence[float] = (0.8, 0.9, 0.95),
    fixed_sensitivities: Sequence[float] = (0.8, 0.9, 0.95),
) -> dict[str, list]:
    """Sensitivity at fixed specificities and specificity at fixed sensitivities for one class."""
    y_bin = np.asarray(y_true) == cls
    score = np.asarray(probs)[:, cls]
    return {
        "sensitivity_at_specificity": [sensitivity_at_specificity(y_bin, score, s) for s in fixed_specificities],
        "specificity_at_sensitivity": [specificity_at_sensitivity(y_bin, score, s) for s in fixed_sensitivities],
    }

