"""The out-of-distribution model a bundle's refusal uses: fitted on the members' penultimate features.

`fit_ood` draws a class-balanced sample of the training split, fits one Mahalanobis model per member on its
penultimate features (lesionlab.evaluation.ood), scales each member's score by its validation median so that
members weigh alike, averages them into the ensemble score, and picks the threshold on the validation split
that lets `target_tpr` of its images pass. `OODModel` holds all that and is stored in bundles (arrays in one
safetensors file, numbers in the manifest).

The refusal decision itself (quality first, then this model's score) is lesionlab.clinic.screening.refusal;
measuring it: images the models should refuse in lesionlab.data.ood_images, the study's summary and histogram in
lesionlab.workflows.refusal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.config import OODConfig
from lesionlab.evaluation.ood import MahalanobisStats, fit_mahalanobis, mahalanobis_score, threshold_for_tpr
from lesionlab.exceptions import UserError
from lesionlab.inference.outputs import frame_outputs
from lesionlab.inference.predictor import Predictor
from lesionlab.labels import CLASS_INDEX

OOD_FILE = "ood.safetensors"


def balanced_sample(df: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """At most `per_class` rows of each label, drawn with a seeded generator (all rows of smaller classes)."""
    parts = [g.sample(n=min(per_class, len(g)), random_state=seed) if per_class > 0 else g
             for _, g in df.groupby("label", sort=True)]
    return pd.concat(parts).sort_index()


@dataclass
class OODModel:
    """Per-member Mahalanobis statistics, their ensemble and the refusal threshold."""

    members: dict[str, MahalanobisStats]
    threshold: float
    target_tpr: float = 0.95
    method: str = "mahalanobis"
    info: dict[str, Any] = field(default_factory=dict)

    def member_scores(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: mahalanobis_score(features[n], s) for n, s in self.members.items()}

    def score(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Ensemble OOD score: the mean of the members' validation-scaled squared Mahalanobis distances."""
        return np.mean(list(self.member_scores(features).values()), axis=0)

    def manifest_entry(self) -> dict[str, Any]:
        return {"method": self.method, "threshold": self.threshold, "target_tpr": self.target_tpr,
                "file": OOD_FILE, "members": {n: s.meta() for n, s in self.members.items()}, **self.info}

    def save(self, folder: Path) -> Path:
        from safetensors.numpy import save_file

        arrays = {f"{n}.{k}": np.ascontiguousarray(v) for n, s in self.members.items() for k, v in s.arrays().items()}
        path = Path(folder) / OOD_FILE
        tmp = path.with_suffix(".tmp")
        save_file(arrays, str(tmp))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: Path, entry: dict[str, Any]) -> OODModel:
        from safetensors.numpy import load_file

        arrays = load_file(str(Path(folder) / entry["file"]))
        members = {n: MahalanobisStats.from_parts({k: arrays[f"{n}.{k}"] for k in ("whiten", "means")}, meta)
                   for n, meta in entry["members"].items()}
        info = {k: v for k, v in entry.items() if k not in {"method", "threshold", "target_tpr", "file", "members"}}
        return cls(members=members, threshold=float(entry["threshold"]), target_tpr=float(entry["target_tpr"]),
                   method=entry["method"], info=info)


def fit_ood(predictors: list[Predictor], train_df: pd.DataFrame, val_df: pd.DataFrame, cfg: OODConfig, *,
            batch_size: int = 32, num_workers: int = 0, progress: bool = True,
            return_val: bool = False) -> OODModel | tuple[OODModel, dict[str, np.ndarray]]:
    """Fit the members' Mahalanobis models on a class-balanced training sample; threshold on validation.

    With `return_val`, also the validation outputs (`{name: frame_outputs(...)}`), e.g. for a benchmark.
    """
    if cfg.method != "mahalanobis":
        raise UserError(f"ood.method {cfg.method!r} cannot be fitted; valid: mahalanobis (or none to switch it off)")
    if len(train_df) == 0 or len(val_df) == 0:
        raise UserError("the OOD refusal needs training and validation images; set ood.method=none to skip it")
    fit_df = balanced_sample(train_df, cfg.fit_per_class, cfg.seed)
    index = predictors[0].label_set.index if predictors else CLASS_INDEX  # the members' classes
    y = fit_df["label"].map(index).to_numpy()
    members: dict[str, MahalanobisStats] = {}
    val_out: dict[str, dict[str, np.ndarray]] = {}
    for pr in predictors:
        feats = frame_outputs(pr, fit_df, batch_size=batch_size, num_workers=num_workers, progress=progress,
                              desc=f"OOD fit {pr.name}")["features"]
        stats = fit_mahalanobis(feats, y)
        val_out[pr.name] = frame_outputs(pr, val_df, batch_size=batch_size, num_workers=num_workers,
                                         progress=progress, desc=f"OOD validation {pr.name}")
        stats.scale = float(np.median(mahalanobis_score(val_out[pr.name]["features"], stats))) or 1.0
        members[pr.name] = stats
    model = OODModel(members=members, threshold=0.0, target_tpr=cfg.target_tpr)
    val_scores = model.score({n: o["features"] for n, o in val_out.items()})
    model.threshold = threshold_for_tpr(val_scores, cfg.target_tpr)
    model.info = {"fit_images": len(fit_df), "validation_images": len(val_df),
                  "validation_refused": float(np.mean(val_scores > model.threshold)),
                  "fit_per_class": cfg.fit_per_class, "seed": cfg.seed}
    return (model, val_out) if return_val else model
