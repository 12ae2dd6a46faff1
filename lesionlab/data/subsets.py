"""Tables restricted to one split (train/val/test) and external sets in ISIC ground-truth format."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lesionlab.data.images import find_images
from lesionlab.data.split import SPLITS, check_split, read_split
from lesionlab.data.tables import Table
from lesionlab.data.validation import load_valid_table
from lesionlab.exceptions import UserError
from lesionlab.io import sha256_file


def load_split_tables(
    data: str | Path,
    metadata: str | Path | None,
    split_path: str | Path,
    *,
    skip_invalid: bool = False,
    groupings: str | Path | None = None,
    out_dir: str | Path | None = None,
    labels: Any = None,
) -> tuple[Table, pd.DataFrame, str]:
    """Validated table + checked split file + the split file's SHA-256 (recorded in every checkpoint).

    `labels`: the label set the table is read in (a name, YAML path or LabelSet; None: ham7)."""
    skipped = Path(out_dir) / "skipped.csv" if out_dir else None
    table, _ = load_valid_table(data, metadata, skip_invalid=skip_invalid, skipped_csv=skipped, groupings=groupings,
                                labels=labels)
    sp = read_split(split_path)
    leaks = check_split(sp)
    if leaks:
        raise UserError(f"{split_path}: {len(leaks)} lesions are in two splits (first: {leaks[0]}); remake it with `lesionlab split`")
    missing = sorted(set(sp["image_id"]) - set(table.df["image_id"]))
    if missing and not skip_invalid:
        raise UserError(f"{split_path}: {len(missing)} images are not in the (valid) dataset (first: {missing[0]}); "
                        "pass --skip-invalid to leave them out")
    return table, sp, sha256_file(Path(split_path))


def subset_frame(table: Table, split_df: pd.DataFrame, subset: str) -> pd.DataFrame:
    """Rows of `table` in one split (train/val/test), in split-file order, with path and label."""
    if subset not in SPLITS:
        raise UserError(f"--subset {subset!r} must be one of {', '.join(SPLITS)}")
    ids = split_df.loc[split_df["split"] == subset, "image_id"]
    df = table.df.set_index("image_id").reindex(ids).dropna(subset=["path"]).reset_index()
    return df


def split_frames(table: Table, split_df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return subset_frame(table, split_df, "train"), subset_frame(table, split_df, "val")


def external_table(images: str | Path, truth: str | Path, *, skip_invalid: bool = False,
                   classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows (image_id, label, path) of an external set in ISIC ground-truth format.

    Args:
        classes: the class columns the models predict (a bundle's / study's label set); the truth file must have
            exactly these (a file of another label set is refused in one line). None: the file's own.
    """
    from lesionlab.data.isic_csv import read_isic_csv

    gt = read_isic_csv(truth, kind="truth", classes=classes)
    if classes is not None and [c for c in pd.read_csv(truth, nrows=0).columns if c != "image"] != list(classes):
        raise UserError(f"{truth}: its class columns are not the model's label set ({', '.join(classes)}); "
                        "give ground truth in the model's label set")
    classes = [c for c in gt.columns if c != "image"]
    found = find_images(images) if Path(images).is_dir() else None
    if found is None:
        raise UserError(f"external images folder {images} does not exist")
    df = pd.DataFrame({"image_id": gt["image"], "label": [classes[i] for i in gt[classes].to_numpy().argmax(1)]})
    df["path"] = [str(found.get(i, "")) for i in df["image_id"]]
    missing = df[df["path"] == ""]
    if len(missing):
        if not skip_invalid:
            raise UserError(f"{truth}: {len(missing)} images not found under {images} (first: {missing['image_id'].iloc[0]}); "
                            "pass --skip-invalid to leave them out")
        df = df[df["path"] != ""]
    df["lesion_id"] = df["image_id"]
    return df.reset_index(drop=True)

