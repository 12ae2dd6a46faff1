"""Dataset validation: missing/extra/unreadable images, unknown labels, duplicates, lesions with two diagnoses."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

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
    required = ["image_id", "lesion_id"] + (["dx"] if table.layout == "ham10000" else [])
    for col in required:
        for r, iid in zip(df.loc[df[col] == "", "row"], df.loc[df[col] == "", "image_id"], strict=True):
            rep.problems.append(Problem(f"empty {col}", int(r), iid or "?", ""))
    bad_dx = df[(df["label"] == "") & (df["dx"] != "")]
    for r, iid, dx in zip(bad_dx["row"], bad_dx["image_id"], bad_dx["dx"], strict=True):
        detail = "not one-hot" if table.layout == "isic2018" else f"dx={dx!r}"
        rep.problems.append(Problem("unknown dx code" if table.layout == "ham10000" else "bad label row", int(r), iid, detail))
    dup = df[df["image_id"].duplicated(keep="first") & (df["image_id"] != "")]
    for r, iid in zip(dup["row"], dup["image_id"], strict=True):
        rep.problems.append(Problem("duplicate image id", int(r), iid, ""))
    labelled = df[(df["label"] != "") & (df["lesion_id"] != "")]
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
    return Table(df=df, source=table.source, layout=table.layout, notes=table.notes, image_index=table.image_index)


def load_valid_table(
    data_dir: str | Path | None,
    metadata: str | Path | None = None,
    *,
    skip_invalid: bool = False,
    skipped_csv: str | Path | None = None,
    check_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    groupings: str | Path | None = None,
) -> tuple[Table, ValidationReport]:
    """Read + validate; raise `UserError` with the summary unless clean or `skip_invalid`."""
    table = read_table(data_dir, metadata, groupings=groupings)
    rep = validate(table, check_images=check_images, max_pixels=max_pixels)
    blocking = [p for p in rep.problems if p.kind != "image without a row"]
    if blocking and not skip_invalid:
        raise UserError(rep.summary())
    if blocking and skipped_csv:
        rep.write_csv(skipped_csv)
    return drop_invalid(table, rep.bad_image_ids()), rep

