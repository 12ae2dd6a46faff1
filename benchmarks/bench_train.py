"""Training speed per architecture: images/s of forward+backward+Adam step, fp32 NCHW vs bf16 channels_last.

    python benchmarks/bench_train.py [--size 224] [--batch 16] [--steps 3] [--archs all]
On CUDA (when available) it also measures the GPU path (bf16 autocast + channels_last).
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--archs", default="all")
    a = ap.parse_args()
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
    lines += ["", "Both columns of a row come from one run of this script. Reference: NVIDIA reports 908 img/s for "
              "ResNeXt101-32x4d training on one A100 with mixed precision; our target on one H100 is >= 2000 img/s "
              "including data loading (not measured here: no GPU was available to this session)."]
    write_section("train", "\n".join(lines))


if __name__ == "__main__":
    main()
