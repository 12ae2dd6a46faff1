"""Calibration: temperature scaling (Guo et al. 2017) and the measures that show whether probabilities can be trusted.

Pure numpy/scipy over arrays (no torch, no I/O), so `lesionlab evaluate` stays light.

Logits. Temperature scaling divides a model's logits by one scalar T > 0 fitted on the validation split. The study
keeps probabilities, not logits, and that is enough: log softmax(z) = z - logsumexp(z), a per-row constant, and
softmax is blind to per-row constants, so softmax(log(p) / T) == softmax(z / T) exactly. For an ensemble (the mean
of member probabilities) the "logits" are log of the mean probability, by definition. `log_probs` turns stored
probabilities into such logits; the CSVs keep 9 significant digits (data/isic_csv.py), which round-trips the float32
softmax exactly, so tiny probabilities survive (6 fixed decimals turned them into 0).

Definitions (n images, K classes, y = true class index, p = (n, K) probabilities):
- ECE: top-1 confidence c = max_k p_k, binned into 15 equal-width bins (lo, hi] over (0, 1] (Guo et al. 2017);
  ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)|. MCE = max_b of the same gap over non-empty bins.
- Classwise ECE (Kull et al. 2019): for each class k, the same binned gap between p_k and 1[y == k] over all images
  (bins [0, 1/15], (1/15, 2/15], ...), averaged over the K classes.
- Brier score: mean over images of sum_k (p_k - 1[y == k])^2 (Brier 1950; ranges 0..2).
- NLL: mean over images of -log p_y (p_y floored at the smallest positive double, so a zero gives ~708, not inf).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from lesionlab.evaluation.bootstrap import bootstrap_ci
from lesionlab.exceptions import UserError

N_BINS = 15  # Guo et al. 2017
TINY = np.finfo(float).tiny  # floor for log(0): keeps a zero probability (effectively) zero after scaling
T_BOUNDS = (0.05, 20.0)  # temperatures outside this range mean a broken model, not a calibration


def log_probs(probs: np.ndarray) -> np.ndarray:
    """Logits (up to a per-row constant) from probabilities: log p, zeros floored at the smallest positive double."""
    p = np.asarray(probs, float)
    return np.log(np.maximum(p, TINY))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T), row-wise and numerically stable."""
    return softmax(np.asarray(logits, float) / float(temperature), axis=1)


def calibrate_probs(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities from (uncalibrated) probabilities: softmax(log(p) / T)."""
    return apply_temperature(log_probs(probs), temperature)


def _nll_and_grad(log_t: float, z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean NLL of softmax(z / T) with T = exp(log_t), and its derivative with respect to log_t."""
    t = np.exp(log_t)
    s = z / t
    lse = logsumexp(s, axis=1)
    nll = float(np.mean(lse - s[np.arange(len(y)), y]))
    p = softmax(s, axis=1)
    # d/dlogT of (logsumexp(z/T) - z_y/T) = -(sum_k p_k z_k - z_y) / T
    grad = float(np.mean(-((p * z).sum(1) - z[np.arange(len(y)), y]) / t))
    return nll, grad


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature that minimises the NLL of `softmax(logits / T)` on (validation) labels.

    L-BFGS (scipy's L-BFGS-B, as Guo et al. 2017 use L-BFGS) over log T with the analytic gradient; log T keeps T
    positive, and the bounds keep a degenerate set (all correct, or all wrong) from running off to 0 or infinity.
    Rows whose logits are not finite (e.g. -inf) are not expected: use `log_probs` on probabilities.

    Raises:
        UserError: for empty input, mismatched shapes or labels outside the class range.
    """
    z = np.asarray(logits, float)
    y = np.asarray(y_true, int)
    if z.ndim != 2 or len(z) == 0 or len(z) != len(y):
        raise UserError(f"temperature scaling needs (N, K) logits and N labels, got {z.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise UserError(f"temperature scaling: labels must lie in 0..{z.shape[1] - 1}")
    if not np.isfinite(z).all():
        raise UserError("temperature scaling: logits contain inf or NaN (use log_probs on probabilities)")
    z = z - z.max(axis=1, keepdims=True)  # same softmax, smaller numbers
    res = minimize(_nll_and_grad, x0=np.zeros(1), args=(z, y), jac=True, method="L-BFGS-B",
                   bounds=[tuple(np.log(T_BOUNDS))], options={"maxiter": 200, "gtol": 1e-10, "ftol": 1e-14})
    return float(np.exp(res.x[0]))


def nll(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    p = np.asarray(probs, float)
    y = np.asarray(y_true, int)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], TINY))))


def brier(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Multiclass Brier score: mean over images of the squared distance to the one-hot truth (0 = perfect, 2 = worst)."""
    p = np.asarray(probs, float)
    y = np.asarray(y_true, int)
    if len(y) == 0:
        return float("nan")
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(((p - onehot) ** 2).sum(1)))


def _bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each value in [0, 1] for equal-width bins (lo, hi]; 0 falls in the first bin."""
    return np.clip(np.ceil(np.asarray(values, float) * n_bins).astype(int) - 1, 0, n_bins - 1)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per-bin count, mean confidence and accuracy (NaN for empty bins) of equal-width bins over [0, 1]."""
    conf = np.asarray(confidence, float)
    corr = np.asarray(correct, float)
    idx = _bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=corr, minlength=n_bins) / count
    return {"edges": np.linspace(0, 1, n_bins + 1), "count": count, "confidence": mean_conf, "accuracy": acc}


