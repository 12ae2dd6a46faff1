"""Read HAM10000 / ISIC 2018 Task 3 tables, find and validate images, and serve them as a torch Dataset."""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFile, ImageOps
from tqdm.auto import tqdm

from lesionlab.errors import UserError
from lesionlab.io import atomic_write, atomic_write_csv
from lesionlab.labels import CLASS_INDEX, CLASSES, DX_TO_CLASS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
HAM_METADATA = "HAM10000_metadata.csv"
ISIC_GROUPINGS = "ISIC2018_Task3_Training_LesionGroupings.csv"
HAM_REQUIRED = ("lesion_id", "image_id", "dx")
DEFAULT_MAX_PIXELS = 100_000_000

# Truncated files must fail loudly, never be half-decoded into training data.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(UserError):
    """An image file that cannot be used; `kind` is unreadable, truncated or too_large."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


# ----------------------------------------------------------------------------- images


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to RGB with its EXIF orientation applied.

    Raises:
        ImageError: unreadable, truncated, or larger than `max_pixels` (decompression bomb).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return decode_image(f, name=str(path), max_pixels=max_pixels)
    except OSError as e:
        raise ImageError(f"{path}: cannot read file ({e.strerror or e})") from None


def decode_image(fileobj, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an open binary file or BytesIO; see `load_image`."""
    with warnings.catch_warnings():
        # PIL warns (and errors above 2x its own limit) on huge images; we check the size ourselves first.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fileobj)
        except Image.DecompressionBombError:
            raise ImageError(f"{name}: image dimensions are absurdly large; refusing to decode it", "too_large") from None
        except Exception:
            raise ImageError(f"{name}: not a readable image (JPEG or PNG expected)") from None
        w, h = im.size
        if w * h > max_pixels:
            raise ImageError(
                f"{name}: {w}x{h} pixels exceeds the limit of {max_pixels:,}; "
                "downsample it or raise data.max_image_pixels",
                "too_large",
            )
        try:
            im.load()
        except Exception as e:
            raise ImageError(f"{name}: image data is truncated or corrupt ({e})", "truncated") from None
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode (greyscale, 16-bit, RGBA, CMYK, palette) to 8-bit RGB."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels become white, as a viewer would show them.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def find_images(root: str | Path) -> dict[str, Path]:
    """Map image id (file stem) -> path for every JPEG/PNG anywhere below `root`."""
    root = Path(root)
    found: dict[str, Path] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for fn in sorted(filenames):
            if fn.lower().endswith(IMAGE_SUFFIXES) and not fn.startswith("."):
                found.setdefault(Path(fn).stem, Path(dirpath) / fn)
    return found


# ----------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A dataset table: one row per image with image_id, lesion_id, dx, label, path (+ original columns)."""

    df: pd.DataFrame
    source: Path
    layout: str  # "ham10000" | "isic2018"
    notes: list[str] = field(default_factory=list)
    # every image file found below the data folder (also those without a row); kept off df.attrs,
    # which pandas deep-copies on every operation
    image_index: dict[str, Path] = field(default_factory=dict, repr=False)


def _find_metadata(data_dir: Path) -> Path:
    direct = data_dir / HAM_METADATA
    if direct.exists():
        return direct
    csvs = sorted(p for p in data_dir.rglob("*.csv") if not p.name.startswith("."))
    for p in csvs:
        if p.name == HAM_METADATA:
            return p
    for p in csvs:
        try:
            cols = set(pd.read_csv(p, nrows=0).columns)
        except Exception:
            continue
        if "image" in cols and set(CLASSES) <= cols:
            return p
    raise UserError(
        f"no metadata found in {data_dir}: expected {HAM_METADATA} or an ISIC ground-truth CSV "
        "(image,MEL,NV,...); pass --metadata CSV"
    )


def read_table(
    data_dir: str | Path | None = None,
    metadata: str | Path | None = None,
    *,
    groupings: str | Path | None = None,
    images: dict[str, Path] | None = None,
) -> Table:
    """Read a HAM10000 metadata CSV or an ISIC 2018 Task 3 ground-truth CSV into a `Table`.

    Args:
        data_dir: folder searched for images (and for the metadata when `metadata` is not given).
        metadata: the CSV; default: found in `data_dir`.
        groupings: ISIC lesion-groupings CSV (image, lesion_id); default: found beside the ground truth.
        images: a pre-computed `find_images` result.

    Rows are not validated here (see `validate`); `path` is empty where no image file was found.
    """
    if data_dir is None and metadata is None:
        raise UserError("give --data DIR or --metadata CSV")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"data folder {data_dir} does not exist")
    meta_path = Path(metadata) if metadata else _find_metadata(Path(data_dir))
    if not meta_path.exists():
        raise UserError(f"metadata file {meta_path} does not exist")
    try:
        raw = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise UserError(f"{meta_path}: cannot be read as CSV ({str(e).splitlines()[0]})") from None
    raw.columns = [c.strip() for c in raw.columns]
    notes: list[str] = []
    if set(HAM_REQUIRED) <= set(raw.columns):
        layout = "ham10000"
        df = raw.copy()
        for c in HAM_REQUIRED:
            df[c] = df[c].str.strip()
        df["label"] = df["dx"].str.lower().map(DX_TO_CLASS).fillna("")
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
            f"({', '.join(HAM_REQUIRED)}) or ISIC ground truth (image, {', '.join(CLASSES)})"
        )
    df["row"] = np.arange(len(df)) + 2  # line number in the CSV (header is line 1)
    if images is None:
        images = find_images(data_dir) if data_dir is not None else find_images(meta_path.parent)
    df["path"] = [str(images[i]) if i in images else "" for i in df["image_id"]]
    return Table(df=df.reset_index(drop=True), source=meta_path, layout=layout, notes=notes, image_index=images)


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


