"""Split conformal prediction sets (a "differential diagnosis") with a coverage guarantee, and their evaluation.

Calibrated once on the validation split: a score s(x, y) per validation image, a threshold q = the
ceil((n + 1) * coverage)-th smallest score (infinite when that exceeds n: then every class is in every set), and at
prediction time the set of classes whose score stays within q. For exchangeable images the set holds the true class
with probability >= coverage (Vovk et al. 2005; Angelopoulos & Bates 2021). Mondrian (class-conditional) conformal
takes one threshold per true class from that class's validation images, so the guarantee holds for every class,
melanoma included, not only on average (Vovk 2012; Sadinle et al. 2019).

Scores (p = probabilities, o(k) = 1-based rank of class k by probability, mass_above(k) = sum of the probabilities
ranked above k, u ~ U(0, 1) drawn once per validation image from a seeded generator):
- LAC (Sadinle et al. 2019): s = 1 - p_y; class k is in the set iff 1 - p_k <= q. Smallest sets on average; a
  set can be empty (no class is likely enough), which is itself a warning sign.
- APS (Romano et al. 2020): s = mass_above(y) + (1 - u) * p_y (randomised, as in MAPIE); class k is in the set iff
  mass_above(k) < q, i.e. the most probable classes until their mass reaches q, the class that crosses q
  included (MAPIE's `include_last_label=True`). Never empty; adapts the set size to the image's difficulty.
- RAPS (Angelopoulos et al. 2021): APS plus a penalty lambda * max(0, o - k_reg) on deep ranks, in the score and in
  the inclusion rule, which trims long tails of unlikely classes.

Prediction sets are deterministic for a given image: the randomisation only enters the calibration scores.
Hand-written because the pieces the study needs (Mondrian thresholds, storage in JSON, no estimator object) are not
what MAPIE's estimator API offers; tests compare the sets with MAPIE's on the same scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lesionlab.evaluation.bootstrap import bootstrap_ci
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASSES, names_for

METHODS = ("lac", "aps", "raps")


def _check_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, float)
    if p.ndim != 2:
        raise UserError(f"conformal prediction needs (N, K) probabilities, got shape {p.shape}")
    return p


def ranks(probs: np.ndarray) -> np.ndarray:
    """1-based rank of each class by decreasing probability (ties: lower class index first)."""
    p = _check_probs(probs)
    order = np.argsort(-p, axis=1, kind="stable")
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.arange(1, p.shape[1] + 1)[None, :].repeat(len(p), 0), axis=1)
    return out


def mass_above(probs: np.ndarray) -> np.ndarray:
    """For each class, the total probability of the classes ranked above it (0 for the top class)."""
    p = _check_probs(probs)
    order = np.argsort(-p, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    excl = np.cumsum(sorted_p, axis=1) - sorted_p
    out = np.empty_like(p)
    np.put_along_axis(out, order, excl, axis=1)
    return out


def _penalty(probs: np.ndarray, lam: float, k_reg: int) -> np.ndarray:
    return lam * np.maximum(0, ranks(probs) - k_reg)


def candidate_scores(probs: np.ndarray, method: str, *, raps_lambda: float = 0.0, raps_k_reg: int = 1) -> np.ndarray:
    """(N, K) score of every candidate class used by the inclusion rule (see the module docstring)."""
    p = _check_probs(probs)
    if method == "lac":
        return 1.0 - p
    if method == "aps":
        return mass_above(p)
    if method == "raps":
        return mass_above(p) + _penalty(p, raps_lambda, raps_k_reg)
    raise UserError(f"unknown conformal method {method!r}; valid: {', '.join(METHODS)}")


def calibration_scores(
    probs: np.ndarray,
    y_true: np.ndarray,
    method: str,
    *,
    seed: int = 0,
    u: np.ndarray | None = None,
    raps_lambda: float = 0.0,
    raps_k_reg: int = 1,
) -> np.ndarray:
    """Conformity score of the true class of each calibration image.

    Args:
        seed: seeds the uniform draws of APS/RAPS (`np.random.RandomState(seed).uniform(size=N)`, MAPIE's draw).
        u: the uniform draws themselves (overrides `seed`).
    """
    p = _check_probs(probs)
    y = np.asarray(y_true, int)
    if len(y) != len(p):
        raise UserError(f"conformal calibration: {len(p)} probability rows but {len(y)} labels")
    rows = np.arange(len(y))
    if method == "lac":
        return 1.0 - p[rows, y]
    cand = candidate_scores(p, method, raps_lambda=raps_lambda, raps_k_reg=raps_k_reg)[rows, y]
    if u is None:
        u = np.random.RandomState(seed).uniform(size=len(y))
    return cand + (1.0 - np.asarray(u, float)) * p[rows, y]


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ceil((n + 1) * coverage)-th smallest score; inf when that rank exceeds n (too few scores)."""
    s = np.sort(np.asarray(scores, float))
    if not 0 < coverage < 1:
        raise UserError(f"conformal coverage must lie strictly between 0 and 1, got {coverage}")
    k = math.ceil((len(s) + 1) * coverage - 1e-9)  # the 1e-9 absorbs float error such as 10 * 0.9 = 9.000000000000002
    return float(s[k - 1]) if k <= len(s) else math.inf


@dataclass
class ConformalSets:
    """A calibrated set predictor; `to_dict`/`from_dict` store it in JSON (trust.json, bundles)."""

    method: str = "lac"
    coverage: float = 0.90
    mondrian: bool = False
    thresholds: list[float] = field(default_factory=list)  # one per class (all equal unless mondrian); inf = all
    n_calibration: list[int] = field(default_factory=list)  # calibration images behind each threshold
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    seed: int = 0
    raps_lambda: float = 0.0
    raps_k_reg: int = 1
    class_coverage: dict[str, float] = field(default_factory=dict)  # Mondrian: per-class targets other than coverage

    def sets(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) boolean membership of each class in each image's prediction set."""
        p = _check_probs(probs)
        if p.shape[1] != len(self.thresholds):
            raise UserError(f"conformal sets were calibrated for {len(self.thresholds)} classes, got {p.shape[1]}")
        cand = candidate_scores(p, self.method, raps_lambda=self.raps_lambda, raps_k_reg=self.raps_k_reg)
        q = np.asarray(self.thresholds, float)[None, :]
        return cand <= q if self.method == "lac" else cand < q

    def differential(self, probs: np.ndarray) -> list[list[str]]:
        """Per image, the classes of its prediction set, most probable first."""
        p = _check_probs(probs)
        member = self.sets(p)
        order = np.argsort(-p, axis=1, kind="stable")
        return [[self.classes[k] for k in row if m[k]] for row, m in zip(order, member, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["thresholds"] = [None if math.isinf(t) else float(t) for t in self.thresholds]  # JSON has no inf
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalSets:
        d = dict(d)
        d["thresholds"] = [math.inf if t is None else float(t) for t in d["thresholds"]]
        return cls(**d)


def fit_conformal(
    probs: np.ndarray,
    y_true: np.ndarray,
    *,
    coverage: float = 0.90,
    method: str = "lac",
    mondrian: bool = False,
    seed: int = 0,
    raps_lambda: float = 0.01,
    raps_k_reg: int = 1,
    classes: Sequence[str] | None = None,
    class_coverage: Mapping[str, float] | None = None,
) -> ConformalSets:
    """Calibrate a set predictor on held-out (validation) probabilities and labels.

    With `mondrian`, class k's threshold comes from the images whose true class is k; a class with fewer than
    ceil(1 / (1 - coverage)) - 1 such images gets an infinite threshold (always in the set), the honest answer.
    `class_coverage` (Mondrian only) gives some classes their own target, e.g. {"MEL": 0.95} where missing a
    melanoma costs more than a longer differential.
    """
    if method not in METHODS:
        raise UserError(f"unknown conformal method {method!r}; valid: {', '.join(METHODS)}")
    if class_coverage is not None and not isinstance(class_coverage, Mapping):
        raise UserError(f"trust.class_coverage must map classes to coverages (e.g. {{MEL: 0.95}}), got {class_coverage!r}")
    class_coverage = dict(class_coverage or {})
    classes = names_for(np.asarray(probs).shape[1], classes)
    unknown = sorted(set(class_coverage) - set(classes))
    if unknown:
        raise UserError(f"trust.class_coverage: unknown class {unknown[0]}; valid: {', '.join(classes)}")
    if class_coverage and not mondrian:
        raise UserError("trust.class_coverage needs trust.mondrian=true (one threshold per class)")
    p = _check_probs(probs)
    y = np.asarray(y_true, int)
    if len(p) == 0:
        raise UserError("conformal calibration needs at least one image")
    lam = raps_lambda if method == "raps" else 0.0
    s = calibration_scores(p, y, method, seed=seed, raps_lambda=lam, raps_k_reg=raps_k_reg)
    k = p.shape[1]
    if mondrian:
        thresholds = [conformal_quantile(s[y == c], float(class_coverage.get(classes[c], coverage))) for c in range(k)]
        counts = [int((y == c).sum()) for c in range(k)]
    else:
        thresholds = [conformal_quantile(s, coverage)] * k
        counts = [len(y)] * k
    return ConformalSets(method=method, coverage=float(coverage), mondrian=bool(mondrian), thresholds=thresholds,
                         n_calibration=counts, classes=list(classes), seed=int(seed), raps_lambda=float(lam),
                         raps_k_reg=int(raps_k_reg), class_coverage={c: float(v) for c, v in class_coverage.items()})


def set_metrics(y_true: np.ndarray, sets: np.ndarray, classes: Sequence[str] | None = None) -> dict[str, float]:
    """Flat set statistics (for `bootstrap_ci`): coverage, mean set size, share of empty and single-class sets,
    and `<CLASS>_coverage` / `<CLASS>_set_size` over the images of each true class (NaN without such images)."""
    y = np.asarray(y_true, int)
    m = np.asarray(sets, bool)
    classes = names_for(m.shape[1], classes) if m.ndim == 2 else classes or CLASSES
    if len(y) == 0:
        return {"coverage": math.nan, "mean_set_size": math.nan, "empty": math.nan, "singleton": math.nan}
    hit = m[np.arange(len(y)), y]
    size = m.sum(1)
    out = {"coverage": float(hit.mean()), "mean_set_size": float(size.mean()),
           "empty": float((size == 0).mean()), "singleton": float((size == 1).mean())}
    for c, name in enumerate(classes):
        sel = y == c
        out[f"{name}_coverage"] = float(hit[sel].mean()) if sel.any() else math.nan
        out[f"{name}_set_size"] = float(size[sel].mean()) if sel.any() else math.nan
    return out


def coverage_report(
    y_true: np.ndarray,
    sets: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Marginal and per-class empirical coverage and set size, with (lesion) bootstrap CIs.

    Returns:
        {"n", "coverage": {value, lo, hi}, "mean_set_size": {...}, "empty": {...}, "singleton": {...},
         "per_class": {CLASS: {"n", "coverage": {...}, "mean_set_size": {...}}}, "set_size_counts": [n of size 0..K]}
    """
    y = np.asarray(y_true, int)
    m = np.asarray(sets, bool)
    classes = names_for(m.shape[1], classes)

    def stat(yy: np.ndarray, mm: np.ndarray) -> dict[str, float]:
        return set_metrics(yy, mm, classes)

    if n_boot > 0:
        flat = bootstrap_ci(y, m, groups=groups, n_boot=n_boot, ci=ci, seed=seed, stat=stat)
    else:
        flat = {k: {"value": None if math.isnan(v) else v, "lo": None, "hi": None} for k, v in stat(y, m).items()}
    per_class = {
        name: {"n": int((y == c).sum()), "coverage": flat[f"{name}_coverage"], "mean_set_size": flat[f"{name}_set_size"]}
        for c, name in enumerate(classes)
    }
    return {
        "n": int(len(y)), "coverage": flat["coverage"], "mean_set_size": flat["mean_set_size"],
        "empty": flat["empty"], "singleton": flat["singleton"], "per_class": per_class,
        "set_size_counts": np.bincount(m.sum(1), minlength=m.shape[1] + 1).astype(int).tolist(),
    }
