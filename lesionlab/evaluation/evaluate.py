"""All metrics of one set of predictions against ground truth (the metrics.json contents; written by
lesionlab.report.evaluation_files)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.config import EvalConfig
from lesionlab.evaluation.bootstrap import bootstrap_ci
from lesionlab.evaluation.metrics import PER_CLASS_KEYS, summarize
from lesionlab.evaluation.operating_points import at_threshold, operating_points, threshold_for_sensitivity
from lesionlab.labels import names_for


def evaluate_arrays(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    cfg: EvalConfig,
    groups: np.ndarray | None = None,
    threshold: float | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """All metrics for one set of predictions.

    Args:
        groups: lesion id per image; the bootstrap then resamples lesions, not images.
        threshold: melanoma threshold to apply (e.g. chosen on validation).
        val: (y_val, probs_val) to choose the melanoma threshold for `cfg.target_sensitivity` here.
    """
    names = names_for(np.asarray(probs).shape[1], classes)
    out = summarize(y_true, probs, names)
    out["ci"] = bootstrap_ci(y_true, probs, groups=groups, n_boot=cfg.bootstrap, ci=cfg.ci) if cfg.bootstrap else {}
    out["ci_level"] = cfg.ci
    out["ci_resampling"] = "lesions" if groups is not None else "images"
    # the focus class: eval.error_class when the label set has it, else the flag class (column 0: MEL, MALIGNANT)
    focus = names.index(cfg.error_class) if cfg.error_class in names else 0
    cls_name = names[focus]
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


