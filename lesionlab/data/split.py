"""Lesion-grouped, diagnosis-stratified train/val/test split; duplicate merging; leakage checks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_csv
from lesionlab.labels import CLASSES

SPLITS = ("train", "val", "test")


COVERAGE_BONUS = 10.0


SPLIT_COLUMNS = ["image_id", "lesion_id", "group_id", "dx", "label", "split"]


def read_duplicates(path: str | Path) -> pd.DataFrame:
    """Read a `from_img,to_img` CSV of image pairs that show one lesion; file extensions are dropped."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"duplicates file {path} does not exist")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"from_img", "to_img"} <= set(df.columns):
        raise UserError(f"{path}: needs columns from_img,to_img (image ids or file names)")
    out = pd.DataFrame({c: df[c].str.strip().map(lambda s: Path(s).stem) for c in ("from_img", "to_img")})
    return out


def merge_duplicate_groups(df: pd.DataFrame, duplicates: pd.DataFrame | None) -> pd.Series:
    """Group id per row: its lesion id, with lesions linked by a duplicate pair merged into one group.

    Linked lesions get the group id `lesionA+lesionB` (sorted); pairs naming unknown images are ignored.
    """
    lesions = df["lesion_id"].astype(str)
    if duplicates is None or duplicates.empty:
        return lesions.rename("group_id")
    codes, uniques = pd.factorize(lesions)
    lesion_of_image = dict(zip(df["image_id"], codes, strict=True))
    pairs = [
        (lesion_of_image[a], lesion_of_image[b])
        for a, b in zip(duplicates["from_img"], duplicates["to_img"], strict=True)
        if a in lesion_of_image and b in lesion_of_image
    ]
    n = len(uniques)
    if not pairs:
        return lesions.rename("group_id")
    rows, cols = zip(*pairs, strict=True)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    names: dict[int, list[str]] = {}
    for code, c in enumerate(comp):
        names.setdefault(int(c), []).append(str(uniques[code]))
    label = {c: "+".join(sorted(v)) for c, v in names.items()}
    return pd.Series([label[int(comp[c])] for c in codes], index=df.index, name="group_id")


def grouped_stratified_assign(
    group_ids: np.ndarray, labels: np.ndarray, fractions: tuple[float, ...], seed: int
) -> np.ndarray:
    """Assign every row to one of len(fractions) parts; rows of one group always share a part.

    Written by hand because scikit-learn's StratifiedGroupKFold makes k equal folds only, and the paper's
    protocol needs three unequal parts (8123/886/1006). Greedy, largest groups first (random order among
    equal sizes, from `seed`): each group goes where it most reduces the squared relative error between
    the per-class counts and their targets (fraction x class total), except that a part still lacking a
    class comes first (so a rare class with >= 3 lesions appears in every part, keeping its test AUC
    defined). Deterministic for a seed.

    Returns:
        Part index per row.
    """
    fr = np.asarray(fractions, dtype=float)
    if np.any(fr < 0) or not np.isclose(fr.sum(), 1.0):
        raise UserError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    classes, y = np.unique(labels, return_inverse=True)
    gcodes, g = np.unique(group_ids, return_inverse=True)
    counts = np.zeros((len(gcodes), len(classes)))
    np.add.at(counts, (g, y), 1)
    target = fr[:, None] * counts.sum(axis=0)[None, :]  # (parts, classes)
    scale = np.maximum(target, 1.0)
    have = np.zeros_like(target)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(gcodes))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    part_of_group = np.empty(len(gcodes), dtype=int)
    live = fr > 0
    for gi in order:
        v = counts[gi]
        # change in sum_c ((have+v-target)^2 - (have-target)^2) / scale, for each part
        delta = (v[None, :] * (2 * (have - target) + v[None, :]) / scale).sum(axis=1)
        delta -= COVERAGE_BONUS * (v[None, :] * ((have == 0) & (target > 0))).sum(axis=1)
        delta[~live] = np.inf
        best = int(np.argmin(delta))
        part_of_group[gi] = best
        have[best] += v
    return part_of_group[g]


