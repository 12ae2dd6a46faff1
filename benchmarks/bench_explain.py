"""Explanation speed on CPU: one image, Grad-CAM (and Guided Grad-CAM) with all four models and their mean.

    python benchmarks/bench_explain.py [--size 224] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import machine, timed, write_section
from PIL import Image

from lesionlab import models
from lesionlab.explain import explain_image
from lesionlab.predict import load_predictors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    for arch in models.PAPER_ARCHS:
        torch.manual_seed(0)
        m, spec = models.create_model(arch, pretrained="none")
        models.save_checkpoint(m, {"arch": arch, "timm_id": spec.timm_id, "input_size": a.size, "mean": [0.485, 0.456, 0.406],
                                   "std": [0.229, 0.224, 0.225], "crop_fraction": 2 / 3, "cam_layer": spec.cam_layer}, tmp / arch)
    preds = load_predictors([tmp / arch for arch in models.PAPER_ARCHS], device="cpu", precision="auto")
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
