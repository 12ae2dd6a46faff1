"""The whole protocol end to end: validate -> split -> train -> infer -> metrics -> ensemble -> errors -> explain -> report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesionlab import dataset, split
from lesionlab.errors import UserError
from lesionlab.io import sha256_file


def load_split_tables(
    data: str | Path,
    metadata: str | Path | None,
    split_path: str | Path,
    *,
    skip_invalid: bool = False,
    groupings: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> tuple[dataset.Table, pd.DataFrame, str]:
    """Validated table + checked split file + the split file's SHA-256 (recorded in every checkpoint)."""
    skipped = Path(out_dir) / "skipped.csv" if out_dir else None
    table, _ = dataset.load_valid_table(data, metadata, skip_invalid=skip_invalid, skipped_csv=skipped, groupings=groupings)
    sp = split.read_split(split_path)
    leaks = split.check_split(sp)
    if leaks:
        raise UserError(f"{split_path}: {len(leaks)} lesions are in two splits (first: {leaks[0]}); remake it with `lesionlab split`")
    missing = sorted(set(sp["image_id"]) - set(table.df["image_id"]))
    if missing and not skip_invalid:
        raise UserError(f"{split_path}: {len(missing)} images are not in the (valid) dataset (first: {missing[0]}); "
                        "pass --skip-invalid to leave them out")
    return table, sp, sha256_file(Path(split_path))


def subset_frame(table: dataset.Table, split_df: pd.DataFrame, subset: str) -> pd.DataFrame:
    """Rows of `table` in one split (train/val/test), in split-file order, with path and label."""
    if subset not in split.SPLITS:
        raise UserError(f"--subset {subset!r} must be one of {', '.join(split.SPLITS)}")
    ids = split_df.loc[split_df["split"] == subset, "image_id"]
    df = table.df.set_index("image_id").reindex(ids).dropna(subset=["path"]).reset_index()
    return df


def split_frames(table: dataset.Table, split_df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return subset_frame(table, split_df, "train"), subset_frame(table, split_df, "val")
