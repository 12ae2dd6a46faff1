"""Shared by the benchmark scripts: machine description and writing a section of docs/benchmarks.md."""

from __future__ import annotations

import atexit
import datetime as dt
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SHARED_HAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000-200x150"


def scratch(prefix: str = "lesionlab-bench-") -> Path:
    """A temporary folder removed when the benchmark exits (bundles, corpora and caches run to hundreds of MB; left
    behind, they fill the disk CI shares)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def machine() -> str:
    """One line naming the machine a benchmark ran on (CPU model and flags of note from `lesionlab.cpu`, with any
    emulation in force; cores, threads, GPU, versions, date)."""
    from lesionlab import cpu

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu.model_name()}; {cpu.describe()}; {os.cpu_count()} cores (torch threads {torch.get_num_threads()}, bf16 units: "
            f"{cpu.has_bf16()}){gpu}; torch {torch.__version__}, Python {platform.python_version()}; "
            f"{dt.date.today().isoformat()}")


def timed(fn, *, repeat: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between `<!-- name -->` markers in docs/benchmarks.md."""
    DOC.parent.mkdir(exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# LesionLab benchmarks\n\nWritten by the scripts in `benchmarks/` (`make bench`).\n"
    block = f"<!-- {name} -->\n{body.strip()}\n<!-- /{name} -->"
    pat = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)
    print(body)


def untrained_checkpoints(folder: Path, size: int, archs: tuple[str, ...] | None = None) -> list[Path]:
    """Architectures (the four paper ones by default) as LesionLab checkpoints with random weights (speed does not
    depend on them)."""
    from lesionlab import models

    out = []
    for arch in archs or models.PAPER_ARCHS:
        torch.manual_seed(0)
        m, spec = models.create_model(arch, pretrained="none")
        models.save_checkpoint(m, {"arch": arch, "timm_id": spec.timm_id, "input_size": size, "mean": [0.485, 0.456, 0.406],
                                   "std": [0.229, 0.224, 0.225], "crop_fraction": 2 / 3, "cam_layer": models.cam_layer_name(m, spec)}, folder / arch)
        out.append(folder / arch)
    return out
