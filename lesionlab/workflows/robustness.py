"""Acquisition robustness and lesion consistency of trained models on a table of images, written to a folder.

The `lesionlab robustness` command and the study's robustness step call `run_robustness`; the study's
consistency numbers can also come from stored test predictions alone (`write_consistency`, no torch needed).

Outputs in the folder: robustness.csv (one row per model x perturbation x severity), robustness_summary.csv,
robustness_<metric>.png (metric vs severity), lesion_consistency.csv, lesion_metrics.csv (image- vs
lesion-level metrics with lesion-bootstrap CIs) and robustness.json (settings and counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.config import StudyConfig
from lesionlab.evaluation.consistency import consistency_table, image_vs_lesion
from lesionlab.evaluation.ensemble import ENSEMBLE
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_csv, atomic_write_json
from lesionlab.labels import CLASS_INDEX, metric_title

PLOTTED = ("flip_rate", "delta_balanced_accuracy", "delta_mel_sensitivity", "delta_macro_auc")


def model_dirs(paths: list[Path]) -> list[Path]:
    """Checkpoint folders from run folders, model folders or a bundle folder (its members)."""
    from lesionlab.inference.predictor import find_checkpoints

    return find_checkpoints([p / "members" if (p / "manifest.json").exists() else p for p in map(Path, paths)])


def sample_rows(df: pd.DataFrame, max_images: int, seed: int) -> pd.DataFrame:
    """At most `max_images` rows, a seeded random sample in the table's order (all rows for 0)."""
    if not max_images or len(df) <= max_images:
        return df
    return df.sample(n=max_images, random_state=seed).sort_index()


def labels_of(df: pd.DataFrame, classes: Sequence[str] | None = None) -> np.ndarray | None:
    """Class indices of the rows (in `classes`, default ham7's), or None when any row is unlabelled (then only flip
    rates are reported)."""
    index = CLASS_INDEX if classes is None else {c: i for i, c in enumerate(classes)}
    if "label" not in df or not df["label"].isin(list(index)).all():
        return None
    return np.array([index[c] for c in df["label"]])


