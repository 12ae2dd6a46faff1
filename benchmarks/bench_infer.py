"""CPU inference speed: every engine (torch, ONNX Runtime, OpenVINO, auto) beside plain timm fp32 eager, for one
model and the four-model ensemble, batch 16 and one image, with the CPU's flags; and, given trained runs and real
images, how closely bf16 matches fp32. `auto` against every engine, timed interleaved in one process, is
benchmarks/bench_engines.py.

    python benchmarks/bench_infer.py [--batches 1,16] [--repeat 3] [--warmup 2]
    python benchmarks/bench_infer.py --runs STUDY/runs --data ../shared/data/ham10000-200x150 --images 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import timm
import torch
from _common import machine, scratch, timed, untrained_checkpoints, write_section

from lesionlab import models


def speed(batches: list[int], repeat: int, warmup: int, size: int) -> list[str]:
    """Every engine side by side (plain timm fp32 eager as the anchor): each member timed on its own; the
    ensemble's time is the sum of its members' (EnsemblePredictor runs them one after another)."""
    import gc

    from lesionlab.inference import engines
    from lesionlab.inference.predictor import Predictor

    cks = dict(zip(models.PAPER_ARCHS, untrained_checkpoints(scratch(), size), strict=True))
    inputs = {b: torch.randn(b, 3, size, size) for b in batches}
    if engines.available(engines.INT8):
        # For speed only: int8 bodies of the random-weight members, calibrated on image-like inputs and marked
        # accepted by hand; on real models `bundle --int8` decides acceptance by agreement (make realdata checks it).
        calib = engines.verification_batch(size, n=16, seed=5).numpy()
        for arch, ck in cks.items():
            print(f"int8: quantising {arch}", flush=True)
            pr = Predictor(ck, device="cpu", precision="fp32")
            engines.export_body_onnx(pr.model, size, ck / engines.ONNX_FILE)
            engines.quantize_int8(ck / engines.ONNX_FILE, calib, ck / engines.INT8_FILE)
            (ck / engines.INT8_RECORD).write_text('{"accepted": true, "note": "speed benchmark only"}')
    cols = ["timm fp32 eager"] + [e for e in engines.ENGINES if engines.available(e) or e == "auto"]
    res: dict[tuple[str, int, str], float] = {}
    picked: dict[str, str] = {}
    for col in cols:
        for arch, ck in cks.items():
            if col == "timm fp32 eager":
                net = timm.create_model(models.read_meta(ck)["timm_id"], pretrained=False, num_classes=7).eval()
                net.load_state_dict(Predictor(ck, device="cpu", precision="fp32").model.state_dict())

                def run(x, net=net):
                    with torch.no_grad():
                        return torch.softmax(net(x), 1)
            else:
                pr = Predictor(ck, device="cpu", precision="auto", engine=col)
                if col == "auto":
                    picked[arch] = pr.engine
                run = pr.predict_batch
            for b, x in inputs.items():
                res[(arch, b, col)] = float(np.median(timed(lambda x=x, r=run: r(x), repeat=repeat, warmup=warmup)))
                print(arch, b, col, f"{res[(arch, b, col)] * 1000:.1f} ms", flush=True)
            run = pr = net = None
            gc.collect()
    for b in inputs:
        for col in cols:
            res[("4-model ensemble", b, col)] = sum(res[(a, b, col)] for a in cks)
    rows = []
    for label in ("resnext101_32x4d", "4-model ensemble"):
        for b in inputs:
            base = res[(label, b, "timm fp32 eager")]
            cells = []
            for col in cols:
                t = res[(label, b, col)]
                val = f"{t * 1000:.0f} ms" if b == 1 else f"{b / t:.1f} img/s"
                cells.append(val + ("" if col == "timm fp32 eager" else f" ({base / t:.2f}x)"))
            what = "single-image latency" if b == 1 else f"batch {b} throughput"
            rows.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
    b0 = min(inputs)
    best = min(res[("4-model ensemble", b0, c)] for c in cols if c not in ("timm fp32 eager", "auto"))
    auto = res[("4-model ensemble", b0, "auto")]
    flags = " ".join(engines.cpu_flags()) or "none found"
    return [f"## CPU inference engines ({size}x{size}): every engine side by side", "",
            f"Machine: {machine()}", "", f"CPU flags: {flags}", "",
            "| model | measure | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols), *rows, "",
            f"`auto` picked: {', '.join(f'{a}: {e}' for a, e in picked.items())}. Ensemble at batch {b0}: auto "
            f"{auto * 1000:.0f} ms, best engine {best * 1000:.0f} ms ({auto / best:.2f}x; goal <= 1.10x).",
            "", f"Median of {repeat} runs after {warmup} warm-up(s), per member; the ensemble row is the sum of its "
            "members (they run one after another). Speed-ups against timm fp32 eager in the same run. `torch` is "
            "the Predictor's own path (bf16 TorchScript body where the CPU has AMX / AVX512-BF16, else fp32 eager); "
            "onnxruntime and openvino run the fp32 ONNX export of the body, the head stays in torch; "
            "onnxruntime-int8 runs its static int8 quantisation (calibrated here on 16 image-like inputs: speed only, "
            "its agreement is not meaningful on random weights); `auto` verifies "
            "each against fp32 and keeps the fastest single-image latency (lesionlab/inference/engines/). Random "
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
    ap.add_argument("--batches", default="1,16", help="comma list of batch sizes")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=Path, nargs="*", help="trained runs for the bf16 agreement check")
    ap.add_argument("--data", type=Path, help="real images for the bf16 agreement check")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    if not a.skip_speed:
        write_section("infer", "\n".join(speed([int(b) for b in a.batches.split(",")], a.repeat, a.warmup, a.size)))
    if a.runs and a.data:
        write_section("bf16-agreement", "\n".join(agreement(a.runs, a.data, a.images)))


if __name__ == "__main__":
    main()
