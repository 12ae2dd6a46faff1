"""The torch Dataset over a table of images (cached or decoded on the fly), and its epoch-seeded sampler."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import ImageFile

from lesionlab.data.cache import ImageCache, pil_to_uint8_tensor
from lesionlab.data.images import DEFAULT_MAX_PIXELS, load_image
from lesionlab.data.transforms import frame_size
from lesionlab.labels import CLASS_INDEX

# Truncated files must fail loudly, never be half-decoded into training data.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class LesionDataset(torch.utils.data.Dataset):
    """Images of a table (from disk or an `ImageCache`) through a transform; yields (tensor, class index).

    The class index is -1 for unlabelled rows. An index may be an int, or `(index, seed)` as `EpochSampler`
    yields: the transform then draws its randomness from a torch RNG seeded with `seed` alone, so an item's
    augmentation does not depend on which worker process made it or on what ran before.
    """

    def __init__(self, df: pd.DataFrame, transform, *, cache: ImageCache | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 classes: Sequence[str] | None = None):
        self.paths = df["path"].tolist()
        labels = df["label"] if "label" in df else pd.Series([""] * len(df))
        index = CLASS_INDEX if classes is None else {c: i for i, c in enumerate(classes)}
        self.targets = [index.get(lbl, -1) for lbl in labels]
        self.transform = transform
        self.cache = cache
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | tuple[int, int]):
        i, seed = index if isinstance(index, tuple) else (index, None)
        if self.cache is not None:
            img = self.cache[i]
        else:
            img = pil_to_uint8_tensor(load_image(self.paths[i], max_pixels=self.max_pixels))
        if seed is None:
            return self.transform(img), self.targets[i]
        # fork_rng restores the caller's RNG afterwards: with num_workers=0 this runs in the training process,
        # whose RNG (dropout, ...) must not depend on the augmentation draws.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img), self.targets[i]


def sample_seed(seed: int, epoch: int, index: int | None = None) -> int:
    """A well-mixed 63-bit seed that depends only on (run seed, epoch, sample index); no index: the shuffle's."""
    words = [seed % 2**64, epoch, 0] if index is None else [seed % 2**64, epoch, 1, index]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled indices paired with per-sample augmentation seeds; both a pure function of (seed, epoch).

    The seeds travel with the indices to the DataLoader workers, so persistent workers see each epoch's seeds
    too, and an epoch is the same whatever the number of workers, and whether or not the run was resumed.
    With `base` (e.g. a `DistributedSampler`), its order is used instead of this sampler's own shuffle.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, base: torch.utils.data.Sampler | None = None):
        self.n, self.seed, self.shuffle, self.base, self.epoch = n, int(seed), shuffle, base, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base) if self.base is not None else self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        if self.base is not None:
            order = list(self.base)
        elif self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for i in order:
            yield i, sample_seed(self.seed, epoch, i)


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: numpy and `random` seeded from the worker's torch seed (which torch sets).

    Transforms draw from torch (seeded per sample by `LesionDataset`); this covers code that uses numpy or random.
    """
    s = torch.initial_seed()
    np.random.seed(s % 2**32)
    random.seed(s)


def make_dataset(
    df: pd.DataFrame,
    transform,
    *,
    input_size: int,
    crop_fraction: float,
    cache_dir: str | Path | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    classes: Sequence[str] | None = None,
) -> LesionDataset:
    """A `LesionDataset`, backed by an `ImageCache` (images stored at the transforms' square frame) when `cache_dir` is given."""
    cache = None
    if cache_dir and len(df):
        size = frame_size(input_size, crop_fraction)
        cache = ImageCache(df["path"].tolist(), size, cache_dir, max_pixels=max_pixels).build(progress)
    return LesionDataset(df, transform, cache=cache, max_pixels=max_pixels, classes=classes)
