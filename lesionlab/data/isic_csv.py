"""ISIC 2018 Task 3 CSV format (image + one column per class): read with checks, write atomically, align.

The class columns are the run's label set (lesionlab.labels), ham7's seven by default; `align` takes them from the
truth file, so it works for any label set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lesionlab.data.tables import read_csv_checked
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_csv
from lesionlab.labels import CLASSES


def probs_frame(image_ids: Iterable[str], probs: np.ndarray, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    df = pd.DataFrame(np.asarray(probs, float), columns=list(classes))
    df.insert(0, "image", list(image_ids))
    return df


def truth_frame(df: pd.DataFrame, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """One-hot ground truth in ISIC 2018 Task 3 format from a table with image_id and label."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(df["label"]) - set(index))
    if unknown:
        raise UserError(f"label {unknown[0]!r} is not one of the classes {', '.join(classes)}")
    onehot = np.zeros((len(df), len(classes)))
    onehot[np.arange(len(df)), [index[c] for c in df["label"]]] = 1.0
    return probs_frame(df["image_id"], onehot, classes)


def write_isic_csv(path: str | Path, frame: pd.DataFrame) -> None:
    # 9 significant digits round-trip a float32 softmax exactly; fixed decimals turned small probabilities into 0,
    # and temperature scaling works from log(p) (evaluation/calibration.py).
    atomic_write_csv(Path(path), frame, float_format="%.9g", lineterminator="\n")


def read_isic_csv(path: str | Path, *, kind: str, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Read an ISIC-format CSV (image + one column per class of `classes`), checking values; `kind` is 'truth' or
    'prediction'.

    Args:
        classes: the class columns, in order; None: ham7's when the file has them all, else every column but
            `image` (a file of another label set), in the file's order.
    """
    path = Path(path)
    df = read_csv_checked(path, kind, dtype={"image": str})
    if classes is None:
        others = [c for c in df.columns if c != "image"]
        classes = list(CLASSES) if set(CLASSES) <= set(others) or not others else others
    classes = list(classes)
    missing = [c for c in ("image", *classes) if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing columns {', '.join(missing)}; expected image,{','.join(classes)}")
    dup = df["image"][df["image"].duplicated()]
    if len(dup):
        raise UserError(f"{path}: image {dup.iloc[0]} appears twice (row {dup.index[0] + 2})")
    vals = df[classes].apply(pd.to_numeric, errors="coerce")
    bad = vals.isna().any(axis=1) | ~np.isfinite(vals.to_numpy(dtype=float, na_value=np.nan)).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{path}: row {i + 2} ({df['image'].iloc[i]}) has a non-numeric or missing value")
    arr = vals.to_numpy(float)
    if kind == "truth":
        ok = np.isclose(arr.sum(1), 1) & np.isclose(arr.max(1), 1) & np.isin(arr, [0.0, 1.0]).all(1)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise UserError(f"{path}: row {i + 2} ({df['image'].iloc[i]}) must have exactly one label set to 1")
    elif (arr < 0).any():
        i = int(np.flatnonzero((arr < 0).any(1))[0])
        raise UserError(f"{path}: row {i + 2} ({df['image'].iloc[i]}) has a negative probability")
    out = pd.DataFrame(arr, columns=classes)
    out.insert(0, "image", df["image"].str.strip().to_numpy())
    return out


def align(truth: pd.DataFrame, pred: pd.DataFrame, *, truth_name: str = "truth", pred_name: str = "prediction") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(y_true, probs, image ids) in truth order; the two files must cover the same images."""
    t_ids, p_ids = set(truth["image"]), set(pred["image"])
    if t_ids != p_ids:
        miss = sorted(t_ids - p_ids)
        extra = sorted(p_ids - t_ids)
        parts = []
        if miss:
            parts.append(f"{len(miss)} images of {truth_name} have no prediction (first: {', '.join(miss[:3])})")
        if extra:
            parts.append(f"{len(extra)} predicted images are not in {truth_name} (first: {', '.join(extra[:3])})")
        raise UserError(f"{pred_name} and {truth_name} cover different images: " + "; ".join(parts))
    classes = [c for c in truth.columns if c != "image"]  # read_isic_csv keeps exactly the class columns
    p = pred.set_index("image").loc[truth["image"], classes].to_numpy(float)
    y = truth[classes].to_numpy(float).argmax(1)
    return y, p, truth["image"].tolist()

