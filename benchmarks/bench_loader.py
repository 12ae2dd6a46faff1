"""Data loading speed: images/s of the training DataLoader, decoding JPEGs each epoch vs the decode-once cache.

Uses the real HAM10000 copy in ../shared when present (200x150 JPEGs), else a synthetic 600x450 set.
    python benchmarks/bench_loader.py [--images 1200] [--size 224]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import SHARED_HAM, machine, scratch, write_section

from lesionlab.data.dataset import make_dataset
from lesionlab.data.synth import make_synthetic
from lesionlab.data.tables import read_table
from lesionlab.data.transforms import DataSpec, build_train_transform


def rate(ds, workers: int, batch: int = 32) -> float:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=False)
    t = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    tmp = scratch()
    rows = []
    sources = []
    if SHARED_HAM.exists():
        sources.append(("HAM10000 200x150 JPEG (../shared)", SHARED_HAM))
    synth = tmp / "synth"
    make_synthetic(synth, n_images=min(a.images, 400), size=(600, 450), progress=False)
    sources.append(("synthetic 600x450 JPEG", synth))
    tf = build_train_transform(spec=DataSpec(input_size=a.size))
    for label, src in sources:
        df = read_table(src).df.head(a.images)
        direct = make_dataset(df, tf, input_size=a.size, crop_fraction=2 / 3, cache_dir=None)
        for w in (0, 2):
            rows.append((label, f"decode every epoch, {w} workers", len(df), rate(direct, w)))
        t = time.perf_counter()
        cached = make_dataset(df, tf, input_size=a.size, crop_fraction=2 / 3, cache_dir=tmp / f"cache-{len(rows)}", progress=False)
        build = time.perf_counter() - t
        for w in (0, 2):
            rows.append((label, f"decode-once cache, {w} workers (built in {build:.1f}s)", len(df), rate(cached, w)))
    lines = [f"## Data loader ({a.size}x{a.size} output, random rotation + crop + resize + normalise)", "",
             f"Machine: {machine()}", "", "| images | loader | n | images/s |", "|---|---|---:|---:|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} |" for r in rows]
    lines += ["", "The cache keeps each image decoded and resized once (uint8 memmap shared by epochs, workers and the four "
              "models), so an epoch costs only the rotation/crop/resize of a small array."]
    write_section("loader", "\n".join(lines))


if __name__ == "__main__":
    main()
