"""`--engine auto` against every CPU engine and plain timm fp32 eager, for one architecture, on this machine.

One process, one model with random weights (speed does not depend on them): every engine the machine has (the
Predictor's torch path, ONNX Runtime, OpenVINO, ONNX Runtime int8), plain timm fp32 eager (the baseline), and a
Predictor with `engine="auto"` that chooses among them here and now (a fresh engine cache unless --cache). All are
timed interleaved (round-robin, the same timer `auto` uses: lesionlab/inference/engines/choice.py), one image and
then batch 16; the table gives each median and its ratio to the fastest, and what auto chose.

    python benchmarks/bench_engines.py [--arch resnet101] [--size 224] [--rounds 10] [--batch-rounds 3]
    # as on an AVX2-only CPU (see lesionlab/cpu.py for what this does and does not emulate):
    LESIONLAB_CPU_FLAGS="sse4_2 avx avx2 fma" ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python benchmarks/bench_engines.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import timm
import torch
from _common import scratch, untrained_checkpoints, write_section

from lesionlab import cpu, models
from lesionlab.inference import engines

EAGER_COL = "timm fp32 eager"
EMULATION_VARS = (cpu.FLAGS_ENV, "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def _versions() -> str:
    out = []
    for pkg in ("torch", "timm", "onnxruntime", "openvino"):
        try:
            out.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{pkg} not installed")
    return ", ".join(out)


def _command() -> str:
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in EMULATION_VARS if os.environ.get(k))
    return " ".join(filter(None, [env, "python benchmarks/bench_engines.py", *map(shlex.quote, sys.argv[1:])]))


def _int8_beside(ck: Path, size: int) -> None:
    """An int8 body beside the checkpoint, marked accepted by hand: for speed only (`bundle --int8` decides
    acceptance on real images by agreement; random weights say nothing about it)."""
    from lesionlab.inference.predictor import Predictor

    pr = Predictor(ck, device="cpu", precision="fp32")
    engines.export_body_onnx(pr.model, size, ck / engines.ONNX_FILE)
    calib = engines.verification_batch(size, n=16, seed=5).numpy()
    engines.quantize_int8(ck / engines.ONNX_FILE, calib, ck / engines.INT8_FILE)
    (ck / engines.INT8_RECORD).write_text('{"accepted": true, "note": "speed benchmark only"}')


def _runners(ck: Path, int8: bool) -> tuple[dict, dict]:
    """{column: images -> probabilities} for every engine here, plain eager and auto; and auto's engine_info."""
    from lesionlab.inference.predictor import Predictor

    net = timm.create_model(models.read_meta(ck)["timm_id"], pretrained=False, num_classes=7).eval()
    net.load_state_dict(Predictor(ck, device="cpu", precision="fp32").model.state_dict())

    def eager(x, net=net):
        with torch.inference_mode():
            return torch.softmax(net(x), 1)

    runners = {EAGER_COL: eager}
    for name in ("torch", *engines.EXPORTED, *([engines.INT8] if int8 else [])):
        if engines.available(name):
            print(f"loading {name}", flush=True)
            runners[name] = Predictor(ck, device="cpu", precision="auto", engine=name).predict_batch
    print("auto: choosing", flush=True)
    auto = Predictor(ck, device="cpu", precision="auto", engine="auto")
    runners["auto"] = auto.predict_batch
    return runners, auto.engine_info()


def _what(col: str, info: dict) -> str:
    if col == EAGER_COL:
        return "timm model, fp32, contiguous"
    if col == "torch":
        return ("bf16 TorchScript body, channels_last" if cpu.has_bf16() else "fp32 eager body, channels_last")
    if col == "auto":
        chose = info["auto_choice"]
        return f"chose **{chose}** ({info['precision']}" + (", channels_last)" if info["channels_last"] else ")")
    return "int8 ONNX body (QDQ)" if col == engines.INT8 else "fp32 ONNX body"


