"""The two augmentation paths side by side: CPU (DataLoader workers do rotation/crop/normalise in float32) against
the device path (workers send uint8 frames + drawn parameters, `lesionlab.data.gpu_augment` augments the batch on
the device). Both go through the same dataset, uint8 image cache, sampler and loader settings as `lesionlab train`.

    python benchmarks/bench_gpu_augment.py [--data HAM_DIR] [--device cpu] [--size 224] [--batch 32] [--workers 2]
        augmentation only (loader -> normalised batch on the device), both paths: a sanity number on any machine.
        Without --data a small synthetic set is made.

    python benchmarks/bench_gpu_augment.py --data HAM_DIR [--split CSV] --device cuda --arch resnext101_32x4d \
        --size 224 --batch 128 --compile both --seconds 5 --json out.json
        also whole training steps (bf16 autocast, channels_last, Adam) of `--arch`: on a batch already on the
        device (model compute only), through the CPU path and through the device path; with torch.compile too
        (`both`: the compiled model is timed on the device path only). Used by benchmarks/gpu_check.sh's throughput
        section; the JSON is rewritten after every number, so a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from lesionlab import models, runtime
from lesionlab.data.dataset import EpochSampler, make_dataset, seed_worker
from lesionlab.data.gpu_augment import on_device, training_transforms
from lesionlab.data.transforms import DataSpec
from lesionlab.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import _sync, throughput, train_step  # noqa: E402  one timed step and loop for both benchmarks

PATHS = {"cpu": "real data path, CPU augmentation", "device": "real data path, GPU augmentation"}


def loader(train, *, path: str, spec: DataSpec, batch: int, workers: int, cache_dir: Path, device: torch.device):
    """One path's training loader, as `lesionlab train` builds it (paper augmentation, per-sample seeds, pinned
    memory on CUDA, persistent workers); drop_last keeps every batch one shape (torch.compile)."""
    tf, _ = training_transforms(spec=spec, rotation=180.0, hflip=False, vflip=False, color_jitter=0.0,
                                device_side=path == "device")
    ds = make_dataset(train, tf, input_size=spec.input_size, crop_fraction=spec.crop_fraction, cache_dir=cache_dir,
                      progress=False)
    workers = runtime.worker_count(workers)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=EpochSampler(len(ds), seed=0), num_workers=workers,
                                     worker_init_fn=seed_worker, pin_memory=device.type == "cuda",
                                     persistent_workers=workers > 0, drop_last=True)
    return on_device(dl, spec=spec, device=device, enabled=path == "device")


def batches(dl, device: torch.device):
    """Endless (x on the device, y on the device) from a loader of either path."""
    epoch = 0
    while True:
        dl.sampler.set_epoch(epoch)
        for x, y in dl:
            yield runtime.to_device(x, device), y.to(device, non_blocking=True)
        epoch += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="HAM10000-layout folder (default: a synthetic set made here)")
    ap.add_argument("--split", help="split CSV (default: a lesion-grouped split made here)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--limit", type=int, default=0, help="at most this many training images")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per number")
    ap.add_argument("--aug-seconds", type=float, default=0.0, help="timed seconds per augmentation-only number "
                    "(default: --seconds)")
    ap.add_argument("--min-steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--arch", default="", help="also time training steps of this architecture")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="off")
    ap.add_argument("--cache-dir", default="", help="uint8 image cache (default: a temporary folder)")
    ap.add_argument("--json", help="write the numbers here, after every one")
    a = ap.parse_args()
    device = runtime.pick_device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    work = Path(tempfile.mkdtemp(prefix="lesionlab-bench-aug-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # scratch: results go elsewhere
    data = a.data
    if not data:
        from lesionlab.data.synth import make_synthetic

        data = str(work / "synth")
        make_synthetic(data, n_images=max(160, a.limit or 0, 2 * a.batch + 40), seed=1, size=(200, 150), progress=False)
    from gpu_common import frames

    train = frames(data, a.split, limit=a.limit)["train"]
    spec = DataSpec(input_size=a.size)
    out: dict = {"device": str(device), "size": a.size, "batch": a.batch, "workers": runtime.worker_count(a.workers),
                 "train_images": len(train), "torch_threads": torch.get_num_threads(), "results": []}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    if a.arch:
        out["arch"] = models.expand_archs(a.arch)[0]

    def save(row: dict | None = None) -> None:
        if row is not None:
            out["results"].append(row)
            print(f"{row['stage']:>18} | {row['source']:<36} | compile {'on' if row['compile'] else 'off'} | "
                  f"{row['images_per_s']:8.1f} images/s ({row['steps']} steps)", flush=True)
        if a.json:
            atomic_write_text(Path(a.json), json.dumps(out, indent=1))

    t = time.perf_counter()
    cache = Path(a.cache_dir) if a.cache_dir else work / "cache"
    loaders = {p: loader(train, path=p, spec=spec, batch=a.batch, workers=a.workers, cache_dir=cache, device=device)
               for p in PATHS}
    out["cache_seconds"] = round(time.perf_counter() - t, 1)
    sources = {p: batches(dl, device) for p, dl in loaders.items()}
    save()

    def consume(x, y):  # augmentation only: the batch is made and on the device
        return None

    for p in PATHS:
        r = throughput(consume, sources[p], batch=a.batch, seconds=a.aug_seconds or a.seconds, min_steps=a.min_steps,
                       warmup=a.warmup, device=device)
        save({**r, "stage": "augmentation only", "source": PATHS[p], "compile": False})
    if a.arch:
        torch.manual_seed(0)
        x0 = runtime.to_device(torch.randn(a.batch, 3, a.size, a.size), device)
        y0 = torch.randint(0, 7, (a.batch,)).to(device)
        for compiled in {"off": [False], "on": [True], "both": [False, True]}[a.compile]:
            step = train_step(out["arch"], device, compiled=compiled,
                              amp=torch.bfloat16 if device.type == "cuda" or runtime.cpu_has_bf16() else None)
            tc = time.perf_counter()
            step(x0, y0)  # the first step compiles (and cuDNN picks its algorithms)
            _sync(device)
            first = round(time.perf_counter() - tc, 1)
            runs = [("device-resident batch", itertools.repeat((x0, y0)))]
            runs += [(PATHS[p], sources[p]) for p in (["cpu", "device"] if not compiled else ["device"])]
            for source, src in runs:
                r = throughput(step, src, batch=a.batch, seconds=a.seconds, min_steps=a.min_steps, warmup=a.warmup,
                               device=device)
                save({**r, "stage": "training step", "source": source, "compile": compiled, "first_step_seconds": first})
    save()


if __name__ == "__main__":
    main()
