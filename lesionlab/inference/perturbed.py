"""Probabilities of models on perturbed copies of a table's images (the runner behind `lesionlab robustness`).

Each image is decoded once; every perturbation (lesionlab.data.perturbations) acts on the decoded source
image, and then each model's own preprocessing (its checkpoint's framing, crop, colour constancy and
normalisation) runs on the result, as it would on a photograph taken that way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lesionlab import runtime
from lesionlab.data.cache import pil_to_uint8_tensor
from lesionlab.data.images import DEFAULT_MAX_PIXELS, load_image
from lesionlab.data.perturbations import get_perturbation, perturbation_rng
from lesionlab.inference.predictor import Predictor
from lesionlab.labels import CLASSES

Condition = tuple[str, int, float]  # (perturbation name, level index, level)


class _PerturbedImages(torch.utils.data.Dataset):
    """Item i: image i and its perturbed copies, through each distinct model preprocessing.

    Returns one float tensor (1 + conditions, 3, h, w) per transform; decoding, perturbing and preprocessing all
    run in the DataLoader workers.
    """

    def __init__(self, paths: list[str], conditions: Sequence[Condition], transforms: list, *, seed: int, max_pixels: int):
        self.paths, self.conditions, self.transforms = paths, list(conditions), transforms
        self.seed, self.max_pixels = seed, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        img = pil_to_uint8_tensor(load_image(self.paths[i], max_pixels=self.max_pixels))
        views = [img] + [get_perturbation(name)(img, level, perturbation_rng(self.seed, name, li, i))
                         for name, li, level in self.conditions]
        return [torch.stack([tf(v) for v in views]) for tf in self.transforms]


def predict_perturbed(
    predictors: Sequence[Predictor],
    df: pd.DataFrame,
    conditions: Sequence[Condition],
    *,
    seed: int = 0,
    tta: bool = False,
    chunk: int = 64,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, dict[tuple[str, float], np.ndarray]]]:
    """Clean and perturbed probabilities of every predictor for the rows of `df` (needs a `path` column; a fused
    model also reads its metadata columns, as `Predictor.predict_frame` does).

    Args:
        conditions: (name, level index, level) triples, e.g. from `perturbations.conditions()`.
        seed: seeds the random perturbations per (perturbation, severity, image row), independent of batching.
        chunk: images predicted together (each with all its perturbed copies).
        num_workers: DataLoader processes that decode, perturb and preprocess (the costly part on CPU).

    Returns:
        ({model: (N, K) clean}, {model: {(name, level): (N, K)}}).
    """
    names = [p.name for p in predictors]
    specs = list(dict.fromkeys(p.spec for p in predictors))  # models that share preprocessing share its work
    keys = [None] + [(c[0], c[2]) for c in conditions]
    parts: dict[str, list[list[np.ndarray]]] = {n: [[] for _ in keys] for n in names}
    tfs = [next(p.transform for p in predictors if p.spec == s) for s in specs]
    ds = _PerturbedImages(df["path"].tolist(), conditions, tfs, seed=seed, max_pixels=max_pixels)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=runtime.worker_count(num_workers))
    bar = tqdm(total=len(ds), desc=f"robustness ({len(keys)} conditions)", unit="img", disable=not progress)
    pending: list[list[torch.Tensor]] = []
    # A fused model reads the rows' metadata (age, sex, site ...; absent columns count as missing): a perturbed
    # photograph is still of the same patient, so every copy of an image gets that image's metadata.
    meta = {pr.name: torch.from_numpy(pr.encoding.encode(df)[0]) for pr in predictors if pr.encoding is not None}
    done = 0

    def flush() -> None:
        nonlocal done
        for pr in predictors:
            u = specs.index(pr.spec)
            x = torch.stack([item[u] for item in pending], dim=1)  # (S, B, 3, h, w)
            m = meta[pr.name][done:done + len(pending)] if pr.name in meta else None
            for s in range(len(keys)):
                parts[pr.name][s].append(pr.predict_batch(x[s], tta=tta, meta=m))
        done += len(pending)
        bar.update(len(pending))
        pending.clear()

    for item in loader:
        pending.append(item)
        if len(pending) == chunk:
            flush()
    if pending:
        flush()
    bar.close()

    def cat(p: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(p) if p else np.zeros((0, len(CLASSES)))

    clean = {n: cat(parts[n][0]) for n in names}
    pert = {n: {k: cat(parts[n][s]) for s, k in enumerate(keys) if k is not None} for n in names}
    return clean, pert
