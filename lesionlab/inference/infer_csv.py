"""Probability CSVs of trained models for a table of images, as `lesionlab infer` writes them (ISIC 2018 Task 3)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lesionlab.data.isic_csv import probs_frame, truth_frame, write_isic_csv
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASSES
from lesionlab.models import file_stem


def write_probability_csvs(probs: dict[str, np.ndarray], df: pd.DataFrame,
                           out: Path, classes: Sequence[str] = CLASSES) -> tuple[list[Path], Path | None]:
    """Each model's probabilities for the rows of `df`, and the ground truth when every row has a label.

    Args:
        probs: {model name: (N, K)} for the N rows of `df` (which needs `image_id` and `label`).
        classes: the K classes (the models' label set, `Predictor.classes`).
        out: the CSV for one model (truth beside it, `<stem>_truth.csv`), or a folder that gets `<model>.csv`
            per model and `truth.csv`.

    Returns:
        The prediction files written, and the truth file (None when a row has no label).

    Raises:
        UserError: several models and `out` names a CSV file.
    """
    single = len(probs) == 1 and out.suffix == ".csv"
    if len(probs) > 1 and out.suffix == ".csv":
        raise UserError(f"--run holds {len(probs)} models; give a folder as --out (one CSV per model)")
    written = []
    for name, pr in probs.items():
        dest = out if single else out / f"{file_stem(name)}.csv"
        write_isic_csv(dest, probs_frame(df["image_id"], pr, classes))
        written.append(dest)
    truth = None
    if (df["label"] != "").all():
        truth = out.with_name(out.stem + "_truth.csv") if single else out / "truth.csv"
        write_isic_csv(truth, truth_frame(df, classes))
    return written, truth
