"""Decode-once uint8 image cache (memory-mapped) shared by epochs and models."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from tqdm.auto import tqdm

from lesionlab.data.images import load_image
from lesionlab.data.transforms import frame_image
from lesionlab.io import atomic_write

# Truncated files must fail loudly, never be half-decoded into training data.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def pil_to_uint8_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


# Bumped whenever what the cache stores changes, so an old cache file is never read as a new one.
CACHE_FORMAT = "square-frame-v2"


class ImageCache:
    """Images decoded and resized once into a uint8 memmap (N, S, S, 3), shared by epochs, workers and models.

    Each image is stored as `transforms.frame_image(image, S)`: the whole image at its own aspect ratio squashed
    to the S x S frame the transforms start from (S = input_size / crop_fraction). That is the only resampling
    in preprocessing, so a cached item is bit-identical to decoding the file and running the same transform,
    which is what inference does; one fixed shape keeps the cache a single memmap, and the frame keeps the
    context around the crop that rotation augmentation needs. The file name hashes the format, the image paths,
    file sizes, mtimes and the size, so a changed image rebuilds it.
    """

    def __init__(self, paths: list[str], size: int, cache_dir: str | Path, *, max_pixels: int):
        self.paths = list(paths)
        self.size = int(size)
        self.shape_hw = (self.size, self.size)
        h = hashlib.sha256(f"{CACHE_FORMAT}|{self.size}".encode())
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
                img = pil_to_uint8_tensor(load_image(self.paths[i], max_pixels=self.max_pixels))
                arr[i] = frame_image(img, self.size).permute(1, 2, 0).numpy()

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

