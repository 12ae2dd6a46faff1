"""Evaluate predictions against ground truth: metrics.json, metrics.csv, confusion matrices, ROC curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.config import EvalConfig
from lesionlab.data.isic_csv import align, read_isic_csv
from lesionlab.evaluation.bootstrap import bootstrap_ci
from lesionlab.evaluation.metrics import PER_CLASS_KEYS, summarize
from lesionlab.evaluation.operating_points import at_threshold, operating_points, threshold_for_sensitivity
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_csv, atomic_write_json
from lesionlab.labels import CLASS_INDEX, CLASSES
from lesionlab.report.figures import plot_confusion, plot_roc


def evaluate_arrays(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    cfg: EvalConfig,
    groups: np.ndarray | None = None,
    threshold: float | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """All metrics for one set of predictions.

    Args:
        groups: lesion id per image; the bootstrap then resamples lesions, not images.
        threshold: melanoma threshold to apply (e.g. chosen on validation).
        val: (y_val, probs_val) to choose the melanoma threshold for `cfg.target_sensitivity` here.
    """
    out = summarize(y_true, probs)
    out["ci"] = bootstrap_ci(y_true, probs, groups=groups, n_boot=cfg.bootstrap, ci=cfg.ci) if cfg.bootstrap else {}
    out["ci_level"] = cfg.ci
    out["ci_resampling"] = "lesions" if groups is not None else "images"
    focus = CLASS_INDEX[cfg.error_class] if cfg.error_class in CLASS_INDEX else CLASS_INDEX["MEL"]
    cls_name = CLASSES[focus]
    ops = operating_points(y_true, probs, cls=focus, fixed_specificities=cfg.fixed_specificities,
                                   fixed_sensitivities=cfg.fixed_sensitivities)
    if val is not None and threshold is None:
        threshold = threshold_for_sensitivity(val[0] == focus, val[1][:, focus], cfg.target_sensitivity)
        ops["threshold_source"] = f"chosen on validation for sensitivity >= {cfg.target_sensitivity:.2f}"
    if threshold is not None:
        ops["at_threshold"] = at_threshold(y_true == focus, probs[:, focus], threshold)
        ops["target_sensitivity"] = cfg.target_sensitivity
        ops.setdefault("threshold_source", "given")
    out["operating_points"] = {cls_name: ops}
    return out


def per_class_table(m: dict[str, Any]) -> pd.DataFrame:
    """The paper's table: one row per class plus the macro average; CIs as `lo`-`hi` columns when present."""
    rows = []
    for c in [*m["classes"], "macro"]:
        vals = m["macro"] if c == "macro" else m["per_class"][c]
        row: dict[str, Any] = {"class": c}
        for k in PER_CLASS_KEYS:
            row[k] = vals[k]
            ci = m.get("ci", {}).get(f"{c}_{k}")
            if ci:
                row[f"{k}_lo"], row[f"{k}_hi"] = ci["lo"], ci["hi"]
        row["support"] = vals.get("support", m["n"])
        rows.append(row)
    return pd.DataFrame(rows)


def write_evaluation(m: dict[str, Any], y_true: np.ndarray, probs: np.ndarray, out_dir: str | Path, *, title: str = "") -> None:
    """metrics.json, metrics.csv, confusion matrices (counts and row-normalised) and ROC curves as PNG."""
    out = Path(out_dir)
    atomic_write_json(out / "metrics.json", m)
    atomic_write_csv(out / "metrics.csv", per_class_table(m), float_format="%.4f")
    cm = np.asarray(m["confusion"])
    plot_confusion(cm, m["classes"], out / "confusion_counts.png", normalize=False, title=title)
    plot_confusion(cm, m["classes"], out / "confusion_normalized.png", normalize=True, title=title)
    plot_roc(y_true, probs, m["classes"], out / "roc.png", title=title)


def lesion_groups(lesions_csv: str | Path | None, image_ids: list[str]) -> np.ndarray | None:
    """Lesion id per image from any CSV with image_id (or image) and lesion_id columns; None without one."""
    if lesions_csv is None:
        return None
    p = Path(lesions_csv)
    if not p.exists():
        raise UserError(f"lesions file {p} does not exist")
    df = pd.read_csv(p, dtype=str, keep_default_na=False)
    key = "image_id" if "image_id" in df.columns else "image"
    if key not in df.columns or "lesion_id" not in df.columns:
        raise UserError(f"{p}: needs columns image_id (or image) and lesion_id")
    m = dict(zip(df[key], df["lesion_id"], strict=False))
    return np.array([m.get(i) or i for i in image_ids])


def evaluate_files(
    truth: str | Path,
    pred: str | Path,
    out_dir: str | Path,
    *,
    cfg: EvalConfig,
    lesions: str | Path | None = None,
    val_truth: str | Path | None = None,
    val_pred: str | Path | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """`lesionlab evaluate`: any pair of ISIC-format CSVs -> metrics folder."""
    y, p, ids = align(read_isic_csv(truth, kind="truth"), read_isic_csv(pred, kind="prediction"),
                      truth_name=str(truth), pred_name=str(pred))
    val = None
    if (val_truth is None) != (val_pred is None):
        raise UserError("give both --val-truth and --val-pred to choose the melanoma threshold on validation")
    if val_truth is not None:
        vy, vp, _ = align(read_isic_csv(val_truth, kind="truth"), read_isic_csv(val_pred, kind="prediction"),
                          truth_name=str(val_truth), pred_name=str(val_pred))
        val = (vy, vp)
    m = evaluate_arrays(y, p, cfg=cfg, groups=lesion_groups(lesions, ids), threshold=threshold, val=val)
    write_evaluation(m, y, p, out_dir, title=Path(pred).stem)
    return m

