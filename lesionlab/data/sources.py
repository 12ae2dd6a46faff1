"""The public dermoscopy and clinical-photo datasets, read from their published layouts into one row format.

Every layout becomes rows of: `image_id`, `lesion_id` (the strongest grouping id the set has: its lesion id, else
its patient id, else the image itself; `group_by` says which), `dx` (the source's diagnosis code, lower-cased: the
vocabulary a `LabelSet` maps, lesionlab.labels), `image_type` (dermoscopic | clinical), `source`, `path` where the
layout names the file, and every original column. A layout also names the columns that *leak the label* (never
fed to a model: `LEAKY_COLUMNS`, enforced in lesionlab.data.metadata) and its skin-tone column, if any.

Published layouts (column names checked against the public loaders cited per layout):

- HAM10000: `HAM10000_metadata.csv` (lesion_id, image_id, dx, dx_type, age, sex, localization, dataset).
- ISIC 2018 Task 3: one-hot ground truth (image, MEL, NV, BCC, AKIEC, BKL, DF, VASC) + optional lesion groupings.
- ISIC 2019: `ISIC_2019_Training_GroundTruth.csv` (image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK, one-hot) and
  `ISIC_2019_Training_Metadata.csv` (image, age_approx, anatom_site_general, lesion_id, sex) beside it
  (challenge.isic-archive.com/data/#2019; owkin/FLamby fed_isic2019).
- ISIC 2020: `train.csv` (image_name, patient_id, sex, age_approx, anatom_site_general_challenge, diagnosis,
  benign_malignant, target; `lesion_id` in the v2 ground truth), images in `jpeg/train/*.jpg` or `train/*.dcm`
  (the SIIM-ISIC Kaggle data description).
- PH2: `PH2_dataset.txt`, a `||`-separated table (Name, Histological Diagnosis, Clinical Diagnosis 0 common nevus /
  1 atypical nevus / 2 melanoma, ...), images `PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp`
  (Mendonca et al. 2013; public PH2 readers split the rows on `||`).
- Derm7pt: `meta/meta.csv` (case_num, diagnosis, seven-point criteria, elevation, location, sex, management,
  `clinic` and `derm` image paths under `images/`) and `meta/{train,valid,test}_indexes.csv` (column `indexes`)
  (jeremykawahara/derm7pt, derm7pt/dataset.py).
- PAD-UFES-20: `metadata.csv` (patient_id, lesion_id, ..., fitspatrick, region, diagnostic ACK/BCC/MEL/NEV/SCC/SEK,
  ..., img_id, biopsed), images `images/*.png` (Pacheco et al. 2020, Mendeley Data zr7vgbcyr2).
- Fitzpatrick17k: `fitzpatrick17k.csv` (md5hash, fitzpatrick_scale, fitzpatrick_centaur, label,
  nine_partition_label, three_partition_label, qc, url, url_alphanum), images `<md5hash>.jpg` (mattgroh/fitzpatrick17k).
- DDI: `ddi_metadata.csv` (DDI_ID, DDI_file, skin_tone 12/34/56, malignant, disease), images `images/` or beside
  (DDI-Dataset/DDI-Code, ddi_dataset.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lesionlab.exceptions import UserError


@dataclass(frozen=True)
class Layout:
    """One published dataset layout."""

    name: str  # also the label-set vocabulary of its `dx` codes
    title: str
    files: tuple[str, ...]  # the metadata file names it is found by (relative to the data folder)
    image_type: str  # dermoscopic | clinical | both (a column says per row)
    leaky: tuple[str, ...] = ()  # columns that give the label away
    skin_tone: str = ""  # Fitzpatrick type / skin tone column
    read: Callable[..., tuple[pd.DataFrame, list[str]]] | None = field(default=None, repr=False, compare=False)

    @property
    def licence(self) -> str:
        """The dataset's licence as its publisher states it: read from lesionlab.data.licences, the one list the
        model card and bundles also read (with where each licence is stated)."""
        from lesionlab.data.licences import UNKNOWN, licence_of

        lic = licence_of(self.name)
        return lic.licence if lic else UNKNOWN


def _read(path: Path, **kw) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, **kw)
    except Exception as e:
        raise UserError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0]})") from None
    df.columns = [c.strip() for c in df.columns]
    return df


def _need(df: pd.DataFrame, cols: tuple[str, ...], path: Path, layout: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(f"{path}: a {layout} file needs columns {', '.join(cols)}; missing {', '.join(missing)}")


def _group(df: pd.DataFrame, candidates: list[tuple[str, str]], notes: list[str], what: str) -> pd.DataFrame:
    """lesion_id from the strongest id present per row (lesion, then patient, then the image itself)."""
    lesion = pd.Series([""] * len(df), index=df.index, dtype=object)
    how = pd.Series(["image"] * len(df), index=df.index, dtype=object)
    for col, kind in reversed(candidates):  # weakest first, so the strongest present wins
        if col in df.columns:
            vals = df[col].astype(str).str.strip()
            ok = vals != ""
            lesion[ok] = kind + ":" + vals[ok]
            how[ok] = kind
    alone = lesion == ""
    lesion[alone] = "image:" + df.loc[alone, "image_id"]
    df["lesion_id"] = lesion
    df["group_by"] = how
    if alone.any():
        notes.append(f"{what}: {int(alone.sum())} images have no lesion or patient id; each is its own group, so "
                     "images of one lesion may land in different splits")
    return df


def _onehot(raw: pd.DataFrame, classes: list[str]) -> list[str]:
    vals = raw[classes].apply(pd.to_numeric, errors="coerce")
    out = []
    for ok, row in zip(vals.notna().all(axis=1), vals.to_numpy(), strict=True):
        out.append(classes[int(np.argmax(row))].lower()
                   if ok and np.isclose(row.sum(), 1.0) and np.isclose(row.max(), 1.0) else "")
    return out


# ----------------------------------------------------------------------------- readers (path, data_dir) -> rows


def read_isic2019(path: Path, data_dir: Path | None) -> tuple[pd.DataFrame, list[str]]:
    raw = _read(path)
    cls = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    _need(raw, ("image", *cls[:-1]), path, "ISIC 2019 ground truth")
    df = raw.copy()
    df["image_id"] = df["image"].str.strip()
    df["dx"] = _onehot(raw, [c for c in cls if c in raw.columns])
    notes: list[str] = []
    meta = path.parent / path.name.replace("GroundTruth", "Metadata")
    if meta.exists() and meta != path:
        m = _read(meta)
        _need(m, ("image",), meta, "ISIC 2019 metadata")
        m = m.rename(columns={"image": "image_id"}).drop_duplicates("image_id")
        df = df.merge(m, on="image_id", how="left", suffixes=("", "_meta")).fillna("")
    else:
        notes.append(f"no {meta.name} beside {path.name}: no lesion ids, each image is its own group")
    return _group(df, [("lesion_id", "lesion")], notes, "ISIC 2019"), notes


def read_isic2020(path: Path, data_dir: Path | None) -> tuple[pd.DataFrame, list[str]]:
    raw = _read(path)
    _need(raw, ("image_name", "patient_id", "diagnosis"), path, "ISIC 2020 train.csv")
    df = raw.copy()
    df["image_id"] = df["image_name"].str.strip()
    df["dx"] = df["diagnosis"].str.strip().str.lower()
    notes: list[str] = []
    return _group(df, [("lesion_id", "lesion"), ("patient_id", "patient")], notes, "ISIC 2020"), notes


PH2_DIAGNOSIS = {"0": "common nevus", "1": "atypical nevus", "2": "melanoma"}


def read_ph2(path: Path, data_dir: Path | None) -> tuple[pd.DataFrame, list[str]]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        parts = [p.strip() for p in line.split("||")]
        if len(parts) < 4 or not parts[1].upper().startswith("IMD"):
            continue  # header, legend or blank line
        rows.append({"image_id": parts[1], "histological_diagnosis": parts[2], "clinical_diagnosis": parts[3],
                     "dx": PH2_DIAGNOSIS.get(parts[3].replace(" ", ""), parts[3].lower())})
    if not rows:
        raise UserError(f"{path}: no `|| IMDxxx || ...` rows found; is it PH2_dataset.txt?")
    df = pd.DataFrame(rows)
    root = data_dir or path.parent
    base = root / "PH2 Dataset images"
    df["path"] = [str(p) if (p := base / i / f"{i}_Dermoscopic_Image" / f"{i}.bmp").exists() else ""
                  for i in df["image_id"]]
    notes = ["PH2: one image per lesion; each image is its own group"]
    return _group(df, [], [], "PH2"), notes


def read_derm7pt(path: Path, data_dir: Path | None) -> tuple[pd.DataFrame, list[str]]:
    raw = _read(path)
    _need(raw, ("case_num", "diagnosis", "clinic", "derm"), path, "Derm7pt meta.csv")
    root = data_dir or path.parent.parent
    split_of: dict[int, str] = {}
    for tag, name in (("train", "train_indexes.csv"), ("val", "valid_indexes.csv"), ("test", "test_indexes.csv")):
        f = path.parent / name
        if f.exists():
            idx = _read(f)
            if "indexes" in idx.columns:
                for i in idx["indexes"]:
                    if str(i).strip().isdigit():  # a case in two files keeps both names ("train+test"): a leak
                        k = int(i)  # that lesionlab.data.split.published_split reports, not one a file order hides
                        split_of[k] = f"{split_of[k]}+{tag}" if k in split_of and split_of[k] != tag else tag
    rows = []
    for i, r in enumerate(raw.to_dict("records")):
        for col, kind in (("derm", "dermoscopic"), ("clinic", "clinical")):
            rel = str(r[col]).strip()
            if not rel:
                continue
            p = next((c for c in (root / "images" / rel, root / rel) if c.exists()), None)
            rows.append({**r, "image_id": Path(rel).with_suffix("").as_posix().replace("/", "_"),
                         "image_type": kind, "path": str(p) if p else "",
                         "dx": str(r["diagnosis"]).strip().lower(), "case": str(r["case_num"]),
                         "published_split": split_of.get(i, "")})
    df = pd.DataFrame(rows)
    notes = ["Derm7pt: the clinical and dermoscopic image of a case share its case number as lesion id"]
    if split_of:
        n = {t: sum(v == t for v in split_of.values()) for t in ("train", "val", "test")}
        missing = len(raw) - len(split_of)
        both = sum("+" in v for v in split_of.values())  # listed in two index files (kept as e.g. "train+test")
        extra = "".join([f", {both} cases in two parts" if both else "", f", {missing} cases in none" if missing else ""])
        notes.append(f"Derm7pt: the set has a published split (meta/*_indexes.csv: {n['train']} train, {n['val']} "
                     f"valid, {n['test']} test cases{extra}), kept in the "
                     "`published_split` column; split.published: true makes a study use it instead of its own")
    return _group(df, [("case", "lesion")], [], "Derm7pt"), notes


def read_pad_ufes_20(path: Path, data_dir: Path | None) -> tuple[pd.DataFrame, list[str]]:
    raw = _read(path)
    _need(raw, ("img_id", "patient_id", "lesion_id", "diagnostic"), path, "PAD-UFES-20 metadata.csv")
    df = raw.rename(columns={"lesion_id": "pad_lesion_id"}).copy()
    df["image_id"] = [Path(s.strip()).stem for s in df["img_id"]]
    df["dx"] = df["diagnostic"].str.strip().str.lower()
    notes: list[str] = []
    return _group(df, [("pad_lesion_id", "lesion"), ("patient_id", "patient")], notes, "PAD-UFES-20"), notes


def read_fitzpatrick17k(path: Path, data_dir: Path | None) -> tuple[pd.DataFrame, list[str]]:
    raw = _read(path)
    _need(raw, ("md5hash", "fitzpatrick_scale", "three_partition_label"), path, "fitzpatrick17k.csv")
    df = raw.copy()
    df["image_id"] = df["md5hash"].str.strip()
    df["dx"] = df["three_partition_label"].str.strip().str.lower()
    # -1 marks an image the annotators could not type (the dataset's convention): missing, not a type
    df["fitzpatrick_scale"] = df["fitzpatrick_scale"].str.strip().replace({"-1": ""})
    notes: list[str] = []
    return _group(df, [], notes, "Fitzpatrick17k"), notes


def read_ddi(path: Path, data_dir: Path | None) -> tuple[pd.DataFrame, list[str]]:
    raw = _read(path)
    _need(raw, ("DDI_file", "skin_tone", "malignant"), path, "ddi_metadata.csv")
    df = raw.copy()
    df["image_id"] = [Path(s.strip()).stem for s in df["DDI_file"]]
    truth = df["malignant"].str.strip().str.lower()
    df["dx"] = np.where(truth.isin(["true", "1", "yes"]), "malignant",
                        np.where(truth.isin(["false", "0", "no"]), "benign", truth))
    notes: list[str] = []
    return _group(df, [], notes, "DDI"), notes


LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    Layout("ham10000", "HAM10000", ("HAM10000_metadata.csv",), "dermoscopic", leaky=("dx", "dx_type")),
    Layout("isic2018", "ISIC 2018 Task 3", ("ISIC2018_Task3_Training_GroundTruth.csv",), "dermoscopic",
           leaky=("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")),
    Layout("isic2019", "ISIC 2019", ("ISIC_2019_Training_GroundTruth.csv",), "dermoscopic",
           leaky=("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"), read=read_isic2019),
    Layout("isic2020", "ISIC 2020 (SIIM-ISIC)", ("train.csv", "ISIC_2020_Training_GroundTruth.csv",
                                                "ISIC_2020_Training_GroundTruth_v2.csv"), "dermoscopic",
           leaky=("diagnosis", "benign_malignant", "target"), read=read_isic2020),
    Layout("ph2", "PH2", ("PH2_dataset.txt",), "dermoscopic",
           leaky=("histological_diagnosis", "clinical_diagnosis"), read=read_ph2),
    Layout("derm7pt", "Derm7pt (seven-point checklist)", ("meta/meta.csv",), "both",
           leaky=("diagnosis", "management", "seven_point_score", "pigment_network", "streaks", "pigmentation",
                  "regression_structures", "dots_and_globules", "blue_whitish_veil", "vascular_structures",
                  "level_of_diagnostic_difficulty"), read=read_derm7pt),
    Layout("pad_ufes_20", "PAD-UFES-20", ("metadata.csv",), "clinical", leaky=("diagnostic", "biopsed"),
           skin_tone="fitspatrick", read=read_pad_ufes_20),
    Layout("fitzpatrick17k", "Fitzpatrick17k", ("fitzpatrick17k.csv",), "clinical",
           leaky=("label", "nine_partition_label", "three_partition_label", "qc"), skin_tone="fitzpatrick_scale",
           read=read_fitzpatrick17k),
    Layout("ddi", "Diverse Dermatology Images (DDI)", ("ddi_metadata.csv",), "clinical",
           leaky=("malignant", "disease"), skin_tone="skin_tone", read=read_ddi),
)}

# Every column any layout says leaks the label, and the table's own label columns: the one list
# lesionlab.data.metadata refuses to encode for a model.
LEAKY_COLUMNS: frozenset[str] = frozenset(
    {c.lower() for lay in LAYOUTS.values() for c in lay.leaky} | {"dx", "label", "target", "diagnosis",
                                                                  "diagnostic", "benign_malignant"})

SKIN_TONE_COLUMNS: tuple[str, ...] = ("fitzpatrick_skin_type", "fitzpatrick", "fitzpatrick_scale", "fitspatrick",
                                      "skin_tone", "skin_type")


def detect_file(path: Path) -> str | None:
    """The layout a metadata file is in, from its name and columns; None for HAM10000/ISIC 2018 (read by
    lesionlab.data.tables itself) or an unknown file."""
    name = path.name
    if name == "PH2_dataset.txt":
        return "ph2"
    try:
        cols = set(_read(path, nrows=0).columns)
    except UserError:
        return None
    if {"image", "AK", "SCC", "MEL", "NV"} <= cols:
        return "isic2019"
    if {"image_name", "patient_id", "diagnosis"} <= cols:
        return "isic2020"
    if {"case_num", "clinic", "derm", "diagnosis"} <= cols:
        return "derm7pt"
    if {"img_id", "diagnostic", "patient_id"} <= cols:
        return "pad_ufes_20"
    if {"md5hash", "fitzpatrick_scale"} <= cols:
        return "fitzpatrick17k"
    if {"DDI_file", "skin_tone", "malignant"} <= cols:
        return "ddi"
    return None


def find_layout_file(data_dir: Path) -> Path | None:
    """A metadata file of one of the public layouts below `data_dir` (by its published name, then by columns)."""
    for lay in LAYOUTS.values():
        if lay.read is None:
            continue
        for f in lay.files:
            p = data_dir / f
            if p.exists() and detect_file(p) == lay.name:
                return p
    for p in sorted(data_dir.rglob("*")):
        if p.suffix.lower() in (".csv", ".txt") and not p.name.startswith(".") and detect_file(p):
            return p
    return None


def dicom_files(root: Path) -> dict[str, Path]:
    """`image id -> .dcm path` below `root` (ISIC 2020 ships DICOM; lesionlab.data.images indexes JPEG/PNG)."""
    return {p.stem: p for p in sorted(root.rglob("*.dcm"))}