def write_consistency(out_dir: str | Path, lesion_ids: np.ndarray, probs: Mapping[str, np.ndarray], y: np.ndarray | None,
                      *, n_boot: int, ci: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """lesion_consistency.csv (per model) and, with labels, lesion_metrics.csv (image vs lesion level)."""
    out = Path(out_dir)
    cons = consistency_table(lesion_ids, probs, y, n_boot=n_boot, ci=ci, seed=seed)
    atomic_write_csv(out / "lesion_consistency.csv", cons)
    frames = []
    if y is not None:
        for name, p in probs.items():
            t = image_vs_lesion(lesion_ids, y, p, n_boot=n_boot, ci=ci, seed=seed)
            t.insert(0, "model", name)
            frames.append(t)
    lm = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    atomic_write_csv(out / "lesion_metrics.csv", lm)
    return cons, lm


def run_robustness(
    checkpoints: list[Path],
    df: pd.DataFrame,
    out_dir: str | Path,
    cfg: StudyConfig,
    *,
    lesion_ids: np.ndarray | None = None,
    consistency: bool = True,
    plots: tuple[str, ...] = PLOTTED,
    progress: bool = True,
) -> dict[str, Any]:
    """Perturbed inference over a sample of `df` (config `robustness`), consistency over all of it; tables + plots.

    Args:
        df: rows with `path` (and `label`, `lesion_id` for metrics and consistency).
        lesion_ids: one per row of `df` (default: its `lesion_id` column); e.g. the split file's `group_id`,
            which also joins known duplicates.
        consistency: also predict every row unperturbed and write the lesion consistency files (the study
            computes those from its stored test predictions instead).
        plots: the columns of robustness.csv drawn against severity (robustness_<column>.png).

    Returns:
        The robustness.json body.
    """
    from lesionlab.data.perturbations import conditions, get_perturbation
    from lesionlab.evaluation.ensemble import mean_probabilities
    from lesionlab.evaluation.robustness import robustness_table, summarize_robustness
    from lesionlab.inference.perturbed import predict_perturbed
    from lesionlab.inference.predictor import load_predictors
    from lesionlab.report.figures import plot_robustness

    rc, out = cfg.robustness, Path(out_dir)
    if len(df) == 0:
        raise UserError("no images to test robustness on (is the subset empty?)")
    out.mkdir(parents=True, exist_ok=True)
    conds = conditions(rc.perturbations or None, max_levels=rc.max_levels)
    predictors = load_predictors(checkpoints, device=cfg.train.device, precision=cfg.train.precision)
    df = df.reset_index(drop=True)
    y_all = labels_of(df, predictors[0].classes)
    # Consistency needs every image of a lesion: clean predictions for all rows.
    full = {p.name: p.predict_frame(df, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, tta=rc.tta,
                                    progress=progress) for p in predictors} if consistency else {}
    sample = sample_rows(df, rc.max_images, rc.seed)
    clean, pert = predict_perturbed(predictors, sample, conds, seed=rc.seed, tta=rc.tta, chunk=cfg.data.batch_size,
                                    num_workers=cfg.data.num_workers, max_pixels=cfg.data.max_image_pixels,
                                    progress=progress)
    if len(predictors) > 1:
        for d in (full, clean) if consistency else (clean,):
            d[ENSEMBLE] = mean_probabilities([d[p.name] for p in predictors])
        pert[ENSEMBLE] = {k: mean_probabilities([pert[p.name][k] for p in predictors]) for k in pert[predictors[0].name]}
    table = robustness_table(labels_of(sample, predictors[0].classes), clean, pert)
    table["identity"] = [get_perturbation(n).identity if n != "none" else np.nan for n in table["perturbation"]]
    table["tta"] = rc.tta
    atomic_write_csv(out / "robustness.csv", table)
    atomic_write_csv(out / "robustness_summary.csv", summarize_robustness(table))
    for metric in plots:
        if table[metric].notna().any():
            plot_robustness(table, metric, out / f"robustness_{metric}.png", labels=cfg.data.labels,
                            title=f"{metric_title(metric, cfg.data.labels)} vs severity ({len(sample)} images{', TTA' if rc.tta else ''})")
    cons = pd.DataFrame()
    if consistency:
        lids = np.asarray(lesion_ids if lesion_ids is not None else df.get("lesion_id", df.index.astype(str)))
        cons, _ = write_consistency(out, lids, full, y_all, n_boot=cfg.eval.bootstrap, ci=cfg.eval.ci, seed=rc.seed)
    info = {
        "images": len(df), "perturbed_images": len(sample), "conditions": len(conds), "tta": rc.tta, "seed": rc.seed,
        "perturbations": sorted({c[0] for c in conds}), "models": [p.name for p in predictors],
        "color_constancy": {p.name: p.meta.get("color_constancy", "none") for p in predictors},
        "multi_image_lesions": int(cons["lesions"].iloc[0]) if len(cons) else 0,
    }
    atomic_write_json(out / "robustness.json", info)
    return info


def consistency_from_files(truth: Path, preds: list[Path], lesions: Path, out_dir: str | Path, *,
                           names: list[str] | None = None, ensemble: bool = False, n_boot: int = 1000, ci: float = 0.95,
                           seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`write_consistency` from ISIC prediction CSVs and a lesion table (image_id + group_id or lesion_id)."""
    from lesionlab.data.isic_csv import align, read_isic_csv
    from lesionlab.evaluation.ensemble import mean_probabilities

    names = list(names or [Path(p).stem for p in preds])
    if len(names) != len(preds):
        raise UserError(f"{len(names)} names given for {len(preds)} prediction files")
    t = read_isic_csv(truth, kind="truth")
    probs, y, ids = {}, None, None
    for n, f in zip(names, preds, strict=True):
        y, probs[n], ids = align(t, read_isic_csv(f, kind="prediction"), truth_name=str(truth), pred_name=str(f))
    if ensemble and len(probs) > 1:
        probs[ENSEMBLE] = mean_probabilities(list(probs.values()))
    les = pd.read_csv(lesions, dtype=str, keep_default_na=False)
    col = next((c for c in ("group_id", "lesion_id") if c in les.columns), None)
    if "image_id" not in les.columns or col is None:
        raise UserError(f"{lesions}: needs columns image_id and group_id or lesion_id (a split file has them)")
    group_of = dict(zip(les["image_id"], les[col], strict=True))
    missing = [i for i in ids if i not in group_of]
    if missing:
        raise UserError(f"{lesions}: {len(missing)} predicted images have no lesion id (first: {missing[0]})")
    return write_consistency(out_dir, np.array([group_of[i] for i in ids]), probs, y, n_boot=n_boot, ci=ci, seed=seed)