# ----------------------------------------------------------------------------- validation


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


# ----------------------------------------------------------------------------- torch side


def cache_shape(input_size: int, crop_fraction: float, source_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """(H, W) at which images are cached: the centre crop then still covers `input_size` pixels.

    The cache keeps a 4:3 frame (HAM10000's 600x450); it never upsamples past the source size.
    """
    h = math.ceil(input_size / crop_fraction)
    w = math.ceil(h * 4 / 3)
    if source_hw is not None and source_hw[0] < h:
        h, w = source_hw[0], math.ceil(source_hw[0] * 4 / 3)
    return h, w


def pil_to_uint8_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


class ImageCache:
    """Images decoded and resized once into a uint8 memmap (N, H, W, 3), shared by epochs, workers and models.

    The file name hashes the image paths, file sizes, mtimes and shape, so a changed image rebuilds it.
    """

    def __init__(self, paths: list[str], shape_hw: tuple[int, int], cache_dir: str | Path, *, max_pixels: int):
        self.paths = list(paths)
        self.shape_hw = tuple(shape_hw)
        h = hashlib.sha256(repr(self.shape_hw).encode())
        for p in self.paths:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        self.file = Path(cache_dir) / f"images-{self.shape_hw[0]}x{self.shape_hw[1]}-{h.hexdigest()[:16]}.npy"
        self.max_pixels = max_pixels
        self._arr: np.ndarray | None = None

    def build(self, progress: bool = True) -> ImageCache:
        if self.file.exists():
            return self
        n, (h, w) = len(self.paths), self.shape_hw

        def write(tmp: Path) -> None:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, h, w, 3))

            def one(i: int) -> None:
                im = load_image(self.paths[i], max_pixels=self.max_pixels)
                arr[i] = np.asarray(im.resize((w, h), Image.BILINEAR, reducing_gap=None))

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                list(tqdm(pool.map(one, range(n)), total=n, desc="caching images", disable=not progress))
            arr.flush()

        atomic_write(self.file, write)
        return self

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._arr is None:  # opened lazily so each DataLoader worker maps the file itself
            self._arr = np.load(self.file, mmap_mode="r")
        return torch.from_numpy(np.array(self._arr[i])).permute(2, 0, 1).contiguous()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arr"] = None
        return state


class LesionDataset(torch.utils.data.Dataset):
    """Images of a table (from disk or an `ImageCache`) through a transform; yields (tensor, class index).

    The class index is -1 for unlabelled rows.
    """

    def __init__(self, df: pd.DataFrame, transform, *, cache: ImageCache | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths = df["path"].tolist()
        labels = df["label"] if "label" in df else pd.Series([""] * len(df))
        self.targets = [CLASS_INDEX.get(lbl, -1) for lbl in labels]
        self.transform = transform
        self.cache = cache
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.cache is not None:
            img = self.cache[i]
        else:
            img = pil_to_uint8_tensor(load_image(self.paths[i], max_pixels=self.max_pixels))
        return self.transform(img), self.targets[i]


def source_hw(path: str) -> tuple[int, int]:
    """(H, W) of an image file after EXIF orientation, without decoding the pixels."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else im
        return im.size[1], im.size[0]


def make_dataset(
    df: pd.DataFrame,
    transform,
    *,
    input_size: int,
    crop_fraction: float,
    cache_dir: str | Path | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> LesionDataset:
    """A `LesionDataset`, backed by an `ImageCache` when `cache_dir` is given."""
    cache = None
    if cache_dir and len(df):
        shape = cache_shape(input_size, crop_fraction, source_hw(df["path"].iloc[0]))
        cache = ImageCache(df["path"].tolist(), shape, cache_dir, max_pixels=max_pixels).build(progress)
    return LesionDataset(df, transform, cache=cache, max_pixels=max_pixels)
