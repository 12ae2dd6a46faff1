"""Find, decode and check image files (EXIF orientation, RGB, decompression-bomb and truncation guards)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from lesionlab.exceptions import UserError

# Truncated files must fail loudly, never be half-decoded into training data.
ImageFile.LOAD_TRUNCATED_IMAGES = False


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


DEFAULT_MAX_PIXELS = 100_000_000


class ImageError(UserError):
    """An image file that cannot be used; `kind` is unreadable, truncated or too_large."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


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


def expand_image_paths(items: list[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files for command-line arguments: folders expanded to the JPEG/PNG files below them (sorted).

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
                problems.append((p, f"{p}: a folder with no {'/'.join(s.lstrip('.').upper() for s in IMAGE_SUFFIXES)} "
                                    "images in it"))
            paths.extend(found)
        else:
            paths.append(p)
    return paths, problems
