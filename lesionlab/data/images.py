"""Find, decode and check image files: only the formats cameras and dermatoscopes write, to 8-bit sRGB.

Input safety, in the order `decode_input` applies it:

1. The format is identified from the file's leading bytes (`sniff_format`) before any decoder runs. Only JPEG,
   PNG, TIFF, BMP, WebP and DICOM (Part 10, `DICM` after the 128-byte preamble) are decoded; anything else (EPS,
   PostScript, PDF, SVG, GIF, ...) is refused as unreadable. Pillow is then told the one format it may use
   (`Image.open(..., formats=[...])`), so a file can never reach another plugin: Pillow's EPS plugin hands the file
   to Ghostscript, which is exactly what must not run on an upload. A polyglot is decoded as what its leading
   bytes say or not at all (a JPEG with a PostScript tail is a JPEG; a PDF behind a JPEG header fails as a JPEG).
2. Dimensions are checked against `max_pixels` before pixel data is decoded (decompression bombs; Pillow's own
   DecompressionBombError beyond twice its limit is answered the same way), and truncated data fails loudly.
3. EXIF orientation is applied; the first frame of an animated or multi-page file is used.
4. Modes are flattened (16-bit scaled, alpha composited on white, palette expanded, 1-bit expanded); floating-point
   pixels are refused (no camera writes them and there is no one right scaling).
5. An embedded ICC profile is converted to sRGB (ImageCms / littleCMS, relative colorimetric as browsers do), so
   a Display-P3 phone photo is not read as sRGB; LAB images are converted through the CIELAB profile.

Every failure is an `ImageError` (a UserError: one line, no traceback) and never another exception.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps

from lesionlab.exceptions import UserError

if TYPE_CHECKING:
    from lesionlab.data.dicom import DicomInfo

# Truncated files must fail loudly, never be half-decoded into training data.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# File suffixes discovered in folders (any file named on the command line is sniffed whatever its name).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom")
SUPPORTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "DICOM")
SUPPORTED_TEXT = "JPEG, PNG, TIFF, BMP, WebP or DICOM"

DEFAULT_MAX_PIXELS = 100_000_000

# (offset, magic, format): what the leading bytes of each accepted format are.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"), (0, b"II+\x00", "TIFF"), (0, b"MM\x00+", "TIFF"),
    (0, b"BM", "BMP"),
    (128, b"DICM", "DICOM"),
)
# Names of formats that are refused, only to say what a refused file looks like.
_REFUSED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"GIF8", "GIF"),
    (b"<?xml", "XML/SVG"), (b"<svg", "SVG"), (b"<!DOCTYPE", "HTML"), (b"<html", "HTML"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
_HEAD = 132  # enough for every magic above, the DICOM one included


class ImageError(UserError):
    """An image file that cannot be used; `kind` is unreadable (also: an unsupported format), truncated or
    too_large."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Decoded:
    """A decoded input: the 8-bit sRGB image, the format its bytes were identified as, and for DICOM the header
    (UIDs, patient metadata, acquisition attributes: lesionlab.data.dicom.DicomInfo)."""

    image: Image.Image
    format: str
    dicom: DicomInfo | None = None
    notes: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        """What the file itself says about the patient (age, sex, localization), for metadata-fusion models."""
        return self.dicom.fusion_metadata() if self.dicom is not None else {}


def sniff_format(head: bytes) -> str | None:
    """The accepted format (one of SUPPORTED_FORMATS) that the leading bytes announce, or None."""
    for offset, magic, fmt in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _refused_name(head: bytes) -> str | None:
    h = head.lstrip()[:16]
    for magic, label in _REFUSED_MAGIC:
        if h[:len(magic)].lower() == magic.lower():
            return label
    return None


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to 8-bit sRGB with its EXIF orientation applied.

    Raises:
        ImageError: unsupported format, unreadable, truncated, or larger than `max_pixels` (decompression bomb).
    """
    return load_input(path, max_pixels=max_pixels).image


def load_input(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """`load_image` with the format and, for DICOM, the header (`Decoded`)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return decode_input(f, name=str(path), max_pixels=max_pixels)
    except OSError as e:
        raise ImageError(f"{path}: cannot read file ({e.strerror or e})") from None


