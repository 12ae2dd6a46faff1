"""Bundle predictions for image files, as `lesionlab predict` gives them.

Images are read and predicted batch by batch, each with its metadata (for metadata-fusion bundles) and, if asked,
a Grad-CAM overlay; the result has one row per input in the order given (unreadable files and image-less folders
as `{"image", "error"}` rows) and the command's exit status.

DICOM inputs: the row carries the header under `dicom` (UIDs, patient fields, acquisition attributes:
lesionlab.data.dicom.DicomInfo.to_dict); for a metadata-fusion bundle the header's age, sex and body site are the
image's metadata, and metadata given explicitly (the `--age/--sex/--site` values, a `--metadata` CSV row) wins
over the header field by field; with `sr_dir`, a DICOM Structured Report per DICOM input is written there.

A `--metadata` file that is a dataset table (HAM10000 metadata, a public layout's metadata, ISIC one-hot ground
truth) is also checked against the bundle's label set (`check_metadata_labels`): its diagnoses must be ones the
bundle's label set maps, its one-hot columns the bundle's classes; otherwise it is refused in one line. Every answer
row carries the bundle's label set fields (`label_set`, `classes`, `flag_class`, `flag_probability`, `flagged`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lesionlab.clinic.bundle import EnsemblePredictor
from lesionlab.data.image_files import expand_images, readable_inputs
from lesionlab.data.images import Decoded, image_id
from lesionlab.data.metadata import lookup_rows, read_metadata
from lesionlab.exceptions import UserError
from lesionlab.explain.overlay import overlay, save_png
from lesionlab.labels import BUILTIN

MetadataFor = Callable[[list[Path]], list[dict] | None]


def check_metadata_labels(bundle: EnsemblePredictor, metadata: Path) -> None:
    """Refuse a metadata file that is a dataset table labelled for another label set than the bundle's.

    A table with diagnosis codes (HAM10000's metadata, a public layout of lesionlab.data.sources) is read with the
    bundle's label set: codes it maps (or deliberately leaves out) are fine, whatever the table's vocabulary, as in
    training. A code it does not know means the table was labelled for another set: refused through
    `bundle.check_labels` with the built-in set that does know the codes (naming both), or naming the code. An ISIC
    one-hot file (image + class columns) must have exactly the bundle's classes. A plain metadata CSV (image_id,
    age, sex, ...) is not a dataset table and is not checked.
    """
    import pandas as pd

    from lesionlab.data import sources
    from lesionlab.data.tables import HAM_REQUIRED, read_csv_checked, read_table

    what = f"--metadata {metadata}"
    cols = [c.strip() for c in read_csv_checked(metadata, "metadata", nrows=0).columns] \
        if metadata.name != "PH2_dataset.txt" else []
    if sources.detect_file(metadata) is None and not set(HAM_REQUIRED) <= set(cols):
        known = {c for s in (*BUILTIN.values(), bundle.label_set) for c in s.classes}
        one_hot = [c for c in cols if c in known]
        if len(one_hot) >= 2:  # ISIC ground truth: its class columns are its label set
            bundle.check_truth_columns(["image", *one_hot], what)
        return
    table = read_table(None, metadata, labels=bundle.label_set, images={})
    df = table.df
    unknown = df[(df["label"] == "") & ~df["excluded"].astype(bool) & ~df["dx"].astype(str).str.strip().isin(["", "?"])]
    if unknown.empty:
        return
    codes = sorted(set(unknown["dx"].astype(str)))
    vocab = table.layout if table.layout != "isic2018" else "ham10000"
    for other in BUILTIN.values():  # the set the table fits, so the refusal names both sets
        if other.name != bundle.label_set.name and all(other.knows(vocab, c) for c in codes):
            bundle.check_labels(other, what)
    row = unknown.iloc[0]
    raise UserError(f"{what}: row {int(row['row']) if pd.notna(row.get('row')) else '?'} has diagnosis "
                    f"{row['dx']!r}, which label set {bundle.label_set.name!r} ({', '.join(bundle.label_set.classes)}) "
                    f"of bundle {bundle.root} does not map; give metadata labelled for it")


def metadata_lookup(metadata: Path | None, given: dict[str, str], *,
                    bundle: EnsemblePredictor | None = None) -> MetadataFor:
    """Per-image metadata for a list of image files, or None for all when there is none.

    Args:
        metadata: CSV with `image_id` (the file name without extension; the whole name of a DICOM file named
            without one, e.g. after its UID) and metadata columns; read now.
        given: values for every image (`age`, `sex`, `localization`); a non-empty CSV value overrides one.
        bundle: the bundle the metadata is for: a dataset table is checked against its label set
            (`check_metadata_labels`).
    """
    if metadata and bundle is not None:
        check_metadata_labels(bundle, Path(metadata))
    meta_df = read_metadata(metadata) if metadata else None

    def metadata_for(ps: list[Path]) -> list[dict] | None:
        if meta_df is None and not given:
            return None
        return [{**given, **{k: v for k, v in r.items() if v not in ("", None)}}
                for r in lookup_rows(meta_df, [image_id(q) for q in ps])]

    return metadata_for


@dataclass
class FileResults:
    """One row per input (results as `EnsemblePredictor.predict` gives them, with `image`), and the failures."""

    rows: list[dict[str, Any]]
    failed: list[tuple[Path, str]]
    inputs: int  # image files found, plus image-less folders
    reports: list[Path] = field(default_factory=list)  # DICOM SRs written

    @property
    def refused(self) -> int:
        return sum(r.get("status") == "unevaluable" for r in self.rows)

    @property
    def exit_code(self) -> int:
        """0 every image evaluated; 3 at least one unevaluable; 1 at least one input failed."""
        return 1 if self.failed else 3 if self.refused else 0


def uses_metadata(ens: EnsemblePredictor) -> bool:
    """Whether any member of the bundle is a metadata-fusion model."""
    return any(pr.encoding is not None for pr in ens.members)


def batch_metadata(decoded: list[Decoded], explicit: list[dict] | None, *, use_headers: bool) -> list[dict] | None:
    """Per-image metadata: the file's own (a DICOM header's age, sex, localization; only with `use_headers`), then
    the explicit values over it field by field; None when there is none at all (answers then say nothing about it)."""
    headers = [d.metadata() if use_headers else {} for d in decoded]
    if explicit is None and not any(headers):
        return None
    return [{**h, **e} for h, e in zip(headers, explicit or [{} for _ in decoded], strict=True)]


def predict_files(ens: EnsemblePredictor, items: list[Path], *, batch_size: int, tta: bool, research: bool = False,
                  metadata_for: MetadataFor | None = None, explain_dir: Path | None = None,
                  sr_dir: Path | None = None, warn: Callable[[str], None] = lambda _: None) -> FileResults:
    """Predict every image file in `items` (folders expanded), `batch_size` images at a time.

    Args:
        metadata_for: per-image explicit metadata for a batch of paths (`metadata_lookup`); wins over a DICOM
            header's.
        explain_dir: write a Grad-CAM overlay of the ensemble per evaluated image here.
        sr_dir: write a DICOM Structured Report (`<file stem>_sr.dcm`) per DICOM input here.
        warn: receives one line per problem and per metadata note, as they happen.

    Raises:
        UserError: no image files in `items`.
    """
    failed: list[tuple[Path, str]] = []
    paths = expand_images(items, failed, warn)
    if not paths:
        raise UserError("no images found in the given paths")
    rows: list[dict] = []
    reports: list[Path] = []
    use_headers = uses_metadata(ens)
    for start in range(0, len(paths), batch_size):
        loaded = list(readable_inputs(paths[start : start + batch_size], failed, warn))
        ok_paths, decoded = [p for p, _ in loaded], [d for _, d in loaded]
        batch = [d.image for d in decoded]
        meta = batch_metadata(decoded, metadata_for(ok_paths) if metadata_for else None, use_headers=use_headers)
        results = ens.predict(batch, tta=tta, research=research, metadata=meta)
        for path, d, res in zip(ok_paths, decoded, results, strict=True):
            if res.get("metadata", {}).get("note"):
                warn(f"{path}: {res['metadata']['note']}")
            row = {"image": str(path), **res}
            if d.dicom is not None:
                row["dicom"] = d.dicom.to_dict()
            rows.append(row)
            if explain_dir and res["status"] == "ok":
                ex = ens.explain(d.image, res)  # the class the answer shows (screening.explained_class)
                save_png(overlay(ex.display, ex.ensemble), explain_dir / f"{path.stem}_gradcam_{ex.cls}.png")
            if sr_dir is not None and d.dicom is not None:
                from lesionlab.clinic.dicom_sr import write_structured_report

                reports.append(write_structured_report(res, d.dicom.header, sr_dir / f"{path.stem}_sr.dcm"))
    rows += [{"image": str(p), "error": err} for p, err in failed]
    order = {str(p): i for i, p in enumerate(paths)}  # image-less folders (not in paths) first
    rows.sort(key=lambda r: order.get(r["image"], -1))
    return FileResults(rows=rows, failed=failed, inputs=len(paths) + sum(str(p) not in order for p, _ in failed),
                       reports=reports)
