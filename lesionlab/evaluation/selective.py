"""Selective classification: refusing images so that the answers given are the trustworthy ones.

Pure functions over arrays (no torch, no I/O). A *refusal score* is any per-image number where higher means "refuse
first"; an image is accepted when its score is at or below a threshold.

Definitions (n images, `correct` = top-1 prediction right, `score` = refusal score):
- Risk-coverage curve (El-Yaniv & Wiener 2010; Geifman & El-Yaniv 2017): for each distinct score t (ascending), the
  images with score <= t are accepted; coverage = accepted / n, selective risk = errors among accepted / accepted.
  Tied scores enter together, so the curve does not depend on the order of ties.
- AURC (Geifman et al. 2019): the mean, over the n images, of the selective risk at the threshold equal to the
  image's own score. Without ties this is (1/n) sum_k risk(k most trusted), the usual definition; with ties every
  image of a tie group gets the risk of the whole group. Lower is better; its floor for a given error rate r is
  the optimal ordering's AURC (errors last), and e-AURC = AURC - that floor.
- Refusal signals: the OOD gate's score (log(1 + score), monotone, so the tail of the Mahalanobis distance does not
  swamp a regression), 1 - calibrated top probability ("confidence"), and the conformal set size.
- A combined refusal score (`fit_refusal_score`): a logistic regression, on standardised signals, that predicts a
  wrong top-1 answer on held-out (internal validation) images; its output is P(wrong). Fitted with scikit-learn;
  `RefusalScore` keeps the coefficients so scoring needs no estimator object and stores in JSON. A one-signal
  "regression" orders images exactly as its signal does (the fit is monotone), so OOD-only, confidence-only,
  set-size-only and combined are the same machinery with different signals.
- The threshold for a target refusal rate q: the largest validation score that still lets 1 - q of the
  validation images pass (lesionlab.evaluation.ood.threshold_for_tpr, the OOD gate's own rule). Ties at the
  threshold pass together, so a discrete signal (set size) may refuse fewer than q.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.special import expit

from lesionlab.evaluation.ood import threshold_for_tpr
from lesionlab.exceptions import UserError

SIGNALS = ("ood", "confidence", "set_size")
# the refusal scores compared on every target site: each signal alone, then all together
VARIANTS: dict[str, tuple[str, ...]] = {"ood": ("ood",), "confidence": ("confidence",), "set_size": ("set_size",),
                                        "combined": SIGNALS}


def _pair(correct: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(correct, bool).ravel()
    s = np.asarray(score, float).ravel()
    if c.shape != s.shape:
        raise ValueError(f"{len(c)} correctness flags but {len(s)} scores")
    if not np.isfinite(s).all():
        raise ValueError("refusal scores contain NaN or infinite values")
    return c, s


def risk_coverage(correct: np.ndarray, score: np.ndarray) -> dict[str, list[float]]:
    """The risk-coverage curve: one point per distinct score, lowest (most trusted) first.

    Returns:
        {"threshold": [...], "coverage": [...], "risk": [...]}: accepting score <= threshold covers `coverage` of
        the images with selective risk `risk` (error rate among the accepted). Empty lists for no images.
    """
    c, s = _pair(correct, score)
    if len(s) == 0:
        return {"threshold": [], "coverage": [], "risk": []}
    order = np.argsort(s, kind="stable")
    s_sorted, err = s[order], (~c[order]).astype(float)
    cum_err = np.cumsum(err)
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s) - 1]  # the last index of each tie group
    accepted = last + 1
    return {"threshold": s_sorted[last].tolist(), "coverage": (accepted / len(s)).tolist(),
            "risk": (cum_err[last] / accepted).tolist()}


def aurc(correct: np.ndarray, score: np.ndarray) -> float:
    """Area under the risk-coverage curve (see the module docstring); NaN without images."""
    c, s = _pair(correct, score)
    if len(s) == 0:
        return float("nan")
    rc = risk_coverage(c, s)
    # each tie group's images all get the group's risk: weight each curve point by the size of its group
    sizes = np.diff(np.r_[0, np.round(np.asarray(rc["coverage"]) * len(s)).astype(int)])
    return float(np.dot(sizes, rc["risk"]) / len(s))


def optimal_aurc(correct: np.ndarray) -> float:
    """The AURC of the best possible ordering (all correct answers first) for these correctness flags."""
    c = np.asarray(correct, bool).ravel()
    if len(c) == 0:
        return float("nan")
    s = np.empty(len(c))
    s[np.argsort(~c, kind="stable")] = np.arange(len(c))  # distinct scores: correct answers first, no ties
    return aurc(c, s)


def excess_aurc(correct: np.ndarray, score: np.ndarray) -> float:
    """e-AURC: AURC minus the optimal ordering's AURC (0 = refuses exactly the errors first)."""
    return aurc(correct, score) - optimal_aurc(correct)


def selective_summary(correct: np.ndarray, refused: np.ndarray) -> dict[str, Any]:
    """Images, images refused, the refusal rate (their share) and the accuracy of all, accepted and refused images
    (None where a group is empty)."""
    c = np.asarray(correct, bool).ravel()
    r = np.asarray(refused, bool).ravel()
    if c.shape != r.shape:
        raise ValueError(f"{len(c)} correctness flags but {len(r)} refusal flags")

    def acc(sel: np.ndarray) -> float | None:
        return float(c[sel].mean()) if sel.any() else None

    return {"n": int(len(c)), "n_refused": int(r.sum()), "refusal_rate": float(r.mean()) if len(c) else None,
            "accuracy_all": acc(np.ones_like(c)), "accuracy_accepted": acc(~r), "accuracy_refused": acc(r)}


