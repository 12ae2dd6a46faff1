"""Cross-site validation on the real HAM10000 sources (the `dataset` column): the runs docs/cross-site-ham10000.md reports.

Trains on vidir_modern + vidir_molemax and tests on rosendahl, and trains on rosendahl and tests on vidir_modern,
through `lesionlab.workflows.cross_site.run_cross_site` (what `lesionlab cross-site` runs), with a small fast model
(CPU, 2 cores). Re-running into the same --out reuses the trained models whose run folders still match, so
`--compare tta` first and `--compare color,tta` later trains only the colour-constancy models the second time.

    .venv/bin/python benchmarks/cross_site_realdata.py --out ~/lesionlab-runs/cross-site/ham-r18-64 --compare tta
    .venv/bin/python benchmarks/cross_site_realdata.py --out ~/lesionlab-runs/cross-site/ham-r18-64 --compare color,tta

Writes the run's outputs (matrix.csv, refusal.csv, cross_site.md, figures, runs) under --out and `run_info.json`
(command, machine, wall time) beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000-200x150"
PAIRS = [("vidir_modern+vidir_molemax", "rosendahl"), ("rosendahl", "vidir_modern")]


def _cpu() -> str:
    from lesionlab.cpu import model_name  # the one CPU reader

    return model_name()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HAM)
    ap.add_argument("--out", type=Path, default=Path.home() / "lesionlab-runs" / "cross-site" / "ham-r18-64")
    ap.add_argument("--arch", default="timm:resnet18")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--compare", default="tta", help="color,tta | tta | color | ''")
    ap.add_argument("--refusal-rate", type=float, default=0.1)
    ap.add_argument("--pair", action="append", default=[], metavar="TRAIN:TEST",
                    help="run only these pairs, e.g. rosendahl:vidir_modern (repeatable; default: the two above)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 suffers least when other jobs share the cores")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    sys.path.insert(0, str(REPO))
    from lesionlab.config import load_config
    from lesionlab.workflows.cross_site import run_cross_site

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config("ham10000-cpu-small", [
        f"train.archs=[{a.arch}]", f"train.epochs={a.epochs}", f"data.image_size={a.image_size}",
        f"eval.bootstrap={a.bootstrap}", "train.device=cpu", *a.overrides])
    t0 = time.perf_counter()
    pairs = [tuple(p.split(":", 1)) for p in a.pair] or PAIRS
    result = run_cross_site(cfg, a.out, data=a.data, source_column="dataset", pairs=pairs,
                            compare=[c for c in a.compare.split(",") if c], refusal_rate=a.refusal_rate,
                            min_class_images=10, progress=True)
    info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "seconds": round(time.perf_counter() - t0, 1),
            "cpu": _cpu(), "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
            "torch_threads": __import__("torch").get_num_threads(), "cells": len(result["cells"]),
            "config_overrides": [f"train.archs=[{a.arch}]", f"train.epochs={a.epochs}",
                                 f"data.image_size={a.image_size}", f"eval.bootstrap={a.bootstrap}", *a.overrides]}
    (a.out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print((a.out / "cross_site.md").read_text())
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
