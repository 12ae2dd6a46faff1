"""What a bundle adds so its answers can be trusted: calibration, a conformal differential, and refusals.

At bundle time (`fit_bundle_trust`): temperatures per member and for the ensemble and the conformal thresholds
(lesionlab.evaluation.trust, on the study's validation predictions), the OOD model (clinic/ood_model.py, on the
study's training and validation images) and the quality thresholds (config `quality`). All of it goes into the
manifest, the OOD arrays into a hashed file beside it.

At prediction time (`BundleTrust.results`): quality checks first (no model needed), then the OOD score on the
members' features; a refused image gets `status: unevaluable` with reasons and advice and no diagnosis (its
probabilities only under `research`); an accepted one gets calibrated probabilities, the melanoma flag and the
`differential`, the classes of the conformal prediction set, most probable first.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from lesionlab.clinic.ood_model import OODModel, fit_ood
from lesionlab.config import OODConfig, QualityConfig, StudyConfig, TrustConfig, load_config
from lesionlab.data.quality import ADVICE, check_quality, thresholds_from_dict
from lesionlab.evaluation.calibration import calibrate_probs
from lesionlab.evaluation.conformal import ConformalSets
from lesionlab.evaluation.ensemble import ENSEMBLE
from lesionlab.evaluation.trust import fit_trust
from lesionlab.exceptions import UserError
from lesionlab.inference.outputs import image_outputs
from lesionlab.models.registry import file_stem

log = logging.getLogger(__name__)


def study_config(study: Path | None) -> StudyConfig:
    """The study's saved config (its quality / ood / trust sections), or the defaults."""
    if study is not None and (Path(study) / "config.yaml").exists():
        return load_config(Path(study) / "config.yaml")
    return StudyConfig()


