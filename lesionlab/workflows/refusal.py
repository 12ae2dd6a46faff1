"""The study's refusal summary: screening of the test split and of images the models should refuse.

Writes `ood.json` and the score histogram `ood_scores.png`, which the study report's Trust section shows
(lesionlab.report.study_report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.clinic.ood_model import OODModel, screen_frame, screen_images
from lesionlab.config import QualityConfig
from lesionlab.data.images import load_image
from lesionlab.data.ood_images import degraded_lesions, synthetic_ood_images
from lesionlab.evaluation.ood import ood_metrics
from lesionlab.inference.predictor import Predictor
from lesionlab.io import atomic_write_json
from lesionlab.report.figures import plot_ood_scores


def ood_report(predictors: list[Predictor], ood: OODModel, test_df: pd.DataFrame, quality: QualityConfig,
               out_dir: Path, *, n_degraded: int = 100, seed: int = 0, batch_size: int = 64,
               progress: bool = True) -> dict[str, Any]:
    """Refusals on the test split and on synthetic / degraded images; `ood.json` and `ood_scores.png` in out_dir.

    For the study report's Trust section (and benchmarks/bench_ood.py, which adds non-medical photos).
    """
    out_dir = Path(out_dir)
    test = screen_frame(predictors, ood, test_df, quality, batch_size=batch_size, progress=progress)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(test_df), size=min(n_degraded, len(test_df)), replace=False)
    groups = {**synthetic_ood_images(seed=seed),
              **degraded_lesions([load_image(test_df["path"].iloc[i]) for i in pick])}
    scores = {"test split": test["ood_score"].to_numpy()}
    sets = []
    for g, ims in groups.items():
        scr = pd.concat([screen_images(predictors, ood, ims[i:i + batch_size], quality)
                         for i in range(0, len(ims), batch_size)], ignore_index=True)
        scores[g] = scr["ood_score"].to_numpy()
        m = ood_metrics(scores["test split"], scores[g])
        sets.append({"set": g, "images": len(ims), "refused": float(scr["refused"].mean()),
                     "refused_by_quality": float((scr["quality"] != "").mean()),
                     "refused_by_ood": float(scr["ood_refused"].mean()), "auroc": m["auroc"],
                     "fpr_at_95_tpr": m["fpr_at_tpr"]})
    summary = {"threshold": ood.threshold, "test_images": len(test), "test_refused": float(test["refused"].mean()),
               "test_refused_by_quality": float((test["quality"] != "").mean()),
               "test_refused_by_ood": float(test["ood_refused"].mean()),
               "validation_refused": ood.info.get("validation_refused"), "sets": sets}
    plot_ood_scores(scores, ood.threshold, out_dir / "ood_scores.png", first="test split")
    atomic_write_json(out_dir / "ood.json", summary)
    return summary
