"""Lesion-level consistency and lesion-level prediction (pure functions over arrays).

HAM10000 holds several photographs of many lesions (other angles, zoom levels, days). A model that reads the
lesion and not the photograph gives all of them the same class. Here:

- consistency: among lesions with at least two images, the share whose images all get the same predicted class
  (and the share whose images are all correct), with a percentile bootstrap CI over those lesions;
- lesion-level prediction: the mean probability over a lesion's images, scored once per lesion, beside the
  image-level scores; both CIs resample lesions (lesionlab.evaluation.bootstrap), so they are comparable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from lesionlab.evaluation.bootstrap import bootstrap_ci
from lesionlab.evaluation.metrics import rank_auc
from lesionlab.evaluation.robustness import condition_metrics
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASS_INDEX, names_for

KEY_METRICS = ("balanced_accuracy", "mel_sensitivity", "macro_auc", "mel_auc")


def lesion_table(lesion_ids: np.ndarray, probs: np.ndarray, y_true: np.ndarray | None = None,
                 classes: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per lesion: images, distinct predicted classes, whether all agree (and all are correct)."""
    lesion_ids, probs = np.asarray(lesion_ids), np.asarray(probs, float)
    if len(lesion_ids) != len(probs):
        raise ValueError(f"{len(lesion_ids)} lesion ids for {len(probs)} probability rows")
    names = names_for(probs.shape[1], classes)
    df = pd.DataFrame({"lesion_id": lesion_ids, "pred": probs.argmax(1)})
    if y_true is not None:
        df["correct"] = df["pred"].to_numpy() == np.asarray(y_true, int)
    g = df.groupby("lesion_id", sort=True)
    out = pd.DataFrame({"n_images": g.size(), "n_classes": g["pred"].nunique(),
                        "classes": g["pred"].agg(lambda s: ",".join(names[k] for k in sorted(set(s))))})
    out["consistent"] = out["n_classes"] == 1
    if y_true is not None:
        out["all_correct"] = g["correct"].all()
    return out.reset_index()


def _share_ci(flags: np.ndarray, *, n_boot: int, ci: float, seed: int) -> dict[str, float | None]:
    """Share of True with a percentile bootstrap CI (each flag is one lesion, so rows are resampled)."""
    flags = np.asarray(flags, float)
    if not len(flags):
        return {"value": None, "lo": None, "hi": None}
    if n_boot <= 0:
        return {"value": float(flags.mean()), "lo": None, "hi": None}
    res = bootstrap_ci(flags, np.zeros((len(flags), 1)), n_boot=n_boot, ci=ci, seed=seed,
                       stat=lambda y, _p: {"share": float(np.mean(y))})
    return res["share"]


def consistency(lesion_ids: np.ndarray, probs: np.ndarray, y_true: np.ndarray | None = None, *,
                n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict[str, float | int | None]:
    """Consistency over lesions with >= 2 images: counts, consistent share (CI), all-correct share (CI)."""
    t = lesion_table(lesion_ids, probs, y_true)
    multi = t[t["n_images"] >= 2]
    out: dict[str, float | int | None] = {"lesions": int(len(multi)), "images": int(multi["n_images"].sum())}
    c = _share_ci(multi["consistent"].to_numpy(), n_boot=n_boot, ci=ci, seed=seed)
    out.update({"consistent_share": c["value"], "consistent_lo": c["lo"], "consistent_hi": c["hi"]})
    if y_true is not None:
        a = _share_ci(multi["all_correct"].to_numpy(), n_boot=n_boot, ci=ci, seed=seed)
        out.update({"all_correct_share": a["value"], "all_correct_lo": a["lo"], "all_correct_hi": a["hi"]})
    return out


def consistency_table(lesion_ids: np.ndarray, probs_by_model: Mapping[str, np.ndarray], y_true: np.ndarray | None = None,
                      *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """`consistency` for each model (and the ensemble, if given as a member of the mapping)."""
    return pd.DataFrame([{"model": m, **consistency(lesion_ids, p, y_true, n_boot=n_boot, ci=ci, seed=seed)}
                         for m, p in probs_by_model.items()])


def lesion_level(lesion_ids: np.ndarray, y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lesion ids, class per lesion, mean probability over the lesion's images), sorted by lesion id.

    Raises:
        UserError: a lesion whose images carry different labels (the lesion-level truth would be undefined).
    """
    cols = [f"p{k}" for k in range(np.asarray(probs).shape[1])]
    df = pd.DataFrame(np.asarray(probs, float), columns=cols)
    df["lesion_id"], df["y"] = np.asarray(lesion_ids), np.asarray(y_true, int)
    g = df.groupby("lesion_id", sort=True)
    mixed = g["y"].nunique()
    if (mixed > 1).any():
        raise UserError(f"lesion {mixed[mixed > 1].index[0]} has images with different labels; "
                        "lesion-level metrics need one label per lesion")
    return g.size().index.to_numpy(), g["y"].first().to_numpy(), g[cols].mean().to_numpy()


def key_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, MEL sensitivity, macro AUC and MEL AUC (the bootstrap statistic here)."""
    out = condition_metrics(y_true, probs)
    out["mel_auc"] = rank_auc(np.asarray(y_true) == CLASS_INDEX["MEL"], np.asarray(probs)[:, CLASS_INDEX["MEL"]])
    return out


def image_vs_lesion(lesion_ids: np.ndarray, y_true: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000,
                    ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Key metrics per image and per lesion (mean probability), each with a bootstrap CI over lesions.

    Returns:
        Rows (level, metric, value, lo, hi, n) with level `image` or `lesion`.
    """
    rows = []
    ids, y_l, p_l = lesion_level(lesion_ids, y_true, probs)
    for level, y, p, groups in [("image", np.asarray(y_true, int), np.asarray(probs, float), np.asarray(lesion_ids)),
                                ("lesion", y_l, p_l, None)]:
        res = bootstrap_ci(y, p, groups=groups, n_boot=n_boot, ci=ci, seed=seed, stat=key_metrics)
        rows += [{"level": level, "metric": m, **res[m], "n": len(y)} for m in KEY_METRICS]
    return pd.DataFrame(rows)