def _binned_gap(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[float, float]:
    """(expected, maximum) |accuracy - confidence| over the bins, weighted by bin size for the expected gap."""
    if len(confidence) == 0:
        return float("nan"), float("nan")
    b = reliability_bins(confidence, correct, n_bins)
    full = b["count"] > 0
    gap = np.abs(b["accuracy"][full] - b["confidence"][full])
    return float(np.sum(b["count"][full] / len(confidence) * gap)), float(gap.max())


def ece(y_true: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error of the top-1 confidence (Guo et al. 2017)."""
    p = np.asarray(probs, float)
    return _binned_gap(p.max(1), p.argmax(1) == np.asarray(y_true), n_bins)[0]


def mce(y_true: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> float:
    """Maximum calibration error of the top-1 confidence: the largest gap over non-empty bins."""
    p = np.asarray(probs, float)
    return _binned_gap(p.max(1), p.argmax(1) == np.asarray(y_true), n_bins)[1]


def classwise_ece(y_true: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> float:
    """Mean over classes of the ECE of each class probability against its one-vs-rest truth (Kull et al. 2019)."""
    p = np.asarray(probs, float)
    y = np.asarray(y_true)
    if len(y) == 0:
        return float("nan")
    return float(np.mean([_binned_gap(p[:, k], y == k, n_bins)[0] for k in range(p.shape[1])]))


def calibration_metrics(y_true: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> dict[str, float]:
    """ECE, MCE, classwise ECE, Brier score and NLL (flat, so `bootstrap_ci` can resample it)."""
    return {
        "ece": ece(y_true, probs, n_bins), "mce": mce(y_true, probs, n_bins),
        "classwise_ece": classwise_ece(y_true, probs, n_bins),
        "brier": brier(y_true, probs), "nll": nll(y_true, probs),
    }


def calibration_with_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_bins: int = N_BINS,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float | None]]:
    """`calibration_metrics` with percentile bootstrap CIs that resample lesions when `groups` is given.

    Returns:
        {metric: {"value", "lo", "hi"}}; lo/hi are None without bootstrap (n_boot = 0).
    """
    def stat(yy: np.ndarray, pp: np.ndarray) -> dict[str, float]:
        return calibration_metrics(yy, pp, n_bins)

    if n_boot <= 0:
        return {k: {"value": v, "lo": None, "hi": None} for k, v in stat(y_true, probs).items()}
    return bootstrap_ci(y_true, probs, groups=groups, n_boot=n_boot, ci=ci, seed=seed, stat=stat)


def before_after(
    y_true: np.ndarray,
    probs: np.ndarray,
    temperature: float,
    *,
    groups: np.ndarray | None = None,
    n_bins: int = N_BINS,
    n_boot: int = 1000,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Calibration metrics (with CIs) of raw probabilities and of their temperature-scaled version."""
    kw = {"groups": groups, "n_bins": n_bins, "n_boot": n_boot, "ci": ci}
    return {
        "temperature": float(temperature), "n": int(len(y_true)),
        "before": calibration_with_ci(y_true, probs, **kw),
        "after": calibration_with_ci(y_true, calibrate_probs(probs, temperature), **kw),
    }


def reliability_curve(y_true: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> dict[str, list]:
    """The numbers behind a top-1 reliability diagram (JSON-friendly: empty bins are None)."""
    p = np.asarray(probs, float)
    b = reliability_bins(p.max(1), p.argmax(1) == np.asarray(y_true), n_bins)
    def as_list(a: np.ndarray) -> list[float | None]:
        return [float(v) if np.isfinite(v) else None for v in a]

    return {"edges": b["edges"].tolist(), "count": b["count"].astype(int).tolist(),
            "confidence": as_list(b["confidence"]), "accuracy": as_list(b["accuracy"])}