def make_split(
    df: pd.DataFrame,
    *,
    fractions: tuple[float, float, float],
    seed: int,
    duplicates: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Lesion-grouped, stratified train/val/test split of a table (image_id, lesion_id, dx, label).

    With several sources (a `source` column with more than one value) every part is stratified by source and
    class together, and groups never span sources (their lesion ids carry the source, lesionlab.data.multi).

    Returns:
        A frame with `SPLIT_COLUMNS`, rows in the input order.
    """
    out = df[["image_id", "lesion_id", "dx", "label"]].copy().reset_index(drop=True)
    out["group_id"] = merge_duplicate_groups(out, duplicates).to_numpy()
    strata = out["label"].to_numpy()
    if "source" in df.columns and df["source"].nunique() > 1:
        strata = (df["source"].astype(str).to_numpy() + "|" + strata.astype(str)).astype(object)
    part = grouped_stratified_assign(out["group_id"].to_numpy(), strata, fractions, seed)
    out["split"] = np.asarray(SPLITS)[part]
    return out[SPLIT_COLUMNS]


def write_split(split: pd.DataFrame, path: str | Path) -> None:
    """Write the split CSV atomically (same table + seed -> byte-identical file)."""
    atomic_write_csv(Path(path), split[SPLIT_COLUMNS], lineterminator="\n")


def read_split(path: str | Path) -> pd.DataFrame:
    """Read a split CSV and check its columns and split names."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"split file {path} does not exist; make one with `lesionlab split`")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    need = {"image_id", "lesion_id", "split"}
    if not need <= set(df.columns):
        raise UserError(f"{path}: needs columns {', '.join(sorted(need))}")
    bad = df[~df["split"].isin(SPLITS)]
    if len(bad):
        raise UserError(f"{path}: row {bad.index[0] + 2} has split {bad['split'].iloc[0]!r}; use train/val/test")
    if "group_id" not in df:
        df["group_id"] = df["lesion_id"]
    return df


def find_leaks(split: pd.DataFrame, group_col: str = "group_id") -> dict[str, list[str]]:
    """Groups (lesions, or merged duplicate groups) found in more than one split: {group: [splits]}."""
    per = split.groupby(group_col)["split"].unique()
    return {str(k): sorted(v) for k, v in per.items() if len(v) > 1}


def find_duplicate_leaks(split: pd.DataFrame, duplicates: pd.DataFrame) -> list[tuple[str, str]]:
    """Known-duplicate image pairs whose two images are in different splits."""
    where = dict(zip(split["image_id"], split["split"], strict=True))
    return [
        (a, b)
        for a, b in zip(duplicates["from_img"], duplicates["to_img"], strict=True)
        if a in where and b in where and where[a] != where[b]
    ]


def check_split(split: pd.DataFrame, duplicates: pd.DataFrame | None = None) -> list[str]:
    """Leakage check: one message per lesion (or duplicate pair) that spans two splits; empty when clean."""
    msgs = [f"lesion {g} is in {' and '.join(s)}" for g, s in find_leaks(split, "lesion_id").items()]
    if "group_id" in split:
        msgs += [
            f"duplicate group {g} is in {' and '.join(s)}"
            for g, s in find_leaks(split, "group_id").items()
            if "+" in g
        ]
    if duplicates is not None:
        msgs += [f"known duplicates {a} and {b} are in different splits" for a, b in find_duplicate_leaks(split, duplicates)]
    return msgs


def split_file_problems(split_path: str | Path, image_ids: set[str], duplicates_path: str | Path | None = None) -> list[str]:
    """What is wrong with a split file for a dataset: lesions (or known duplicates) across splits, images the
    dataset lacks; one message each kind, empty when clean (what `lesionlab validate --split` reports)."""
    sp = read_split(split_path)
    leaks = check_split(sp, read_duplicates(duplicates_path) if duplicates_path else None)
    unknown = sorted(set(sp["image_id"]) - set(image_ids))
    problems = []
    if leaks:
        problems.append(f"{split_path}: {len(leaks)} leaks across splits (first: {'; '.join(leaks[:3])})")
    if unknown:
        problems.append(f"{split_path}: {len(unknown)} images not in the dataset (first: {', '.join(unknown[:3])})")
    return problems


def split_and_check(df: pd.DataFrame, *, fractions: tuple[float, float, float], seed: int,
                    duplicates: pd.DataFrame | None = None) -> pd.DataFrame:
    """`make_split`, then the leakage check it passes by construction (a failure is a bug, raised as one)."""
    sp = make_split(df, fractions=fractions, seed=seed, duplicates=duplicates)
    leaks = check_split(sp, duplicates)
    if leaks:
        raise RuntimeError(f"split leaks: {leaks[:3]}")
    return sp


# a published split's names for the three parts (Derm7pt's index files say train / valid / test)
PUBLISHED_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def published_split(df: pd.DataFrame, *, duplicates: pd.DataFrame | None = None) -> pd.DataFrame:
    """The split a dataset was published with (its `published_split` column, e.g. Derm7pt's meta/*_indexes.csv read by
    lesionlab.data.sources), as a split table like `make_split`'s, after the same leakage check.

    Raises:
        UserError: (one line, naming the rows) the table has no published split, a row has none or an unknown one,
            or a lesion (or known duplicate group) lies in two of its parts.
    """
    if not has_published_split(df):
        raise UserError("split.published is true but the data has no published split (a `published_split` column, "
                        "as Derm7pt's meta/train_indexes.csv, valid_indexes.csv and test_indexes.csv give); set "
                        "split.published: false to make a lesion-grouped split")
    given = df["published_split"].astype(str).str.strip().str.lower()
    part = given.map(PUBLISHED_NAMES)
    bad = part.isna().to_numpy()
    if bad.any():
        first = [f"{i} ({v or 'none'})" for i, v in zip(df.loc[bad, "image_id"].astype(str), given[bad], strict=True)]
        raise UserError(f"split.published: {len(first)} images have no single published part (first: "
                        f"{', '.join(first[:5])}); every row needs one of train, val, test (Derm7pt: each row number "
                        "of meta.csv in exactly one of meta/*_indexes.csv), or set split.published: false")
    empty = [p for p in ("train", "val", "test") if not (part == p).any()]
    if empty:
        raise UserError(f"split.published: the published split has no {' and no '.join(empty)} images; a study "
                        "needs all three parts (Derm7pt: meta/train_indexes.csv, valid_indexes.csv and "
                        "test_indexes.csv), or set split.published: false")
    out = df[["image_id", "lesion_id", "dx", "label"]].copy().reset_index(drop=True)
    out["group_id"] = merge_duplicate_groups(out, duplicates).to_numpy()
    out["split"] = part.to_numpy()
    leaks = check_split(out[SPLIT_COLUMNS], duplicates)
    if leaks:
        spans = {**find_leaks(out, "group_id"), **find_leaks(out, "lesion_id")}
        first = next(iter(spans), None)
        rows = out.loc[(out["lesion_id"] == first) | (out["group_id"] == first), ["image_id", "split"]]
        where = ", ".join(f"{i} in {p}" for i, p in zip(rows["image_id"], rows["split"], strict=True))
        raise UserError(f"split.published: the published split has {len(leaks)} leak(s) across its parts (first: "
                        f"{leaks[0]}{f': {where}' if where else ''}); fix its index files or set split.published: "
                        "false")
    return out[SPLIT_COLUMNS]


def has_published_split(df: pd.DataFrame) -> bool:
    """Whether a table carries a published split (a non-empty `published_split` column)."""
    return "published_split" in df.columns and bool(df["published_split"].astype(str).str.strip().ne("").any())


def summary_table(split: pd.DataFrame, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """Images and lesions per class per split, with totals."""
    rows = []
    for cls in [*classes, "total"]:
        sub = split if cls == "total" else split[split["label"] == cls]
        row = {"class": cls}
        for s in SPLITS:
            part = sub[sub["split"] == s]
            row[f"{s}_images"] = len(part)
            row[f"{s}_lesions"] = part["lesion_id"].nunique()
        row["all_images"] = len(sub)
        rows.append(row)
    return pd.DataFrame(rows)

