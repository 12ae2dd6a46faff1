"""What a bundle fits on its study so its answers can be trusted: calibration, a conformal differential, refusals.

At bundle time: temperatures per member and for the ensemble and the conformal thresholds (lesionlab.evaluation.trust,
on the study's validation predictions), and the OOD model (lesionlab.clinic.ood_model, on the study's training and
validation images). All of it goes into the manifest, the OOD arrays into a hashed file beside it. At prediction
time the screening pipeline (lesionlab.clinic.screening) applies them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lesionlab.clinic.ood_model import fit_ood
from lesionlab.clinic.screening import ensemble_probabilities
from lesionlab.config import OODConfig, TrustConfig
from lesionlab.evaluation.ensemble import ENSEMBLE, mean_probabilities
from lesionlab.evaluation.trust import fit_trust
from lesionlab.exceptions import UserError
from lesionlab.study_folder import StudyFolder


def fit_calibration(study: StudyFolder, names: list[str], cfg: TrustConfig) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """trust.json-style parameters for the members and their ensemble (mean of raw member probabilities), plus
    the validation labels and calibrated ensemble probabilities (the melanoma threshold is chosen on these)."""
    if not study.has_probabilities(names, "val"):
        missing = [str(f) for f in [study.truth_file("val"), *(study.prediction_file(n, "val") for n in names)]
                   if not f.exists()]
        raise UserError(f"{missing[0]} not found: cannot calibrate on validation; re-run `lesionlab study` into "
                        f"{study.root}, or pass --threshold without --study")
    y, probs, _ = study.probabilities(names, "val")
    trust = fit_trust(y, {**probs, ENSEMBLE: mean_probabilities(list(probs.values()))}, cfg)
    trust["source"] = f"validation split of {study.root}"
    return trust, y, ensemble_probabilities(probs, trust)


def fit_bundle_ood(predictors: list, study: StudyFolder, cfg: OODConfig, out_dir: Path, *,
                   data: Path | None = None, batch_size: int = 32, progress: bool = True) -> dict[str, Any] | None:
    """Fit the OOD model for the bundle's members and save its arrays in `out_dir`; the manifest entry."""
    if cfg.method == "none":
        return None
    frames = study.frames(data, splits=("train", "val"))
    model = fit_ood(predictors, frames["train"], frames["val"], cfg, batch_size=batch_size, progress=progress)
    model.save(out_dir)
    return model.manifest_entry()
