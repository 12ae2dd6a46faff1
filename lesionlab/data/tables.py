"""Read HAM10000 / ISIC 2018 Task 3 metadata tables into one frame (image_id, lesion_id, label, path)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ImageFile

from lesionlab.data import sources
from lesionlab.data.images import find_images
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASSES, LabelSet, get_label_set

# Truncated files must fail loudly, never be half-decoded into training data.
ImageFile.LOAD_TRUNCATED_IMAGES = False


HAM_METADATA = "HAM10000_metadata.csv"


ISIC_GROUPINGS = "ISIC2018_Task3_Training_LesionGroupings.csv"


HAM_REQUIRED = ("lesion_id", "image_id", "dx")


@dataclass
class Table:
    """A dataset table: one row per image with image_id, lesion_id, dx, label, path (+ original columns)."""

    df: pd.DataFrame
    source: Path
    layout: str  # "ham10000" | "isic2018" | a lesionlab.data.sources layout | "multi" (several sources)
    notes: list[str] = field(default_factory=list)
    # every image file found below the data folder (also those without a row); kept off df.attrs,
    # which pandas deep-copies on every operation
    image_index: dict[str, Path] = field(default_factory=dict, repr=False)
    labels: LabelSet = field(default_factory=lambda: get_label_set(None), repr=False)
    # columns that give the label away (never fed to a model) and the skin-tone column, per the layout
    leaky: list[str] = field(default_factory=list)
    skin_tone: str = ""
    # several sources: (name, layout, metadata file) of each; duplicates found across them (lesionlab.data.multi)
    sources: list[dict] = field(default_factory=list)


def _find_metadata(data_dir: Path) -> Path:
    direct = data_dir / HAM_METADATA
    if direct.exists():
        return direct
    csvs = sorted(p for p in data_dir.rglob("*.csv") if not p.name.startswith("."))
    for p in csvs:
        if p.name == HAM_METADATA:
            return p
    found = sources.find_layout_file(data_dir)
    if found is not None:
        return found
    for p in csvs:
        try:
            cols = set(pd.read_csv(p, nrows=0).columns)
        except Exception:
            continue
        if "image" in cols and set(CLASSES) <= cols:
            return p
    raise UserError(
        f"no metadata found in {data_dir}: expected {HAM_METADATA}, an ISIC ground-truth CSV (image,MEL,NV,...) "
        "or the metadata file of a public layout (lesionlab datasets layouts); pass --metadata FILE"
    )


def read_csv_checked(path: str | Path, what: str, **read_csv: object) -> pd.DataFrame:
    """A user's CSV file read with pandas, or a one-line UserError naming it (missing, or not readable as CSV)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} file {path} does not exist")
    try:
        return pd.read_csv(path, **read_csv)
    except Exception as e:
        raise UserError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0]})") from None


