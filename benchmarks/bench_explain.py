"""Explanation speed on CPU: one image, Grad-CAM (and Guided Grad-CAM) with all four models and their mean.

    python benchmarks/bench_explain.py [--size 224] [--repeat 3]
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import machine, scratch, timed, untrained_checkpoints, write_section
from PIL import Image

from lesionlab.explain.gradcam import explain_image
from lesionlab.inference.predictor import load_predictors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    preds = load_predictors(untrained_checkpoints(scratch(), a.size), device="cpu", precision="auto")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (450, 600, 3), dtype=np.uint8))
    rows = []
    for method in ("gradcam", "guided-gradcam"):
        t = np.median(timed(lambda m=method: explain_image(preds, img, method=m), repeat=a.repeat))
        rows.append(f"| {method} | 4 models + mean | {t:.2f} s |")
        print(rows[-1], flush=True)
    t1 = np.median(timed(lambda: explain_image(preds[1:2], img, method="gradcam"), repeat=a.repeat))
    rows.append(f"| gradcam | resnext101_32x4d alone | {t1:.2f} s |")
    write_section("explain", "\n".join([
        f"## Explanations on CPU (one 600x450 image, {a.size}x{a.size} input)", "", f"Machine: {machine()}", "",
        "| method | models | time per image |", "|---|---|---:|", *rows, "",
        "Includes the ensemble prediction that picks the class; gradients are computed in fp32. Median of "
        f"{a.repeat} runs after one warm-up."]))


if __name__ == "__main__":
    main()