def validation_probabilities(study: Path, names: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and each member's probabilities on the study's validation split (predictions/<name>_val.csv)."""
    from lesionlab.data.isic_csv import align, read_isic_csv

    pred_dir = Path(study) / "predictions"
    truth = read_isic_csv(pred_dir / "truth_val.csv", kind="truth")
    y, probs = None, {}
    for n in names:
        f = pred_dir / f"{n}_val.csv"
        if not f.exists():
            raise UserError(f"{f} not found: cannot calibrate on validation; pass --threshold and --no-trust")
        y, probs[n], _ = align(truth, read_isic_csv(f, kind="prediction"))
    return y, probs


def fit_calibration(study: Path, names: list[str], cfg: TrustConfig) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """trust.json-style parameters for the members and their ensemble (mean of raw member probabilities), plus
    the validation labels and calibrated ensemble probabilities (the melanoma threshold is chosen on these)."""
    y, probs = validation_probabilities(study, names)
    ens = np.mean(list(probs.values()), axis=0)
    trust = fit_trust(y, {**probs, ENSEMBLE: ens}, cfg)
    trust["source"] = f"validation split of {study}"
    return trust, y, calibrate_probs(ens, trust["models"][ENSEMBLE]["temperature"])


def study_frames(study: Path, data: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training and validation rows (image_id, label, path) of a study, from its splits.csv and dataset.json."""
    from lesionlab.data.split import read_split
    from lesionlab.data.subsets import subset_frame
    from lesionlab.data.tables import read_table

    study = Path(study)
    metadata = None
    if data is None:
        ds = study / "dataset.json"
        if not ds.exists():
            raise UserError(f"{study}: no dataset.json to find the images; pass --data")
        metadata = Path(json.loads(ds.read_text())["source"])
        data = metadata.parent
    if not Path(data).is_dir():
        raise UserError(f"the study's images are not at {data}; pass --data DATA (or --no-ood)")
    table = read_table(data, metadata if metadata is not None and metadata.exists() else None)
    sp = read_split(study / "splits.csv")
    return subset_frame(table, sp, "train"), subset_frame(table, sp, "val")


def fit_bundle_ood(predictors: list, study: Path, cfg: OODConfig, out_dir: Path, *,
                   data: Path | None = None, batch_size: int = 32, progress: bool = True) -> dict[str, Any] | None:
    """Fit the OOD model for the bundle's members and save its arrays in `out_dir`; the manifest entry."""
    if cfg.method == "none":
        return None
    train, val = study_frames(study, data)
    model = fit_ood(predictors, train, val, cfg, batch_size=batch_size, progress=progress)
    model.save(out_dir)
    return model.manifest_entry()


def refusal_reasons(codes_reasons: list[tuple[str, str]]) -> dict[str, Any]:
    advice = list(dict.fromkeys(ADVICE[c] for c, _ in codes_reasons))
    return {"status": "unevaluable", "reasons": [r for _, r in codes_reasons], "reason_codes": [c for c, _ in codes_reasons],
            "advice": advice}


class BundleTrust:
    """The trust parts of a loaded bundle, applied to the members' outputs for a batch of images."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.quality: QualityConfig = thresholds_from_dict(manifest.get("quality"))
        self.trust: dict[str, Any] | None = manifest.get("trust")
        self.ood: OODModel | None = OODModel.load(root, manifest["ood"]) if manifest.get("ood") else None
        self.sets = ConformalSets.from_dict(self.trust["models"][ENSEMBLE]["conformal"]) if self.trust else None

    def temperature(self, name: str) -> float:
        return float(self.trust["models"][name]["temperature"]) if self.trust else 1.0

    def member_outputs(self, members: list, images: list[Image.Image], *, tta: bool = False,
                       metadata: list[dict] | None = None) -> dict[str, dict]:
        return {pr.name: image_outputs(pr, images, tta=tta, metadata=metadata) for pr in members}

    def screen(self, images: list[Image.Image], outputs: dict[str, dict]
               ) -> tuple[list[dict[str, Any] | None], np.ndarray | None]:
        """Per image None (evaluable) or the refusal (status, reasons, reason_codes, advice); and the OOD scores."""
        ood_scores = self.ood.score({n: o["features"] for n, o in outputs.items()}) if self.ood else None
        out: list[dict[str, Any] | None] = []
        for k, im in enumerate(images):
            issues = [(i.code, i.reason) for i in check_quality(im, self.quality)]
            if not issues and ood_scores is not None and ood_scores[k] > self.ood.threshold:
                issues.append(("out_of_distribution", "The image does not look like the dermoscopy images the models "
                               f"were trained on (unusualness score {ood_scores[k]:.2f}, limit {self.ood.threshold:.2f})."))
            out.append(refusal_reasons(issues) if issues else None)
        return out, ood_scores

    def calibrated(self, outputs: dict[str, dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Calibrated ensemble probabilities (N, 7) and calibrated member probabilities."""
        raw = {n: o["probs"] for n, o in outputs.items()}
        ens = calibrate_probs(np.mean(list(raw.values()), axis=0), self.temperature(ENSEMBLE))
        # trust.json keys members by file stem (`timm:resnet18` -> `timm_resnet18`), as the study's prediction files
        members = {n: calibrate_probs(p, self.temperature(file_stem(n))) if self.trust and file_stem(n) in
                   self.trust["models"] else p for n, p in raw.items()}
        return ens, members

    def differential(self, probs: np.ndarray) -> list[list[str]] | None:
        return self.sets.differential(probs) if self.sets is not None else None

    def describe(self) -> dict[str, Any]:
        """What /api/health and predict's JSON say about the trust parts."""
        return {
            "calibrated": bool(self.trust and self.trust["config"].get("calibration", True)),
            "ensemble_temperature": self.temperature(ENSEMBLE),
            "differential_coverage": self.sets.coverage if self.sets else None,
            "differential_method": (f"{self.sets.method}{' (per class)' if self.sets.mondrian else ''}"
                                    if self.sets else None),
            "ood_threshold": self.ood.threshold if self.ood else None,
            "quality": self.quality.__dict__,
        }
