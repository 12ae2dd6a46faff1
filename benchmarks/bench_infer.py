"""CPU inference speed: every engine (torch, ONNX Runtime, OpenVINO, auto) beside plain timm fp32 eager, for one
model and the four-model ensemble, batch 16 and one image, with the CPU's flags; and, given trained runs and real
images, how closely bf16 matches fp32.

    python benchmarks/bench_infer.py [--batch 16] [--repeat 3]
    python benchmarks/bench_infer.py --runs STUDY/runs --data ../shared/data/ham10000-200x150 --images 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import timm
import torch
from _common import machine, timed, untrained_checkpoints, write_section

from lesionlab import models


def speed(batch: int, repeat: int, size: int) -> list[str]:
    """Every engine side by side (and plain timm fp32 eager as the anchor), one model and the 4-model ensemble."""
    import gc
    import tempfile

    from lesionlab.inference import engines
    from lesionlab.inference.predictor import Predictor

    cks = dict(zip(models.PAPER_ARCHS, untrained_checkpoints(Path(tempfile.mkdtemp()), size), strict=True))
    cases = [("resnext101_32x4d", ["resnext101_32x4d"]), ("4-model ensemble", list(models.PAPER_ARCHS))]
    inputs = {b: torch.randn(b, 3, size, size) for b in (1, batch)}
    cols = ["timm fp32 eager"] + [e for e in engines.ENGINES if engines.available(e) or e == "auto"]
    res: dict[tuple[str, int, str], float] = {}
    picked: dict[str, str] = {}
    for col in cols:
        if col == "timm fp32 eager":
            nets = {}
            for arch, ck in cks.items():
                nets[arch] = timm.create_model(models.read_meta(ck)["timm_id"], pretrained=False, num_classes=7).eval()
                nets[arch].load_state_dict(Predictor(ck, device="cpu", precision="fp32").model.state_dict())

            def run(names, x, nets=nets):
                with torch.no_grad():
                    return [torch.softmax(nets[n](x), 1) for n in names]
        else:
            preds = {arch: Predictor(ck, device="cpu", precision="auto", engine=col) for arch, ck in cks.items()}
            if col == "auto":
                picked = {arch: p.engine for arch, p in preds.items()}

            def run(names, x, preds=preds):
                return [preds[n].predict_batch(x) for n in names]
        for label, names in cases:
            for b, x in inputs.items():
                res[(label, b, col)] = float(np.median(timed(lambda n=names, x=x, r=run: r(n, x), repeat=repeat, warmup=2)))
                print(label, b, col, f"{res[(label, b, col)] * 1000:.1f} ms", flush=True)
        run = None
        gc.collect()
    rows = []
    for label, _ in cases:
        for b in inputs:
            base = res[(label, b, "timm fp32 eager")]
            cells = []
            for col in cols:
                t = res[(label, b, col)]
                val = f"{t * 1000:.0f} ms" if b == 1 else f"{b / t:.1f} img/s"
                cells.append(val + ("" if col == "timm fp32 eager" else f" ({base / t:.2f}x)"))
            what = "single-image latency" if b == 1 else f"batch {b} throughput"
            rows.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
    best_one = min(res[("4-model ensemble", 1, c)] for c in cols if c not in ("timm fp32 eager", "auto"))
    auto_one = res[("4-model ensemble", 1, "auto")]
    flags = " ".join(engines.cpu_flags()) or "none found"
    return [f"## CPU inference engines ({size}x{size}): every engine side by side", "",
            f"Machine: {machine()}", "", f"CPU flags: {flags}", "",
            "| model | measure | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols), *rows, "",
            f"`auto` picked: {', '.join(f'{a}: {e}' for a, e in picked.items())}. Single-image ensemble latency: auto "
            f"{auto_one * 1000:.0f} ms, best engine {best_one * 1000:.0f} ms ({auto_one / best_one:.2f}x; goal <= 1.10x).",
            "", f"Median of {repeat} runs after two warm-ups; speed-ups against timm fp32 eager in the same run. `torch` is "
            "the Predictor's own path (bf16 TorchScript body where the CPU has AMX / AVX512-BF16, else fp32 eager); "
            "onnxruntime and openvino run the fp32 ONNX export of the body, the head stays in torch; `auto` verifies "
            "each against fp32 and picks the fastest single-image latency (lesionlab/inference/engines.py). Random "
            "weights: speed does not depend on them."]


def agreement(runs: list[Path], data: Path, n: int) -> list[str]:
    from lesionlab.data.tables import read_table
    from lesionlab.inference.predictor import find_checkpoints, load_predictors

    df = read_table(data).df
    df = df[df["path"] != ""].sample(n=min(n, len(df)), random_state=0)
    cks = find_checkpoints(runs)
    p32 = {p.name: p.predict_frame(df, progress=False) for p in load_predictors(cks, device="cpu", precision="fp32")}
    p16 = {p.name: p.predict_frame(df, progress=False) for p in load_predictors(cks, device="cpu", precision="bf16")}
    p32["ensemble"] = np.mean([p32[k] for k in list(p32)], axis=0)
    p16["ensemble"] = np.mean([p16[k] for k in list(p16)], axis=0)
    rows = []
    for k in p32:
        agree = float(np.mean(p32[k].argmax(1) == p16[k].argmax(1)))
        diff = float(np.abs(p32[k] - p16[k]).max())
        rows.append(f"| {k} | {len(df)} | {agree:.4f} | {diff:.4f} |")
        print(rows[-1], flush=True)
    return [f"## bf16 vs fp32 predictions on real images ({data.name}, {len(df)} random images)", "",
            f"Checkpoints: {', '.join(str(c) for c in cks)}", "", f"Machine: {machine()}", "",
            "| model | images | top-1 agreement | largest probability difference |", "|---|---:|---:|---:|", *rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=Path, nargs="*", help="trained runs for the bf16 agreement check")
    ap.add_argument("--data", type=Path, help="real images for the bf16 agreement check")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    if not a.skip_speed:
        write_section("infer", "\n".join(speed(a.batch, a.repeat, a.size)))
    if a.runs and a.data:
        write_section("bf16-agreement", "\n".join(agreement(a.runs, a.data, a.images)))


if __name__ == "__main__":
    main()
