"""Training speed: images/s of forward + backward + Adam step.

Two modes:

    python benchmarks/bench_train.py [--size 224] [--batch 16] [--steps 3] [--archs all]
        every architecture, fp32 NCHW vs bf16 channels_last, synthetic tensors (model compute only), on the CPU
        and (when available) CUDA; writes the `train` section of docs/benchmarks.md.

    python benchmarks/bench_train.py --data HAM_DIR [--split CSV] --archs resnext101_32x4d --size 224 --batch 128 \
        --compile both --seconds 12 --json out.json --no-doc
        one architecture on the fastest device, bf16 + channels_last, with and without torch.compile, measured
        twice: on a batch already on the device (model compute only) and through the real data path (uint8
        image cache, random rotation + crop + resize in DataLoader workers on all CPU cores, pinned memory),
        as `lesionlab train` feeds the model. Used by benchmarks/gpu_check.sh; writes JSON after every number.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch
from _common import machine, timed, write_section

from lesionlab import models, runtime


def bench(arch: str, device: torch.device, amp: torch.dtype | None, channels_last: bool, size: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model, _ = models.create_model(arch, pretrained="none")
    model = runtime.prepare_model(model, device, channels_last=channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = runtime.to_device(torch.randn(batch, 3, size, size), device, channels_last=channels_last)
    y = torch.randint(0, 7, (batch,), device=device)
    crit = torch.nn.CrossEntropyLoss()

    def step():
        with runtime.autocast(device, amp):
            loss = crit(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = timed(step, repeat=steps, warmup=1)
    return batch / (sum(times) / len(times))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def real_loader(data: str, split: str | None, *, size: int, batch: int, workers: int, cache_dir: Path,
                limit: int = 0) -> torch.utils.data.DataLoader:
    """The training data path of `lesionlab train` (paper augmentation) over the training split, full batches only.

    Same dataset, transform and loader settings as training/fit.py; drop_last keeps every batch the same shape
    so torch.compile does not recompile for the last one.
    """
    from gpu_common import frames

    from lesionlab.data.dataset import make_dataset
    from lesionlab.data.transforms import DataSpec, build_train_transform

    train = frames(data, split, limit=limit)["train"]
    spec = DataSpec(input_size=size)
    tf = build_train_transform(spec=spec, rotation=180.0)
    ds = make_dataset(train, tf, input_size=size, crop_fraction=spec.crop_fraction, cache_dir=cache_dir, progress=False)
    workers = runtime.worker_count(workers)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=True,
                                       persistent_workers=workers > 0, drop_last=True)


def _batches(loader):
    while True:
        yield from loader


def throughput(step, batches, *, batch: int, seconds: float, min_steps: int, warmup: int, device: torch.device) -> dict:
    """Run `step(x, y)` over `batches`: `warmup` steps untimed, then at least `min_steps` steps and `seconds`."""
    for _ in range(warmup):
        step(*next(batches))
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < seconds:
        step(*next(batches))
        n += 1
    _sync(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": round(n * batch / dt, 1), "steps": n, "seconds": round(dt, 2)}


def check_mode(a: argparse.Namespace) -> None:
    device = runtime.pick_device("auto")
    arch = models.expand_archs(a.archs)[0]
    out: dict = {"arch": arch, "size": a.size, "batch": a.batch, "device": str(device), "precision": "bf16",
                 "channels_last": True, "workers": runtime.worker_count(a.workers), "results": []}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        torch.backends.cudnn.benchmark = True

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))

    t = time.perf_counter()
    loader = real_loader(a.data, a.split, size=a.size, batch=a.batch, workers=a.workers,
                         cache_dir=Path(a.cache_dir), limit=a.limit)
    out["train_images"] = len(loader.dataset)
    out["cache_seconds"] = round(time.perf_counter() - t, 1)
    real = _batches(loader)
    torch.manual_seed(0)
    x0 = torch.randn(a.batch, 3, a.size, a.size)
    y0 = torch.randint(0, 7, (a.batch,))
    for compiled in {"off": [False], "on": [True], "both": [False, True]}[a.compile]:
        step = train_step(arch, device, compiled=compiled)

        tc = time.perf_counter()
        step(x0, y0)  # the first step compiles
        _sync(device)
        first = time.perf_counter() - tc
        xd, yd = runtime.to_device(x0, device), y0.to(device)
        resident = itertools.repeat((xd, yd))
        for source, batches in (("device-resident batch", resident), ("real data path", real)):
            r = throughput(step, batches, batch=a.batch, seconds=a.seconds, min_steps=a.min_steps,
                           warmup=a.warmup, device=device)
            r.update(compile=compiled, source=source, first_step_seconds=round(first, 1))
            out["results"].append(r)
            save()
            print(f"{arch} compile={compiled} {source}: {r['images_per_s']} img/s ({r['steps']} steps)", flush=True)
    save()


def train_step(arch: str, device: torch.device, *, compiled: bool, amp: torch.dtype | None = torch.bfloat16):
    """One Adam step of `arch` (random weights, channels_last, cross-entropy, `amp` autocast) as a function of a
    batch, which is moved to `device` if it is not there yet (bench_gpu_augment.py times the same step)."""
    torch.manual_seed(0)
    model, _ = models.create_model(arch, pretrained="none")
    model = runtime.prepare_model(model, device, channels_last=True).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    run_model = torch.compile(model) if compiled else model
    crit = torch.nn.CrossEntropyLoss()

    def step(x, y):
        x = runtime.to_device(x, device, channels_last=True)
        y = y.to(device, non_blocking=True)
        with runtime.autocast(device, amp):
            loss = crit(run_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--archs", default="all")
    ap.add_argument("--data", help="HAM10000-layout folder: measure the real data path (check mode, see above)")
    ap.add_argument("--split", help="split CSV (default: a lesion-grouped split made here)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many training images (dry runs)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--seconds", type=float, default=12.0, help="timed seconds per measurement")
    ap.add_argument("--min-steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cache-dir", default="/tmp/lesionlab-bench-cache")
    ap.add_argument("--json", help="write the numbers here (check mode)")
    a = ap.parse_args()
    if a.data:
        check_mode(a)
        return
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines = [f"## Training throughput ({a.size}x{a.size}, batch {a.batch}, synthetic tensors, model compute only)", "",
             f"Machine: {machine()}", "", "| device | architecture | fp32 NCHW img/s | bf16 channels_last img/s | ratio |",
             "|---|---|---:|---:|---:|"]
    for dev in devices:
        for arch in models.expand_archs(a.archs):
            fp32 = bench(arch, dev, None, False, a.size, a.batch, a.steps)
            bf16 = bench(arch, dev, torch.bfloat16, True, a.size, a.batch, a.steps)
            lines.append(f"| {dev.type} | {arch} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f}x |")
            print(lines[-1], flush=True)
    lines += ["", "Both columns of a row come from one run of this script. GPU training throughput through the real "
              "data path: the `gpu-check` section (benchmarks/gpu_check.sh)."]
    write_section("train", "\n".join(lines))


if __name__ == "__main__":
    main()
