"""The study's refusal summary: what the screening pipeline refuses on the test split and on images it should refuse.

Runs `lesionlab.clinic.screening.Screener` (what predict and the service run) over the test split, synthetic
non-lesion images and degraded lesions; writes `ood.json` and the score histogram `ood_scores.png`, which the
study report's Trust section shows (lesionlab.report.study_report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.clinic.screening import Screener, screen_table
from lesionlab.data.images import load_image
from lesionlab.data.ood_images import degraded_lesions, synthetic_ood_images
from lesionlab.evaluation.ood import ood_metrics
from lesionlab.evaluation.selective import selective_summary
from lesionlab.io import atomic_write_json
from lesionlab.report.figures import plot_ood_scores


def _share(frame: pd.DataFrame, column: str) -> float:
    """The share of rows flagged in `column`; 0 for tables written before that gate existed."""
    return float(frame[column].mean()) if column in frame else 0.0


def refusal_summary(test: pd.DataFrame, sets: dict[str, pd.DataFrame], threshold: float,
                    validation_refused: float | None) -> dict[str, Any]:
    """ood.json from refusal tables (`screening.screen_table`): the test split's and each set's refusals, AUROC."""
    rows = []
    for g, scr in sets.items():
        m = ood_metrics(test["ood_score"].to_numpy(), scr["ood_score"].to_numpy())
        rows.append({"set": g, "images": len(scr), "refused": float(scr["refused"].mean()),
                     "refused_by_quality": float((scr["quality"] != "").mean()),
                     "refused_by_ood": float(scr["ood_refused"].mean()),
                     "refused_by_error": _share(scr, "error_refused"), "auroc": m["auroc"],
                     "fpr_at_95_tpr": m["fpr_at_tpr"]})
    return {"threshold": threshold, "test_images": len(test), "test_refused": float(test["refused"].mean()),
            "test_refused_by_quality": float((test["quality"] != "").mean()),
            "test_refused_by_ood": float(test["ood_refused"].mean()),
            # the likely_wrong gate (0 for a screener without one, as the study's own refusal step builds it)
            "test_refused_by_error": _share(test, "error_refused"),
            "validation_refused": validation_refused, "sets": rows}


def refusal_report(screener: Screener, test_df: pd.DataFrame, out_dir: Path, *, n_degraded: int = 100, seed: int = 0,
                   batch_size: int = 64, progress: bool = True, correct: np.ndarray | None = None,
                   error_refusal: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refusals on the test split and on synthetic / degraded images; `ood.json` and `ood_scores.png` in out_dir.

    Args:
        correct: per test row, whether the model's answer was right: adds `test_accuracy` (all, accepted and
            refused images; evaluation.selective.selective_summary).
        error_refusal: the fitted likely_wrong score's record (clinic.trust.fit_error_refusal), kept as is.
    """
    if screener.ood is None:
        raise ValueError("refusal_report needs a screener with an OOD model")  # the study calls it only with one
    out_dir = Path(out_dir)
    test = screen_table(screener, paths=list(test_df["path"]), batch_size=batch_size, progress=progress)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(test_df), size=min(n_degraded, len(test_df)), replace=False)
    groups = {**synthetic_ood_images(seed=seed),
              **degraded_lesions([load_image(test_df["path"].iloc[i]) for i in pick])}
    sets = {g: screen_table(screener, ims, batch_size=batch_size, progress=False) for g, ims in groups.items()}
    summary = refusal_summary(test, sets, screener.ood.threshold, screener.ood.info.get("validation_refused"))
    if correct is not None:
        summary["test_accuracy"] = selective_summary(correct, test["refused"].to_numpy())
    if error_refusal:
        summary["error_refusal"] = error_refusal
    plot_ood_scores({"test split": test["ood_score"].to_numpy(), **{g: s["ood_score"].to_numpy() for g, s in sets.items()}},
                    screener.ood.threshold, out_dir / "ood_scores.png", first="test split")
    atomic_write_json(out_dir / "ood.json", summary)
    return summary
