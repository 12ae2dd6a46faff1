"""Decode-once uint8 image cache (memory-mapped) shared by epochs and models."""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from tqdm.auto import tqdm

from lesionlab.data.images import load_image
from lesionlab.io import atomic_write

# Truncated files must fail loudly, never be half-decoded into training data.
ImageFile.LOAD_TRUNCATED_IMAGES = False


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

