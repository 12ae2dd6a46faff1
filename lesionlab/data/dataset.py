"""The torch Dataset over a table of images (cached or decoded on the fly)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from PIL import ImageFile

from lesionlab.data.cache import ImageCache, cache_shape, pil_to_uint8_tensor
from lesionlab.data.images import DEFAULT_MAX_PIXELS, load_image, source_hw
from lesionlab.labels import CLASS_INDEX

# Truncated files must fail loudly, never be half-decoded into training data.
ImageFile.LOAD_TRUNCATED_IMAGES = False


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

