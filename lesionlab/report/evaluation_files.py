"""An evaluation written to a folder: metrics.json / metrics.csv with their figures, subgroup tables with forest
plots, reliability diagrams. The numbers come from lesionlab.evaluation (pure); this module only writes them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.evaluation.evaluate import per_class_table
from lesionlab.evaluation.subgroups import subgroup_table
from lesionlab.io import atomic_write_csv, atomic_write_json
from lesionlab.labels import LabelSet
from lesionlab.report.figures import plot_confusion, plot_reliability, plot_roc, plot_subgroup_forest


def write_evaluation(m: dict[str, Any], y_true: np.ndarray, probs: np.ndarray, out_dir: str | Path, *, title: str = "") -> None:
    """metrics.json, metrics.csv, confusion matrices (counts and row-normalised) and ROC curves as PNG."""
    out = Path(out_dir)
    atomic_write_json(out / "metrics.json", m)
    atomic_write_csv(out / "metrics.csv", per_class_table(m), float_format="%.4f")
    cm = np.asarray(m["confusion"])
    plot_confusion(cm, m["classes"], out / "confusion_counts.png", normalize=False, title=title)
    plot_confusion(cm, m["classes"], out / "confusion_normalized.png", normalize=True, title=title)
    plot_roc(y_true, probs, m["classes"], out / "roc.png", title=title)


def write_subgroups(
    out_dir: str | Path,
    y_true: np.ndarray,
    probs: dict[str, np.ndarray],
    image_ids: Sequence[str],
    meta: pd.DataFrame,
    *,
    groups: np.ndarray | None = None,
    columns: Sequence[str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    min_images: int = 30,
    mel_threshold: float | None = None,
    plot_metrics: Sequence[str] = ("balanced_accuracy", "MEL_sensitivity", "MEL_auc"),
    csv: bool = True,
    file_names: dict[str, str] | None = None,
    labels: LabelSet | str | None = None,
) -> pd.DataFrame:
    """`subgroup_table` for each model of `probs` ({name: (N, K)}): `subgroups.csv` and `subgroups_<name>.png`.

    Args:
        file_names: name -> file-safe name for the plots (default: the name itself).
        labels: the label set, whose flag class names the `MEL_*` panels of the plots (None: ham7).
    """
    from lesionlab.io import atomic_write_csv

    out = Path(out_dir)
    frames = []
    for name, p in probs.items():
        t = subgroup_table(y_true, p, image_ids, meta, columns=columns, groups=groups, n_boot=n_boot, ci=ci,
                           min_images=min_images, mel_threshold=mel_threshold, labels=labels)
        t.insert(0, "model", name)
        frames.append(t)
        stem = (file_names or {}).get(name, name)
        plot_subgroup_forest(t, out / f"subgroups_{stem}.png", metrics=plot_metrics, labels=labels,
                             title=f"{name}: subgroups ({int(ci * 100)}% lesion-bootstrap CIs)")
    table = pd.concat(frames, ignore_index=True)
    if csv:
        atomic_write_csv(out / "subgroups.csv", table, float_format="%.4f")
    return table


def plot_trust_reliability(res: dict[str, Any], path: str | Path, *, title: str = "") -> None:
    """Reliability diagram of one `evaluate_trust` result: before and after temperature scaling."""

    c = res["calibration"]
    plot_reliability({f"before (ECE {c['before']['ece']['value']:.3f})": c["reliability"]["before"],
                      f"after, T = {c['temperature']:.2f} (ECE {c['after']['ece']['value']:.3f})": c["reliability"]["after"]},
                     path, title=title)