def decode_image(fileobj: BinaryIO, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an open binary file or BytesIO; see `load_image`."""
    return decode_input(fileobj, name=name, max_pixels=max_pixels).image


def decode_input(fileobj: BinaryIO, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode an open binary file or BytesIO (see the module docstring for what is checked, in which order).

    Args:
        name: what messages call the input (a path, or "upload").
        max_pixels: refuse images with more pixels than this before decoding them.

    Raises:
        ImageError: the one error for any bad input.
    """
    try:
        start = fileobj.tell()
        head = fileobj.read(_HEAD)
        fileobj.seek(start)
    except OSError as e:
        raise ImageError(f"{name}: cannot read file ({e.strerror or e})") from None
    if not head:
        raise ImageError(f"{name}: the file is empty (zero bytes); expected a {SUPPORTED_TEXT} image")
    fmt = sniff_format(head)
    if fmt is None:
        what = _refused_name(head)
        raise ImageError(f"{name}: not a readable image: " + (f"it is {what}, which " if what else "its format ")
                         + f"is not accepted; export it as {SUPPORTED_TEXT}")
    try:
        if fmt == "DICOM":
            from lesionlab.data.dicom import read_dicom

            image, info = read_dicom(fileobj, name=name, max_pixels=max_pixels)
            return Decoded(image=image, format=fmt, dicom=info)
        return Decoded(image=_decode_pillow(fileobj, fmt, name=name, max_pixels=max_pixels), format=fmt)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode this image; downsample it", "too_large") from None
    except Exception as e:  # a decoder bug or an odd file must still be one line, never a 500 or a traceback
        raise ImageError(f"{name}: not a readable {fmt} image ({type(e).__name__}: {e})") from None


def _decode_pillow(fileobj: BinaryIO, fmt: str, *, name: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # PIL warns (and errors above 2x its own limit) on huge images; we check the size ourselves first.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fileobj, formats=[fmt])
        except Image.DecompressionBombError:
            raise ImageError(f"{name}: image dimensions are absurdly large; refusing to decode it", "too_large") from None
        except Exception:
            raise ImageError(f"{name}: not a readable image (its header says {fmt}, but it does not decode as one)") from None
        check_size(im.size, name=name, max_pixels=max_pixels)
        try:
            im.load()  # the first frame of an animated / multi-page file
        except Image.DecompressionBombError:
            raise ImageError(f"{name}: image dimensions are absurdly large; refusing to decode it", "too_large") from None
        except Exception as e:
            raise ImageError(f"{name}: image data is truncated or corrupt ({e})", "truncated") from None
    icc = im.info.get("icc_profile")
    im = ImageOps.exif_transpose(im)
    return to_srgb(im, icc, name=name)


def check_size(size: tuple[int, int], *, name: str, max_pixels: int) -> None:
    """Refuse an image whose dimensions exceed `max_pixels` (before its pixel data is decoded)."""
    w, h = size
    if w * h > max_pixels:
        raise ImageError(
            f"{name}: {w}x{h} pixels exceeds the limit of {max_pixels:,}; downsample it or raise data.max_image_pixels",
            "too_large",
        )


# ICC colour space signature -> the Pillow mode an image must be in for that profile to apply.
_ICC_MODE = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK", "Lab": "LAB"}
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def to_srgb(im: Image.Image, icc: bytes | None, *, name: str) -> Image.Image:
    """8-bit sRGB from any decoded image: mode flattened (`flatten_mode`), then the ICC profile (if any) applied.

    Raises:
        ImageError: floating-point pixels, or an embedded profile that cannot be read or does not fit the image.
    """
    im = flatten_mode(im, name=name)
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            space = src.profile.xcolor_space.strip()
            desc = ImageCms.getProfileDescription(src).strip()
        except Exception:
            raise ImageError(f"{name}: its embedded ICC colour profile is unreadable; re-export the image as sRGB") from None
        need = _ICC_MODE.get(space)
        if need is None or need != im.mode:
            raise ImageError(f"{name}: its embedded ICC colour profile ({space}) does not fit its {im.mode} pixels; "
                             "re-export the image as sRGB")
        # An sRGB profile needs no transform; skipping it saves a full pass over a 48-MP photo.
        if not (need == "RGB" and desc.lower().startswith("srgb")):
            im = ImageCms.profileToProfile(im, src, _SRGB, renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                           outputMode="RGB")
    if im.mode == "LAB":  # CIELAB pixels without a profile: they are still absolute colours
        im = ImageCms.profileToProfile(im, ImageCms.createProfile("LAB"), _SRGB, outputMode="RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def flatten_mode(im: Image.Image, *, name: str = "image") -> Image.Image:
    """One of the 8-bit modes RGB, L, CMYK or LAB from any Pillow mode: 16/32-bit integer greyscale scaled to
    8 bits, transparency composited on white (as a viewer shows it), palette and 1-bit expanded."""
    if im.mode in ("RGB", "L", "CMYK", "LAB"):
        return im
    if im.mode == "F":
        raise ImageError(f"{name}: floating-point pixels are not a camera image; export it as 8- or 16-bit")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (im.mode == "P" and "transparency" in im.info):
        grey = im.mode in ("LA", "La")
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(bg, rgba).convert("RGB")
        return out.convert("L") if grey else out
    if im.mode == "1":
        return im.convert("L")
    return im.convert("RGB")  # P, YCbCr, RGBX, HSV, ...


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode (greyscale, 16-bit, RGBA, CMYK, palette) to 8-bit RGB (no colour profile applied)."""
    return to_srgb(im, None, name="image")


def is_dicom_file(path: str | Path) -> bool:
    """A Part 10 DICOM file named without an image suffix (PACS exports: `IM000001`, a UID): its preamble says so."""
    try:
        with open(path, "rb") as f:
            return sniff_format(f.read(_HEAD)) == "DICOM"
    except OSError:
        return False


def _maybe_dicom_name(fn: str) -> bool:
    # Only names without a suffix, or whose "suffix" is a number (UID-style names such as 1.2.840.1234), are
    # probed: reading 132 bytes of every .csv or .txt in a dataset folder would be wasted work.
    suffix = Path(fn).suffix
    return suffix == "" or suffix[1:].isdigit()


def image_id(path: str | Path) -> str:
    """The id an image file is known by in tables: its stem, or its whole name when it has no image suffix (a
    DICOM file named after its UID)."""
    p = Path(path)
    return p.stem if p.suffix.lower() in IMAGE_SUFFIXES else p.name


def find_images(root: str | Path) -> dict[str, Path]:
    """Map image id (`image_id`) -> path for every image file anywhere below `root`: the IMAGE_SUFFIXES, and
    DICOM files without a suffix found by their preamble."""
    root = Path(root)
    found: dict[str, Path] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            if fn.lower().endswith(IMAGE_SUFFIXES) or (_maybe_dicom_name(fn) and is_dicom_file(p)):
                found.setdefault(image_id(p), p)
    return found


def expand_image_paths(items: list[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files for command-line arguments: folders expanded to the image files below them (sorted).

    Returns:
        (paths, problems): a folder with no images in it (say one named `x.jpg`) is a problem
        `(folder, message)`, not silently nothing. Files are passed through; decoding reports bad ones.
    """
    paths: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for p in map(Path, items):
        if p.is_dir():
            found = sorted(find_images(p).values(), key=str)
            if not found:
                problems.append((p, f"{p}: a folder with no JPG/JPEG/PNG images (nor TIFF, BMP, WebP or DICOM files) "
                                    "in it"))
            paths.extend(found)
        else:
            paths.append(p)
    return paths, problems