def threshold_for_rate(score: np.ndarray, rate: float) -> float:
    """The threshold (refuse score > threshold) that refuses at most `rate` of these (validation) scores."""
    if not 0 <= rate < 1:
        raise UserError(f"refusal rate {rate} must be in [0, 1)")
    return threshold_for_tpr(np.asarray(score, float), 1.0 - rate)


def refusal_signals(probs: np.ndarray, sets: np.ndarray, ood_score: np.ndarray) -> dict[str, np.ndarray]:
    """The per-image refusal signals (higher = refuse first) from calibrated probabilities, conformal set
    membership and the OOD score."""
    p = np.asarray(probs, float)
    m = np.asarray(sets, bool)
    o = np.asarray(ood_score, float)
    if not len(p) == len(m) == len(o):
        raise ValueError(f"{len(p)} probability rows, {len(m)} sets and {len(o)} OOD scores")
    return {"ood": np.log1p(np.maximum(o, 0.0)), "confidence": 1.0 - p.max(1),
            "set_size": m.sum(1).astype(float)}


def _matrix(signals: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    missing = [n for n in names if n not in signals]
    if missing:
        raise UserError(f"refusal score needs signal {missing[0]!r}; given: {', '.join(signals)}")
    return np.column_stack([np.asarray(signals[n], float) for n in names])


@dataclass
class RefusalScore:
    """A fitted refusal score: P(wrong) from standardised signals, and the threshold above which to refuse."""

    signals: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    threshold: float = float("inf")
    target_rate: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def score(self, signals: Mapping[str, np.ndarray]) -> np.ndarray:
        """P(wrong answer) per image."""
        x = (_matrix(signals, self.signals) - np.asarray(self.mean)) / np.asarray(self.scale)
        return expit(x @ np.asarray(self.coef) + self.intercept)

    def refuse(self, signals: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.score(signals) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["threshold"] = None if np.isinf(self.threshold) else float(self.threshold)  # JSON has no inf
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RefusalScore:
        d = dict(d)
        d["threshold"] = float("inf") if d.get("threshold") is None else float(d["threshold"])
        return cls(**d)


def fit_refusal_score(signals: Mapping[str, np.ndarray], wrong: np.ndarray, *, use: Sequence[str] = SIGNALS,
                      refusal_rate: float = 0.1, c: float = 1.0) -> RefusalScore:
    """Fit P(wrong) on held-out images from the `use` signals, and the threshold refusing `refusal_rate` of them.

    scikit-learn's LogisticRegression (L2, strength 1/`c`) on signals standardised by their held-out mean and
    standard deviation. Without both right and wrong answers there is nothing to learn: the score is then the
    mean of the standardised signals (each signal is oriented so that higher = refuse first), noted in `info`.
    """
    from sklearn.linear_model import LogisticRegression

    x = _matrix(signals, use)
    y = np.asarray(wrong, bool).ravel()
    if len(x) != len(y):
        raise ValueError(f"{len(x)} signal rows but {len(y)} labels")
    if len(y) == 0:
        raise UserError("cannot fit a refusal score without validation images")
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale == 0] = 1.0  # a constant signal carries no information; leave it unscaled (its z is 0)
    z = (x - mean) / scale
    if y.all() or not y.any():
        rs = RefusalScore(list(use), mean.tolist(), scale.tolist(), [1.0 / len(use)] * len(use), 0.0,
                          info={"fallback": "validation answers were all right or all wrong: mean of the signals"})
    else:
        lr = LogisticRegression(C=c).fit(z, y)
        rs = RefusalScore(list(use), mean.tolist(), scale.tolist(), lr.coef_[0].tolist(), float(lr.intercept_[0]))
    rs.threshold = threshold_for_rate(rs.score(signals), refusal_rate)
    rs.target_rate = float(refusal_rate)
    rs.info.update(n_fit=int(len(y)), wrong_fit=int(y.sum()), c=float(c))
    return rs


def compare_refusals(correct: np.ndarray, signals: Mapping[str, np.ndarray], scores: Mapping[str, RefusalScore],
                     gate: np.ndarray | None = None, quality: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One row per refusal rule on one image set: refusal rate, accuracy of all / accepted / refused, AURC.

    Args:
        scores: fitted refusal scores by name (e.g. `VARIANTS`' names).
        gate: the existing gate's refusals (quality or OOD), reported first as "gate" when given.
        quality: images refused for quality; they stay refused under every score (quality comes first).
    """
    c = np.asarray(correct, bool)
    q = np.zeros(len(c), bool) if quality is None else np.asarray(quality, bool)
    rows = []
    if gate is not None:
        rows.append({"rule": "gate", **selective_summary(c, gate), "aurc": None, "accepted_at_least_all": None})
    for name, rs in scores.items():
        s = rs.score(signals)
        summ = selective_summary(c, q | (s > rs.threshold))
        ok = (summ["accuracy_accepted"] is None or summ["accuracy_all"] is None
              or summ["accuracy_accepted"] >= summ["accuracy_all"] - 1e-12)
        rows.append({"rule": name, **summ, "aurc": aurc(c, s), "accepted_at_least_all": bool(ok)})
    if gate is not None:
        g = rows[0]
        g["accepted_at_least_all"] = bool(g["accuracy_accepted"] is None or g["accuracy_all"] is None
                                          or g["accuracy_accepted"] >= g["accuracy_all"] - 1e-12)
    return rows
