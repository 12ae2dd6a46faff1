"""Pure metric functions over numpy arrays (no I/O). Class order is the caller's; ISIC order everywhere here.

Definitions (one-vs-rest per class, from the argmax confusion matrix C with rows = truth, cols = prediction):
precision = TP/(TP+FP) (0 when the class is never predicted), sensitivity = TP/(TP+FN),
specificity = TN/(TN+FP), F1 = 2TP/(2TP+FP+FN), AUC = one-vs-rest ROC AUC of the class probability.
Undefined values (no positives / no negatives) are NaN, written as null in JSON; macro averages skip them.
Balanced accuracy = mean sensitivity over the classes present in the truth (the ISIC 2018 Task 3 metric).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from lesionlab.labels import CLASSES, names_for

PER_CLASS_KEYS = ("precision", "sensitivity", "specificity", "f1", "auc")


def _div(a: np.ndarray, b: np.ndarray, empty: float = np.nan) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    out = np.full_like(a, empty, dtype=float)
    np.divide(a, b, out=out, where=b > 0)
    return out


# The three functions below are written by hand (what sklearn's confusion_matrix, balanced_accuracy_score and
# roc_auc_score compute) because lesion bootstraps call them 10^4-10^5 times per table, and sklearn's per-call
# input validation cost ~2-4 ms a call: 90% of a `lesionlab robustness` run's time on the real test split went
# there. Each is a few numpy lines; tests/test_metrics.py checks all three against sklearn, ties included.


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = len(CLASSES)) -> np.ndarray:
    """K x K counts, rows = truth, columns = prediction (labels 0..K-1)."""
    y_true, y_pred = np.asarray(y_true, int).ravel(), np.asarray(y_pred, int).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if len(y_true) and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(num_classes, -1)


def _finite(scores: np.ndarray) -> np.ndarray:
    """Scores as floats; NaN or infinite scores are a bug upstream, not a value to rank (sklearn refuses them too)."""
    scores = np.asarray(scores, float)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return scores


def rank_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for the boolean `pos` by the Mann-Whitney rank statistic (ties get average ranks, which
    is sklearn's trapezoidal ROC AUC); NaN without positives or negatives."""
    pos = np.asarray(pos, bool)
    score = _finite(score)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class tp/fp/fn/tn, precision, sensitivity, specificity, F1 and support from a confusion matrix."""
    cm = np.asarray(cm, dtype=float)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    support = cm.sum(axis=1)
    precision = _div(tp, tp + fp, empty=0.0)
    precision[(tp + fp == 0) & (support == 0)] = np.nan  # never predicted and never present: undefined
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": precision,
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "support": support,
    }


def auc_one_vs_rest(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC AUC per class (one-vs-rest); NaN where the class has no positives or no negatives."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, float)
    return np.array([rank_auc(y_true == k, probs[:, k]) for k in range(probs.shape[1])])


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean sensitivity over the classes present in `y_true`."""
    y_true, y_pred = np.asarray(y_true, int).ravel(), np.asarray(y_pred, int).ravel()
    if len(y_true) == 0:
        return float("nan")
    k = int(max(y_true.max(), y_pred.max())) + 1
    cm = confusion(y_true, y_pred, k)
    support = cm.sum(axis=1)
    present = support > 0  # predictions of absent classes are fine here
    return float(np.mean(np.diag(cm)[present] / support[present]))


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def summarize(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] | None = None) -> dict:
    """The metrics.json body: per-class and macro metrics, accuracy, balanced accuracy, confusion matrix.

    Args:
        classes: the class names of the probability columns (the run's label set); None: ham7's for 7 columns.
    """
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, float)
    classes = names_for(probs.shape[1], classes)
    y_pred = probs.argmax(axis=1)
    cm = confusion(y_true, y_pred, len(classes))
    pc = per_class_from_confusion(cm)
    auc = auc_one_vs_rest(y_true, probs)
    per_class = {
        c: {
            "precision": _f(pc["precision"][k]), "sensitivity": _f(pc["sensitivity"][k]),
            "specificity": _f(pc["specificity"][k]), "f1": _f(pc["f1"][k]), "auc": _f(auc[k]),
            "support": int(pc["support"][k]),
        }
        for k, c in enumerate(classes)
    }
    # Macro averages over the classes present in the truth (an absent class has no sensitivity).
    present = pc["support"] > 0
    macro = {key: _f(_nanmean(np.where(present, (auc if key == "auc" else pc[key]), np.nan))) for key in PER_CLASS_KEYS}
    notes = [f"{c}: no positive cases, so sensitivity, F1 and AUC are undefined (null)" for k, c in enumerate(classes) if not present[k]]
    return {
        "classes": list(classes), "n": int(len(y_true)), "per_class": per_class, "macro": macro,
        "accuracy": _f(float((y_pred == y_true).mean()) if len(y_true) else np.nan),
        "balanced_accuracy": _f(balanced_accuracy(y_true, y_pred)),
        "confusion": cm.astype(int).tolist(), "notes": notes,
    }


def _f(x: float) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def flat_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] | None = None) -> dict[str, float]:
    """Every number that gets a confidence interval, flat: `<CLASS>_<metric>`, `macro_<metric>`, accuracies."""
    m = summarize(y_true, probs, classes)
    out = {f"macro_{k}": m["macro"][k] for k in PER_CLASS_KEYS}
    out["accuracy"] = m["accuracy"]
    out["balanced_accuracy"] = m["balanced_accuracy"]
    for c, vals in m["per_class"].items():
        out.update({f"{c}_{k}": vals[k] for k in PER_CLASS_KEYS})
    return {k: (np.nan if v is None else v) for k, v in out.items()}


def agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> dict[str, float]:
    """Share of identical predictions and Cohen's kappa between two models' argmax predictions."""
    from sklearn.metrics import cohen_kappa_score

    same = float(np.mean(np.asarray(pred_a) == np.asarray(pred_b))) if len(pred_a) else float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = float(cohen_kappa_score(pred_a, pred_b)) if len(pred_a) else float("nan")
    return {"agreement": same, "kappa": kappa}

