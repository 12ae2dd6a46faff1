"""Percentile bootstrap confidence intervals that resample lesions (groups), not images."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lesionlab.evaluation.metrics import _f, flat_metrics


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    stat: Callable[[np.ndarray, np.ndarray], dict[str, float]] = flat_metrics,
) -> dict[str, dict[str, float | None]]:
    """Percentile bootstrap CIs of `stat`; resamples whole groups (lesions) when `groups` is given.

    Returns:
        {name: {"value", "lo", "hi"}}; lo/hi are None when too few resamples define the statistic.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    point = stat(y_true, probs)
    rng = np.random.default_rng(seed)
    if groups is None:
        groups = np.arange(len(y_true))
    codes, inv = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(codes))]
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        pick = rng.integers(0, len(codes), len(codes))
        idx = np.concatenate([members[g] for g in pick])
        for k, v in stat(y_true[idx], probs[idx]).items():
            samples[k].append(v)
    alpha = (1 - ci) / 2
    out = {}
    for k, v in point.items():
        s = np.asarray(samples[k], float)
        s = s[np.isfinite(s)]
        ok = len(s) >= max(10, n_boot // 2)
        out[k] = {
            "value": _f(v),
            "lo": float(np.quantile(s, alpha)) if ok else None,
            "hi": float(np.quantile(s, 1 - alpha)) if ok else None,
        }
    return out

