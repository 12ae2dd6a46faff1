"""Trust parameters of a set of models (each member and the ensemble): fitted on validation, evaluated elsewhere.

`fit_trust` fits, per model, the temperature (evaluation/calibration.py) and then the conformal thresholds on the
temperature-scaled validation probabilities (evaluation/conformal.py); `trust.json` stores them; `apply_trust`
turns raw probabilities into calibrated ones and prediction sets; `evaluate_trust` measures calibration before and
after and the empirical coverage on a test or external set; `compare_conformal` tabulates every method, marginal and
Mondrian, so the report shows what the configured choice costs and buys.

The temperature and the thresholds come from the same validation images. The temperature is one number, fitted
before the conformal scores are taken; the guarantee is exact for a temperature fixed in advance, and one
scalar fitted on ~900 images moves the scores far less than the finite-sample slack of the quantile.

trust.json: {"version": 1, "fitted_on": "validation", "n_val": N, "config": {TrustConfig fields},
             "models": {name: {"temperature": T, "conformal": ConformalSets.to_dict()}}}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lesionlab.config import TrustConfig
from lesionlab.evaluation.calibration import (
    before_after,
    calibrate_probs,
    fit_temperature,
    log_probs,
    reliability_curve,
)
from lesionlab.evaluation.conformal import METHODS, ConformalSets, coverage_report, fit_conformal, set_metrics
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_json, read_json

TRUST_FILE = "trust.json"


def fit_model_trust(y_val: np.ndarray, probs_val: np.ndarray, cfg: TrustConfig,
                    classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Temperature, then conformal thresholds on the scaled probabilities, for one model."""
    t = fit_temperature(log_probs(probs_val), y_val) if cfg.calibration else 1.0
    sets = fit_conformal(calibrate_probs(probs_val, t), y_val, coverage=cfg.coverage, method=cfg.method,
                         mondrian=cfg.mondrian, seed=cfg.seed, raps_lambda=cfg.raps_lambda, raps_k_reg=cfg.raps_k_reg,
                         class_coverage=cfg.class_coverage, classes=classes)
    return {"temperature": float(t), "conformal": sets.to_dict()}


def fit_trust(y_val: np.ndarray, probs_val: dict[str, np.ndarray], cfg: TrustConfig,
              classes: Sequence[str] | None = None) -> dict[str, Any]:
    """trust.json body for every model in `probs_val` ({name: (N, K) validation probabilities})."""
    if not probs_val:
        raise UserError("trust: no model probabilities to fit on")
    return {"version": 1, "fitted_on": "validation", "n_val": int(len(y_val)), "config": asdict(cfg),
            "models": {name: fit_model_trust(y_val, p, cfg, classes) for name, p in probs_val.items()}}


def write_trust(path: str | Path, trust: dict[str, Any]) -> None:
    atomic_write_json(Path(path), trust)


def read_trust(path: str | Path) -> dict[str, Any]:
    """A trust.json written by `write_trust`, checked for what `apply_trust` needs."""
    p = Path(path)
    trust = read_json(p, missing="run the study's trust step (or benchmarks/trust_realdata.py)")
    if not isinstance(trust, dict) or not isinstance(trust.get("models"), dict):
        raise UserError(f"{p}: no 'models' section; rewrite it with the study's trust step")
    return trust


def model_trust(trust: dict[str, Any], name: str) -> tuple[float, ConformalSets]:
    """(temperature, set predictor) of one model in a trust.json body."""
    if name not in trust["models"]:
        raise UserError(f"trust parameters have no model {name!r}; known: {', '.join(sorted(trust['models']))}")
    entry = trust["models"][name]
    return float(entry["temperature"]), ConformalSets.from_dict(entry["conformal"])


def apply_trust(trust: dict[str, Any], name: str, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated probabilities, (N, K) prediction-set membership) from a model's raw probabilities."""
    t, sets = model_trust(trust, name)
    cal = calibrate_probs(probs, t)
    return cal, sets.sets(cal)


