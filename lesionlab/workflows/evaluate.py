"""`lesionlab evaluate` and `lesionlab subgroups` on files: ISIC-format CSVs in, a metrics folder out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.config import EvalConfig
from lesionlab.data.isic_csv import align, read_isic_csv
from lesionlab.data.metadata import MISSING, read_metadata
from lesionlab.evaluation.evaluate import evaluate_arrays
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_csv
from lesionlab.labels import label_set_for_classes
from lesionlab.report.evaluation_files import write_evaluation, write_subgroups


def lesion_groups(lesions_csv: str | Path | None, image_ids: list[str]) -> np.ndarray | None:
    """Lesion id per image from any CSV with image_id (or image) and lesion_id columns; None without one."""
    if lesions_csv is None:
        return None
    p = Path(lesions_csv)
    if not p.exists():
        raise UserError(f"lesions file {p} does not exist")
    df = pd.read_csv(p, dtype=str, keep_default_na=False)
    key = "image_id" if "image_id" in df.columns else "image"
    if key not in df.columns or "lesion_id" not in df.columns:
        raise UserError(f"{p}: needs columns image_id (or image) and lesion_id")
    m = dict(zip(df[key], df["lesion_id"], strict=False))
    return np.array([m.get(i) or i for i in image_ids])


def evaluate_files(
    truth: str | Path,
    pred: str | Path,
    out_dir: str | Path,
    *,
    cfg: EvalConfig,
    lesions: str | Path | None = None,
    val_truth: str | Path | None = None,
    val_pred: str | Path | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """`lesionlab evaluate`: any pair of ISIC-format CSVs -> metrics folder."""
    y, p, ids = align(read_isic_csv(truth, kind="truth"), read_isic_csv(pred, kind="prediction"),
                      truth_name=str(truth), pred_name=str(pred))
    val = None
    if (val_truth is None) != (val_pred is None):
        raise UserError("give both --val-truth and --val-pred to choose the melanoma threshold on validation")
    if val_truth is not None:
        vy, vp, _ = align(read_isic_csv(val_truth, kind="truth"), read_isic_csv(val_pred, kind="prediction"),
                          truth_name=str(val_truth), pred_name=str(val_pred))
        val = (vy, vp)
    m = evaluate_arrays(y, p, cfg=cfg, groups=lesion_groups(lesions, ids), threshold=threshold, val=val)
    write_evaluation(m, y, p, out_dir, title=Path(pred).stem)
    return m


def subgroup_files(
    truth: str | Path,
    preds: Sequence[str | Path],
    metadata: str | Path,
    out_dir: str | Path,
    *,
    columns: Sequence[str] | None = None,
    lesions: str | Path | None = None,
    names: Sequence[str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    min_images: int = 30,
    mel_threshold: float | None = None,
    plot_metrics: Sequence[str] = ("balanced_accuracy", "MEL_sensitivity", "MEL_auc"),
) -> tuple[pd.DataFrame, list[str]]:
    """`lesionlab subgroups`: `subgroups.csv` (all models) and one forest plot per model in `out_dir`.

    Returns:
        (the table, notes for the user).

    Lesion ids come from `lesions` (any CSV with image_id and lesion_id), else from a `lesion_id` column of
    the metadata, else each image is its own lesion.
    """
    from lesionlab.data.isic_csv import align, read_isic_csv
    from lesionlab.workflows.evaluate import lesion_groups

    meta = read_metadata(metadata)
    out = Path(out_dir)
    names = list(names) if names else [Path(f).stem for f in preds]
    if len(names) != len(preds):
        raise UserError(f"{len(names)} names for {len(preds)} prediction files")
    truth_df = read_isic_csv(truth, kind="truth")
    lset = label_set_for_classes([c for c in truth_df.columns if c != "image"])  # names the flag class
    frames, notes = [], []
    for name, f in zip(names, preds, strict=True):
        y, p, ids = align(truth_df, read_isic_csv(f, kind="prediction"), truth_name=str(truth), pred_name=str(f))
        unknown = sorted(set(ids) - set(meta["image_id"]))
        if len(unknown) == len(ids):
            raise UserError(f"{metadata}: none of the {len(ids)} images of {truth} has a row (first: {ids[0]})")
        groups = lesion_groups(lesions, ids) if lesions else None
        if groups is None and "lesion_id" in meta.columns:
            lookup = dict(zip(meta["image_id"], meta["lesion_id"], strict=True))
            groups = np.array([lookup.get(i) or i for i in ids], dtype=object)
        frames.append(write_subgroups(out, y, {name: p}, ids, meta, groups=groups, columns=columns, n_boot=n_boot,
                                      ci=ci, min_images=min_images, mel_threshold=mel_threshold,
                                      plot_metrics=plot_metrics, csv=False, labels=lset))
        if unknown:
            notes.append(f"{name}: {len(unknown)} of {len(ids)} images have no row in {metadata} "
                         f"(first: {unknown[0]}); they count as '{MISSING}' in every column")
    table = pd.concat(frames, ignore_index=True)
    atomic_write_csv(out / "subgroups.csv", table, float_format="%.4f")
    return table, list(dict.fromkeys(notes))