def bench(arch: str, size: int, rounds: int, batch_rounds: int, budget_s: float, int8: bool) -> str:
    tmp = scratch("bench-engines-")
    [ck] = untrained_checkpoints(tmp, size, (arch,))
    if int8 and engines.available(engines.INT8):
        print("int8: quantising", flush=True)
        _int8_beside(ck, size)
    load_before = os.getloadavg()
    runners, info = _runners(ck, int8 and engines.available(engines.INT8))
    one, batch = torch.randn(1, 3, size, size), torch.randn(16, 3, size, size)
    timing = engines.Timing(warmup=2, min_rounds=rounds, max_rounds=3 * rounds, budget_s=budget_s)
    print("timing one image, interleaved", flush=True)
    ms1 = engines.time_interleaved({c: (lambda r=r: r(one)) for c, r in runners.items()}, timing)
    print("timing batch 16, interleaved", flush=True)
    ms16 = engines.time_interleaved({c: (lambda r=r: r(batch)) for c, r in runners.items()}, engines.Timing(
        warmup=2, min_rounds=batch_rounds, max_rounds=batch_rounds))
    load_after = os.getloadavg()
    med1 = {c: statistics.median(v) for c, v in ms1.items()}
    med16 = {c: statistics.median(v) for c, v in ms16.items()}
    best1 = min(v for c, v in med1.items() if c != "auto")
    best16 = min(v for c, v in med16.items() if c != "auto")
    rows = [f"| {c} | {_what(c, info)} | {med1[c]:.0f} ms | {med1[c] / best1:.2f}x | {med16[c]:.0f} ms "
            f"({16000 / med16[c]:.1f} img/s) | {med16[c] / best16:.2f}x |" for c in runners]
    trial = ", ".join(f"{e} {ms:.0f} ms" for e, ms in sorted(info["trial_ms"].items(), key=lambda kv: kv[1]))
    fastest1 = min((c for c in med1 if c != "auto"), key=med1.get)
    emulated = cpu.flags_override() is not None
    lines = [
        f"## `--engine auto` against every engine: {arch}, {size}x{size}"
        + (" (emulated AVX2-only CPU)" if emulated else ""), "",
        f"`{_command()}`", "",
        f"Machine: {cpu.model_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"{cpu.describe()}; ATen kernels {torch.backends.cpu.get_cpu_capability()}; "
        f"{_versions()}; Python {platform.python_version()}; {dt.date.today().isoformat()}. "
        f"Load average (1 min) {load_before[0]:.1f} before timing, {load_after[0]:.1f} after: a **shared** machine, "
        "so compare ratios within this table, not absolute times across tables.", "",
        "| engine | what runs | 1 image | vs fastest | batch 16 | vs fastest |", "|---|---|---:|---:|---:|---:|",
        *rows, "",
        f"`auto` chose {info['auto_choice']}: one image {med1['auto'] / best1:.2f}x the fastest ({fastest1}), batch 16 "
        f"{med16['auto'] / best16:.2f}x the fastest (goal: within 1.10x). Its own trial (verified candidates, "
        f"median one-image ms, interleaved until stable): {trial}.", "",
        f"Medians over interleaved rounds ({len(ms1[EAGER_COL])} of one image after 2 warm-ups, "
        f"{len(ms16[EAGER_COL])} of batch 16), full prediction (body, head, softmax). Random weights"
        + ("; the int8 body is calibrated on 16 image-like inputs and marked accepted by hand, for speed only."
           if engines.INT8 in runners else "."),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet101", help="a LesionLab model name (registry or timm:<name>)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved one-image rounds at least")
    ap.add_argument("--batch-rounds", type=int, default=3, help="interleaved batch-16 rounds")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of one-image rounds at most, once --rounds are done")
    ap.add_argument("--no-int8", action="store_true", help="leave out the int8 engine")
    ap.add_argument("--cache", action="store_true", help="keep LESIONLAB_CACHE (auto may reuse an earlier choice)")
    ap.add_argument("--print-only", action="store_true", help="print the table, leave docs/benchmarks.md alone")
    ap.add_argument("--section", help="docs/benchmarks.md section (default: engines, or engines-emulated under "
                                      f"{cpu.FLAGS_ENV})")
    a = ap.parse_args()
    if not a.cache:  # auto chooses in this run, not from an earlier one
        os.environ["LESIONLAB_CACHE"] = str(scratch("bench-engines-cache-"))
    section = a.section or ("engines-emulated" if cpu.flags_override() is not None else "engines")
    table = bench(a.arch, a.size, a.rounds, a.batch_rounds, a.budget, not a.no_int8)
    print(table) if a.print_only else write_section(section, table)


if __name__ == "__main__":
    main()
