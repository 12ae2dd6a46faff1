"""Ensembles: the (weighted) mean of member probabilities. No training involved."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lesionlab.exceptions import UserError
from lesionlab.labels import CLASSES

ENSEMBLE = "ensemble"  # the member name the study, bundles and reports use for the probability mean


def mean_probabilities(members: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of (N, K) probability arrays; equal weights by default; weights are normalised to sum 1."""
    if not members:
        raise UserError("an ensemble needs at least one member")
    shapes = {np.shape(m) for m in members}
    if len(shapes) != 1:
        raise UserError(f"ensemble members have different shapes: {sorted(shapes)}")
    w = np.ones(len(members)) if weights is None else np.asarray(weights, float)
    if len(w) != len(members):
        raise UserError(f"{len(w)} weights given for {len(members)} members")
    if (w < 0).any() or w.sum() <= 0:
        raise UserError("ensemble weights must be >= 0 and not all zero")
    w = w / w.sum()
    return np.tensordot(w, np.stack([np.asarray(m, float) for m in members]), axes=1)


def ensemble_frames(frames: Sequence[pd.DataFrame], weights: Sequence[float] | None = None, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean of ISIC-format prediction frames over the same images (rows aligned by image id)."""
    names = list(names or [f"member {i + 1}" for i in range(len(frames))])
    ref = frames[0]["image"].tolist()
    arrays = []
    for name, f in zip(names, frames, strict=True):
        if set(f["image"]) != set(ref):
            diff = sorted(set(ref) ^ set(f["image"]))
            raise UserError(f"{name} covers other images than {names[0]} (first difference: {diff[0]})")
        arrays.append(f.set_index("image").loc[ref, list(CLASSES)].to_numpy(float))
    out = pd.DataFrame(mean_probabilities(arrays, weights), columns=list(CLASSES))
    out.insert(0, "image", ref)
    return out