def evaluate_trust(
    y: np.ndarray,
    probs: np.ndarray,
    trust: dict[str, Any],
    name: str,
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Calibration before/after (with CIs), reliability curves and conformal coverage of one model on one set.

    Returns:
        {"calibration": {"temperature", "n", "before": {...}, "after": {...}, "reliability": {...}},
         "conformal": {method, coverage target, mondrian, thresholds, coverage report}}
    """
    t, sets = model_trust(trust, name)
    bins = int(trust.get("config", {}).get("ece_bins", 15))
    calib = before_after(y, probs, t, groups=groups, n_bins=bins, n_boot=n_boot, ci=ci)
    cal = calibrate_probs(probs, t)
    calib["reliability"] = {"before": reliability_curve(y, probs, bins), "after": reliability_curve(y, cal, bins)}
    calib["ci_resampling"] = "lesions" if groups is not None else "images"
    rep = coverage_report(y, sets.sets(cal), groups=groups, n_boot=n_boot, ci=ci, classes=sets.classes)
    conformal = {"method": sets.method, "target_coverage": sets.coverage, "mondrian": sets.mondrian,
                 "thresholds": sets.to_dict()["thresholds"], **rep}
    return {"calibration": calib, "conformal": conformal}


def compare_conformal(
    y_val: np.ndarray,
    probs_val: np.ndarray,
    y: np.ndarray,
    probs: np.ndarray,
    *,
    temperature: float,
    coverage: float = 0.90,
    seed: int = 0,
    raps_lambda: float = 0.01,
    raps_k_reg: int = 1,
) -> list[dict[str, Any]]:
    """Every conformal method, marginal and Mondrian, fitted on validation and measured on (y, probs): one row each
    with coverage, melanoma coverage, the lowest per-class coverage, mean set size and the share of empty sets."""
    cal_val, cal = calibrate_probs(probs_val, temperature), calibrate_probs(probs, temperature)
    rows = []
    for method in METHODS:
        for mondrian in (False, True):
            c = fit_conformal(cal_val, y_val, coverage=coverage, method=method, mondrian=mondrian, seed=seed,
                              raps_lambda=raps_lambda, raps_k_reg=raps_k_reg)
            m = set_metrics(y, c.sets(cal), c.classes)
            per_class = [m[f"{k}_coverage"] for k in c.classes if np.isfinite(m[f"{k}_coverage"])]
            rows.append({"method": method, "mondrian": mondrian, "coverage": m["coverage"],
                         "MEL_coverage": m.get("MEL_coverage"), "min_class_coverage": min(per_class),
                         "mean_set_size": m["mean_set_size"], "empty": m["empty"]})
    return rows


def trust_table(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model of `evaluate_trust` results: T, ECE/classwise ECE/Brier/NLL before -> after, coverage."""
    rows = []
    for name, r in results.items():
        c, s = r["calibration"], r["conformal"]
        row: dict[str, Any] = {"model": name, "T": c["temperature"]}
        for k in ("ece", "classwise_ece", "brier", "nll"):
            row[f"{k}_before"] = c["before"][k]["value"]
            row[f"{k}_after"] = c["after"][k]["value"]
        row["coverage"] = s["coverage"]["value"]
        row["MEL_coverage"] = s["per_class"].get("MEL", {}).get("coverage", {}).get("value")
        row["mean_set_size"] = s["mean_set_size"]["value"]
        rows.append(row)
    return rows


def trust_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    trust: dict[str, Any],
    name: str,
    *,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
) -> dict[str, Any]:
    """`evaluate_trust`, plus `compare_conformal` when the validation (labels, raw probabilities) are given: the
    "calibration", "conformal" and "conformal_variants" entries of a metrics.json."""
    res = evaluate_trust(y, probs, trust, name, groups=groups, n_boot=n_boot, ci=ci)
    if val is not None:
        c = trust.get("config", {})
        res["conformal_variants"] = compare_conformal(
            val[0], val[1], y, probs, temperature=float(trust["models"][name]["temperature"]),
            coverage=float(c.get("coverage", 0.9)), seed=int(c.get("seed", 0)),
            raps_lambda=float(c.get("raps_lambda", 0.01)), raps_k_reg=int(c.get("raps_k_reg", 1)))
    return res


