"""Pure metric functions over numpy arrays (no I/O). Class order is the caller's; ISIC order everywhere here.

Definitions (one-vs-rest per class, from the argmax confusion matrix C with rows = truth, cols = prediction):
precision = TP/(TP+FP) (0 when the class is never predicted), sensitivity = TP/(TP+FN),
specificity = TN/(TN+FP), F1 = 2TP/(2TP+FP+FN), AUC = one-vs-rest ROC AUC of the class probability.
Undefined values (no positives / no negatives) are NaN, written as null in JSON; macro averages skip them.
Balanced accuracy = mean sensitivity over the classes present in the truth (the ISIC 2018 Task 3 metric).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score, roc_curve

from lesionlab.labels import CLASSES

PER_CLASS_KEYS = ("precision", "sensitivity", "specificity", "f1", "auc")


def _div(a: np.ndarray, b: np.ndarray, empty: float = np.nan) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    out = np.full_like(a, empty, dtype=float)
    np.divide(a, b, out=out, where=b > 0)
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = len(CLASSES)) -> np.ndarray:
    """K x K counts, rows = truth, columns = prediction."""
    return confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))


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
    out = np.full(probs.shape[1], np.nan)
    for k in range(probs.shape[1]):
        pos = y_true == k
        if pos.any() and (~pos).any():
            out[k] = roc_auc_score(pos, probs[:, k])
    return out


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean sensitivity over the classes present in `y_true`."""
    if len(y_true) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # predictions of absent classes are fine here
        return float(balanced_accuracy_score(y_true, y_pred))


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def summarize(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES) -> dict:
    """The metrics.json body: per-class and macro metrics, accuracy, balanced accuracy, confusion matrix."""
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, float)
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


def flat_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """Every number that gets a confidence interval, flat: `<CLASS>_<metric>`, `macro_<metric>`, accuracies."""
    m = summarize(y_true, probs, classes)
    out = {f"macro_{k}": m["macro"][k] for k in PER_CLASS_KEYS}
    out["accuracy"] = m["accuracy"]
    out["balanced_accuracy"] = m["balanced_accuracy"]
    for c, vals in m["per_class"].items():
        out.update({f"{c}_{k}": vals[k] for k in PER_CLASS_KEYS})
    return {k: (np.nan if v is None else v) for k, v in out.items()}


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    stat: Callable[[np.ndarray, np.ndarray], dict[str, float]] = flat_metrics,
) -> dict[str, dict[str, float | None]]:
    """Percentile bootstrap CIs of `stat`; resamples whole groups (lesions) when `groups` is given.

    Returns:
        {name: {"value", "lo", "hi"}}; lo/hi are None when too few resamples define the statistic.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    point = stat(y_true, probs)
    rng = np.random.default_rng(seed)
    if groups is None:
        groups = np.arange(len(y_true))
    codes, inv = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(codes))]
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        pick = rng.integers(0, len(codes), len(codes))
        idx = np.concatenate([members[g] for g in pick])
        for k, v in stat(y_true[idx], probs[idx]).items():
            samples[k].append(v)
    alpha = (1 - ci) / 2
    out = {}
    for k, v in point.items():
        s = np.asarray(samples[k], float)
        s = s[np.isfinite(s)]
        ok = len(s) >= max(10, n_boot // 2)
        out[k] = {
            "value": _f(v),
            "lo": float(np.quantile(s, alpha)) if ok else None,
            "hi": float(np.quantile(s, 1 - alpha)) if ok else None,
        }
    return out


# ----------------------------------------------------------------------------- operating points


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


def agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> dict[str, float]:
    """Share of identical predictions and Cohen's kappa between two models' argmax predictions."""
    from sklearn.metrics import cohen_kappa_score

    same = float(np.mean(np.asarray(pred_a) == np.asarray(pred_b))) if len(pred_a) else float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = float(cohen_kappa_score(pred_a, pred_b)) if len(pred_a) else float("nan")
    return {"agreement": same, "kappa": kappa}