def read_table(
    data_dir: str | Path | list[str | Path] | None = None,
    metadata: str | Path | None = None,
    *,
    groupings: str | Path | None = None,
    images: dict[str, Path] | None = None,
    labels: str | LabelSet | None = None,
    source: str | None = None,
) -> Table:
    """Read a dataset's metadata (HAM10000, ISIC 2018 Task 3, or a public layout of lesionlab.data.sources) into a
    `Table` whose `label` column holds the classes of `labels`.

    Args:
        data_dir: folder searched for images (and for the metadata when `metadata` is not given); a list of
            folders reads each as one source and joins them (lesionlab.data.multi.read_sources).
        metadata: the metadata file; default: found in `data_dir`.
        groupings: ISIC lesion-groupings CSV (image, lesion_id); default: found beside the ground truth.
        images: a pre-computed `find_images` result.
        labels: the label set (`ham7` default, `isic2019`, `binary`, a YAML path or a LabelSet).
        source: the name put in the `source` column (default: HAM10000's `dataset` column, else the layout).

    Rows are not validated here (see `validate`); `path` is empty where no image file was found; `label` is empty
    for a code the label set does not know, and for one it excludes (`excluded` is then True).
    """
    lset = get_label_set(labels)
    if isinstance(data_dir, list | tuple):
        if len(data_dir) == 1:
            data_dir = data_dir[0]
        else:
            if metadata is not None:
                raise UserError("--metadata names one file; with several --data folders each must hold its own")
            from lesionlab.data.multi import read_sources

            return read_sources([{"data": d} for d in data_dir], labels=lset)
    if data_dir is None and metadata is None:
        raise UserError("give --data DIR or --metadata CSV")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"data folder {data_dir} does not exist")
    meta_path = Path(metadata) if metadata else _find_metadata(Path(data_dir))
    if not meta_path.exists():
        raise UserError(f"metadata file {meta_path} does not exist")
    notes: list[str] = []
    layout = sources.detect_file(meta_path)
    if layout is not None:
        df, notes = sources.LAYOUTS[layout].read(meta_path, Path(data_dir) if data_dir is not None else None)
    else:
        raw = read_csv_checked(meta_path, "metadata", dtype=str, keep_default_na=False)
        raw.columns = [c.strip() for c in raw.columns]
        if set(HAM_REQUIRED) <= set(raw.columns):
            layout = "ham10000"
            df = raw.copy()
            for c in HAM_REQUIRED:
                df[c] = df[c].str.strip()
        elif "image" in raw.columns and set(CLASSES) <= set(raw.columns):
            layout = "isic2018"
            df = _isic_to_table(raw, meta_path)
            grp = Path(groupings) if groupings else meta_path.parent / ISIC_GROUPINGS
            if groupings and not grp.exists():
                raise UserError(f"lesion groupings file {grp} does not exist")
            if grp.exists():
                g = pd.read_csv(grp, dtype=str, keep_default_na=False)
                if not {"image", "lesion_id"} <= set(g.columns):
                    raise UserError(f"{grp}: needs columns image and lesion_id")
                lesion = dict(zip(g["image"].str.strip(), g["lesion_id"].str.strip(), strict=False))
                df["lesion_id"] = [lesion.get(i) or i for i in df["image_id"]]
                missing = sum(i not in lesion for i in df["image_id"])
                if missing:
                    notes.append(f"{missing} images have no row in {grp.name}; each is its own lesion group")
            else:
                df["lesion_id"] = df["image_id"]
                notes.append(
                    f"no lesion groupings ({ISIC_GROUPINGS}) found: each image is treated as its own lesion, "
                    "so images of one lesion may land in different splits"
                )
        else:
            raise UserError(
                f"{meta_path}: unrecognised columns {list(raw.columns)[:8]}; expected HAM10000 "
                f"({', '.join(HAM_REQUIRED)}), ISIC ground truth (image, {', '.join(CLASSES)}) or a public layout "
                f"({', '.join(n for n, lay in sources.LAYOUTS.items() if lay.read)})"
            )
    lay = sources.LAYOUTS[layout]
    df["label"], df["excluded"] = _map_labels(df["dx"], lset, layout)
    if "source" not in df.columns:
        df["source"] = source or (df["dataset"] if layout == "ham10000" and "dataset" in df.columns else layout)
    elif source:
        df["source"] = source
    if "image_type" not in df.columns:
        df["image_type"] = lay.image_type
    df["row"] = np.arange(len(df)) + 2  # line number in the CSV (header is line 1)
    if images is None:
        images = find_images(data_dir) if data_dir is not None else find_images(meta_path.parent)
    if layout == "isic2020":  # DICOM files where no JPEG was found
        root = Path(data_dir) if data_dir is not None else meta_path.parent
        images = {**sources.dicom_files(root), **images}
    given = df["path"] if "path" in df.columns else pd.Series([""] * len(df), index=df.index)
    df["path"] = [g if g else (str(images[i]) if i in images else "") for g, i in zip(given, df["image_id"], strict=True)]
    # a layout that names each row's file (Derm7pt, PH2) may name it other than by its stem: such a file has a row
    used = {p for p in df["path"] if p}
    images = {k: v for k, v in images.items() if str(v) not in used or k in set(df["image_id"])}
    skin = next((c for c in (lay.skin_tone, *sources.SKIN_TONE_COLUMNS) if c and c in df.columns), "")
    return Table(df=df.reset_index(drop=True), source=meta_path, layout=layout, notes=notes, image_index=images,
                 labels=lset, leaky=[c for c in df.columns if c.lower() in sources.LEAKY_COLUMNS], skin_tone=skin)


def _map_labels(dx: pd.Series, lset: LabelSet, vocab: str) -> tuple[list[str], list[bool]]:
    """(label, excluded) per dx code under a label set: "" for an unknown code (a validation problem) and for an
    excluded one (left out with a note)."""
    labels, excluded = [], []
    for code in dx:
        code = str(code).strip()
        if not code or code == "?":
            labels.append("")
            excluded.append(False)
            continue
        try:
            c = lset.class_of(vocab, code)
        except KeyError:
            labels.append("")
            excluded.append(False)
            continue
        labels.append(c or "")
        excluded.append(c is None)
    return labels, excluded


def _isic_to_table(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    """ISIC one-hot ground truth -> image_id, dx, label; bad one-hot rows get an empty label."""
    vals = raw[list(CLASSES)].apply(pd.to_numeric, errors="coerce")
    labels = []
    for ok, row in zip(vals.notna().all(axis=1), vals.to_numpy(), strict=True):
        if ok and np.isclose(row.sum(), 1.0) and np.isclose(row.max(), 1.0):
            labels.append(CLASSES[int(np.argmax(row))])
        else:
            labels.append("")
    df = raw.copy()
    df["image_id"] = df["image"].str.strip()
    df["label"] = labels
    df["dx"] = [lbl.lower() if lbl else "?" for lbl in labels]
    return df

