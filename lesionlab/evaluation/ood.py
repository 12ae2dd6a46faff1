"""Out-of-distribution scores: is this image like the dermoscopy images the models were trained on?

Pure functions over arrays (features, logits, probabilities); higher score = more unusual. The bundle uses the
Mahalanobis score (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"):
the distance of an image's pooled penultimate features from the nearest class mean of the training split, under
one covariance shared by the classes. Why this and not the energy score (Liu et al. 2020, -logsumexp of the
logits): the energy score only sees the 7 logits, and a classifier can put a confident logit on anything (the
issue's astronaut came back "melanoma 70.7%"); the features carry much more of what the image looks like. The
benchmark (benchmarks/bench_ood.py, docs/ood-ham10000.md) measures both, and the max-softmax baseline, on the
same images.

The covariance is estimated with Ledoit-Wolf shrinkage (scikit-learn): with 2048 feature dimensions and a few
thousand images the plain sample covariance is singular or nearly so. The threshold is chosen on the validation
split so that a given share (default 95%) of in-distribution images pass (`threshold_for_tpr`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp

from lesionlab.exceptions import UserError


@dataclass
class MahalanobisStats:
    """Class means and shared covariance of training features, stored as a whitening matrix.

    With the precision matrix P = L L^T (Cholesky), (x - mu)^T P (x - mu) = ||(x - mu) L||^2, so scoring is one
    matrix product per image and a cheap distance to each (whitened) class mean.
    """

    whiten: np.ndarray  # (D, D) float32: L with P = L L^T
    means: np.ndarray  # (C, D) float32: class means of the training features, times L
    classes: list[int]  # the class indices the means belong to (classes absent from training are left out)
    scale: float = 1.0  # median score of the validation split: member scores are divided by it before averaging

    def arrays(self) -> dict[str, np.ndarray]:
        return {"whiten": self.whiten, "means": self.means}

    def meta(self) -> dict[str, Any]:
        return {"classes": self.classes, "scale": self.scale, "dim": int(self.whiten.shape[0])}

    @classmethod
    def from_parts(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> MahalanobisStats:
        return cls(whiten=np.asarray(arrays["whiten"], np.float32), means=np.asarray(arrays["means"], np.float32),
                   classes=[int(c) for c in meta["classes"]], scale=float(meta.get("scale", 1.0)))


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> MahalanobisStats:
    """Class means and a shared Ledoit-Wolf covariance of class-centred features (Lee et al. 2018).

    Raises:
        UserError: fewer than two images, or features and labels of different lengths.
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, np.float64)
    y = np.asarray(labels, int)
    if x.ndim != 2 or len(x) < 2 or len(x) != len(y):
        raise UserError(f"Mahalanobis fit needs (N, D) features with N >= 2 and N labels, got {x.shape} and {y.shape}")
    classes = sorted(int(c) for c in np.unique(y))
    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    # Symmetrise before Cholesky: the inverse is symmetric only up to rounding.
    whiten = np.linalg.cholesky((precision + precision.T) / 2)
    return MahalanobisStats(whiten=whiten.astype(np.float32), means=(means @ whiten).astype(np.float32), classes=classes)


def mahalanobis_score(features: np.ndarray, stats: MahalanobisStats) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest class mean, divided by `stats.scale` (N,)."""
    z = np.asarray(features, np.float32) @ stats.whiten
    # ||z - m||^2 = ||z||^2 - 2 z.m + ||m||^2, for every image and class at once
    d2 = (z * z).sum(1, keepdims=True) - 2 * z @ stats.means.T + (stats.means * stats.means).sum(1)
    return np.maximum(d2.min(1), 0.0).astype(np.float64) / stats.scale


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Energy -T * logsumexp(logits / T) (Liu et al. 2020): higher = more unusual."""
    z = np.asarray(logits, np.float64)
    return -temperature * logsumexp(z / temperature, axis=1)


def msp_score(probs: np.ndarray) -> np.ndarray:
    """1 - the largest softmax probability (Hendrycks & Gimpel 2017), the usual baseline."""
    return 1.0 - np.asarray(probs, np.float64).max(1)


def threshold_for_tpr(in_scores: np.ndarray, tpr: float = 0.95) -> float:
    """The smallest threshold that lets at least `tpr` of these in-distribution scores pass (score <= threshold)."""
    s = np.sort(np.asarray(in_scores, np.float64))
    if len(s) == 0:
        raise UserError("cannot choose an out-of-distribution threshold without in-distribution images")
    if not 0 < tpr <= 1:
        raise UserError(f"ood target share {tpr} must be in (0, 1]")
    return float(s[int(np.ceil(tpr * len(s))) - 1])


def ood_metrics(in_scores: np.ndarray, out_scores: np.ndarray, *, threshold: float | None = None,
                tpr: float = 0.95) -> dict[str, float]:
    """AUROC (out-of-distribution as the positive class), FPR at `tpr` TPR, and refusal shares at `threshold`.

    FPR at 95% TPR follows the out-of-distribution literature (Liang et al. 2018): TPR is the share of
    in-distribution images accepted, FPR the share of out-of-distribution images accepted at the threshold
    that accepts `tpr` of the in-distribution images given here.
    """
    from sklearn.metrics import roc_auc_score

    a = np.asarray(in_scores, np.float64)
    b = np.asarray(out_scores, np.float64)
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    auroc = float(roc_auc_score(y, np.r_[a, b])) if len(a) and len(b) else float("nan")
    t_own = threshold_for_tpr(a, tpr)
    out = {"auroc": auroc, "fpr_at_tpr": float(np.mean(b <= t_own)) if len(b) else float("nan"), "tpr": tpr,
           "n_in": int(len(a)), "n_out": int(len(b))}
    if threshold is not None:
        out.update({"threshold": float(threshold), "in_refused": float(np.mean(a > threshold)),
                    "out_refused": float(np.mean(b > threshold)) if len(b) else float("nan")})
    return out
