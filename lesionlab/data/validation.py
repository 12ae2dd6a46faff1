"""Dataset validation: missing/extra/unreadable images, unknown labels, duplicates, lesions with two diagnoses."""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import ImageFile
from tqdm.auto import tqdm

from lesionlab.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from lesionlab.data.tables import Table, read_table
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_csv

# Truncated files must fail loudly, never be half-decoded into training data.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass
class Problem:
    kind: str
    row: int | None
    image_id: str
    detail: str


@dataclass
class ValidationReport:
    """What `validate` found; empty `problems` means clean."""

    source: Path
    n_rows: int
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def bad_image_ids(self) -> set[str]:
        return {p.image_id for p in self.problems if p.kind != "image without a row"}

    def summary(self, first: int = 3) -> str:
        """One paragraph: counts per kind of problem and the first offending rows."""
        if self.ok:
            return f"{self.source}: {self.n_rows} rows, no problems found."
        parts = []
        for kind, n in self.counts().items():
            ex = [p for p in self.problems if p.kind == kind][:first]
            shown = "; ".join(
                (f"row {p.row} " if p.row else "") + f"{p.image_id}" + (f" ({p.detail})" if p.detail else "")
                for p in ex
            )
            parts.append(f"{n} {kind} (first: {shown})")
        return (
            f"{self.source}: {len(self.problems)} problems in {self.n_rows} rows: "
            + "; ".join(parts)
            + ". Fix them, or pass --skip-invalid to leave those images out (they are listed in a CSV)."
        )

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [(p.kind, p.row, p.image_id, p.detail) for p in self.problems],
            columns=["problem", "row", "image_id", "detail"],
        )

    def write_csv(self, path: str | Path) -> None:
        atomic_write_csv(Path(path), self.to_frame())


def _check_image(path: str, max_pixels: int) -> str:
    try:
        load_image(path, max_pixels=max_pixels)
        return ""
    except ImageError as e:
        return str(e).split(": ", 1)[-1]


def validate(
    table: Table,
    *,
    check_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> ValidationReport:
    """Check a table and its images; see the issue list in the README (`lesionlab validate`)."""
    df = table.df
    rep = ValidationReport(source=table.source, n_rows=len(df), notes=list(table.notes))
    required = ["image_id", "lesion_id"] + (["dx"] if table.layout not in ("isic2018", "isic2019") else [])
    for col in required:
        for r, iid in zip(df.loc[df[col] == "", "row"], df.loc[df[col] == "", "image_id"], strict=True):
            rep.problems.append(Problem(f"empty {col}", int(r), iid or "?", ""))
    excluded = df["excluded"].astype(bool) if "excluded" in df else pd.Series(False, index=df.index)
    if excluded.any():
        codes = df.loc[excluded, "dx"].value_counts()
        rep.notes.append(f"label set {table.labels.name!r} leaves out {int(excluded.sum())} images whose diagnosis it "
                         "has no class for (" + ", ".join(f"{c}: {n}" for c, n in codes.items()) + ")")
    for r, iid, dx in zip(*(df.loc[(df["label"] == "") & ~excluded, c] for c in ("row", "image_id", "dx")), strict=True):
        if table.layout in ("isic2018", "isic2019") and dx in ("", "?"):
            rep.problems.append(Problem("bad label row", int(r), iid, "not one-hot"))
        elif dx != "":  # an empty dx is reported as "empty dx" above
            rep.problems.append(Problem("unknown dx code", int(r), iid,
                                        f"dx={dx!r}, not in label set {table.labels.name!r}"))
    if table.leaky:
        rep.notes.append("columns that give the label away (never fed to a model): " + ", ".join(table.leaky))
    dup = df[df["image_id"].duplicated(keep="first") & (df["image_id"] != "")]
    for r, iid in zip(dup["row"], dup["image_id"], strict=True):
        rep.problems.append(Problem("duplicate image id", int(r), iid, ""))
    labelled = df[(df["label"] != "") & (df["lesion_id"] != "")]
    if "group_by" in df:  # a patient (ISIC 2020, PAD-UFES-20 without lesion ids) may have lesions of several classes
        labelled = labelled[labelled["group_by"] == "lesion"]
    n_dx = labelled.groupby("lesion_id")["label"].nunique()
    for lesion in n_dx[n_dx > 1].index:
        rows = labelled[labelled["lesion_id"] == lesion]
        for r, iid, lab in zip(rows["row"], rows["image_id"], rows["label"], strict=True):
            rep.problems.append(Problem("lesion with two diagnoses", int(r), iid, f"{lesion}: {lab}"))
    missing = df[(df["path"] == "") & (df["image_id"] != "")]
    for r, iid in zip(missing["row"], missing["image_id"], strict=True):
        rep.problems.append(Problem("missing image file", int(r), iid, ""))
    index = table.image_index
    listed = set(df["image_id"])
    for iid in sorted(set(index) - listed):
        rep.problems.append(Problem("image without a row", None, iid, str(index[iid])))
    if check_images:
        present = df[df["path"] != ""].drop_duplicates("image_id")
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
            results = pool.map(lambda p: _check_image(p, max_pixels), present["path"])
            it = tqdm(results, total=len(present), desc="checking images", disable=not progress, leave=False)
            for (r, iid), err in zip(zip(present["row"], present["image_id"], strict=True), it, strict=True):
                if err:
                    rep.problems.append(Problem("unreadable image", int(r), iid, err))
    return rep


def drop_invalid(table: Table, bad: set[str]) -> Table:
    """The table without the rows of `bad` image ids (from `ValidationReport.bad_image_ids`), unlabelled rows
    and rows without an image file."""
    keep = ~table.df["image_id"].isin(bad) & (table.df["path"] != "") & (table.df["label"] != "")
    df = table.df[keep].drop_duplicates("image_id").reset_index(drop=True)
    return dataclasses.replace(table, df=df)


def load_valid_table(
    data_dir: str | Path | None,
    metadata: str | Path | None = None,
    *,
    skip_invalid: bool = False,
    skipped_csv: str | Path | None = None,
    check_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    groupings: str | Path | None = None,
    labels: Any = None,
) -> tuple[Table, ValidationReport]:
    """Read + validate; raise `UserError` with the summary unless clean or `skip_invalid`."""
    table = read_table(data_dir, metadata, groupings=groupings, labels=labels)
    rep = validate(table, check_images=check_images, max_pixels=max_pixels)
    blocking = [p for p in rep.problems if p.kind != "image without a row"]
    if blocking and not skip_invalid:
        raise UserError(rep.summary())
    if blocking and skipped_csv:
        rep.write_csv(skipped_csv)
    return drop_invalid(table, rep.bad_image_ids()), rep

