"""What a bundle fits on its study so its answers can be trusted: calibration, a conformal differential, refusals.

At bundle time: temperatures per member and for the ensemble and the conformal thresholds (lesionlab.evaluation.trust,
on the study's validation predictions), the OOD model (lesionlab.clinic.ood_model, on the study's training and
validation images) and the error score (`fit_error_refusal`: the chance of a wrong answer from the OOD score, the
calibrated confidence and the conformal set size, fitted on the validation images, with the threshold that refuses
`trust.error_refusal_rate` of them). All of it goes into the manifest, the OOD arrays into a hashed file beside it.
At prediction time the screening pipeline (lesionlab.clinic.screening) applies them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.clinic.ood_model import OODModel, fit_ood
from lesionlab.clinic.screening import ensemble_probabilities
from lesionlab.config import OODConfig, TrustConfig
from lesionlab.evaluation.conformal import ConformalSets
from lesionlab.evaluation.ensemble import ENSEMBLE, mean_probabilities
from lesionlab.evaluation.selective import (
    SIGNALS,
    RefusalScore,
    fit_refusal_score,
    refusal_signals,
    selective_summary,
)
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
                   data: Path | None = None, batch_size: int = 32, progress: bool = True, val_scores: bool = False
                   ) -> dict[str, Any] | None | tuple[dict[str, Any] | None, pd.Series | None]:
    """Fit the OOD model for the bundle's members and save its arrays in `out_dir`; the manifest entry.

    With `val_scores`, (entry, the ensemble OOD score of every validation image by image id): the scores the OOD
    fit computes anyway to choose its threshold, so the error score costs no further forward pass
    (`fit_error_refusal`). (None, None) when the OOD model is off.
    """
    if cfg.method == "none":
        return (None, None) if val_scores else None
    frames = study.frames(data, splits=("train", "val"))
    model, val_out = fit_ood(predictors, frames["train"], frames["val"], cfg, batch_size=batch_size,
                             progress=progress, return_val=True)
    model.save(out_dir)
    if not val_scores:
        return model.manifest_entry()
    return model.manifest_entry(), validation_ood_scores(model, val_out, frames["val"])


def validation_ood_scores(model: OODModel, val_out: dict[str, dict[str, np.ndarray]], val_df: pd.DataFrame
                          ) -> pd.Series:
    """The ensemble OOD score of each validation image by image id, from `fit_ood(..., return_val=True)`'s outputs
    (what `fit_error_refusal` takes as `ood_val`)."""
    scores = model.score({n: o["features"] for n, o in val_out.items()})
    return pd.Series(scores, index=val_df["image_id"].astype(str).to_numpy())


def fit_error_refusal(study: StudyFolder, names: list[str], trust: dict[str, Any] | None,
                      ood_val: pd.Series | None, cfg: TrustConfig) -> dict[str, Any] | None:
    """The bundle's error score (`RefusalScore.to_dict()`, lesionlab.evaluation.selective), or None when off.

    Fitted (`fit_error_score`) on the study's validation predictions of the members as the screening pipeline sees
    them: the calibrated ensemble probabilities (`trust`), the conformal sets on them and the validation images' OOD
    scores (`ood_val`, from `fit_bundle_ood(..., val_scores=True)`), predicting a wrong top-1 answer; its threshold
    refuses `cfg.error_refusal_rate` of the validation images.

    None when the rate is 0 or there is no trust (a bundle given a threshold and no validation predictions).
    """
    rate = _error_rate(cfg)
    if rate == 0 or trust is None:
        return None
    y, probs, ids = study.probabilities(names, "val")
    ood, notes = None, []
    if ood_val is not None:
        found = ood_val.reindex([str(i) for i in ids]).to_numpy(float)
        if np.isnan(found).any():  # the OOD fit read another validation split than the predictions: do not guess
            notes.append(f"{int(np.isnan(found).sum())} of {len(y)} validation images have no OOD score")
        else:
            ood = found
    score = fit_error_score(y, ensemble_probabilities(probs, trust), trust, ood, rate, notes=notes)
    score.info.update(source=f"validation split of {study.root}", members=list(names))
    return score.to_dict()


def _error_rate(cfg: TrustConfig) -> float:
    rate = float(cfg.error_refusal_rate)
    if not 0 <= rate < 1:
        raise UserError(f"trust.error_refusal_rate {rate} must be in [0, 1) (0 switches the likely_wrong refusal off)")
    return rate


def fit_error_score(y: np.ndarray, cal: np.ndarray, trust: dict[str, Any], ood: np.ndarray | None, rate: float, *,
                    notes: list[str] | None = None) -> RefusalScore:
    """The error score on validation arrays: labels, calibrated ensemble probabilities, the trust parameters (for
    the conformal sets) and OOD scores (None: fitted without them). Without conformal sets or OOD scores it fits on
    the signals there are, and `info["note"]` says so; `info["validation"]` holds its refusals there."""
    conformal = trust["models"].get(ENSEMBLE, {}).get("conformal")
    use, notes = list(SIGNALS), list(notes or [])
    sets = ConformalSets.from_dict(conformal).sets(cal) if conformal else np.zeros(cal.shape, bool)
    if not conformal:
        use.remove("set_size")
        notes.append("no conformal sets: fitted without the set size")
    if ood is None:
        use.remove("ood")
        notes.append("no OOD scores of the validation images (no OOD model in this bundle): fitted without the OOD "
                     "score")
    signals = refusal_signals(cal, sets, ood if ood is not None else np.zeros(len(y)))
    wrong = cal.argmax(1) != np.asarray(y)
    score = fit_refusal_score(signals, wrong, use=use, refusal_rate=rate)
    # the threshold is the score of the last validation image let through; the pipeline recomputes that image's
    # score from its own forward pass, equal only up to float noise (~1e-8), which would decide its fate. Halfway
    # to the next score refuses the same validation images and leaves room for that noise.
    fitted = score.score(signals)
    above = fitted[fitted > score.threshold]
    if above.size and np.isfinite(score.threshold):
        score.threshold = float((score.threshold + above.min()) / 2)
    score.info["validation"] = selective_summary(~wrong, fitted > score.threshold)
    if notes:
        score.info["note"] = "; ".join(notes)
    return score
