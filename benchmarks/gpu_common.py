"""Shared by benchmarks/gpu_check.sh's sections and tests/test_gpu.py: where the data is, and toy-size switches.

Environment (set by benchmarks/gpu_check.sh):
    LESIONLAB_GPU_CHECK   "dry" for the CPU dry run at toy sizes, "gpu" for the real check
    LESIONLAB_HAM         a HAM10000-layout folder (HAM10000_metadata.csv + images)
    LESIONLAB_SPLIT       optional split CSV (the CPU baseline's, so test metrics are comparable)
    LESIONLAB_GPU_RESULTS folder where tests record numbers (tests_record.json)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]


def dry() -> bool:
    return os.environ.get("LESIONLAB_GPU_CHECK", "") == "dry"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ddp_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def frames(data: str | Path, split_csv: str | Path | None = None, *, limit: int = 0, seed: int = 42
           ) -> dict[str, pd.DataFrame]:
    """{train, val, test} tables (path, label, ...) of a HAM10000-layout folder; at most `limit` rows each."""
    from lesionlab.data.split import make_split, read_split
    from lesionlab.data.subsets import subset_frame
    from lesionlab.data.tables import read_table

    table = read_table(data)
    table.df = table.df[table.df["path"].astype(str) != ""].reset_index(drop=True)
    if split_csv and Path(split_csv).exists():
        sp = read_split(split_csv)
    else:
        sp = make_split(table.df, fractions=(0.7, 0.15, 0.15), seed=seed)
    out = {}
    for name in ("train", "val", "test"):
        df = subset_frame(table, sp, name)
        if limit and len(df) > limit:
            df = df.sample(n=limit, random_state=seed).reset_index(drop=True)
        out[name] = df
    return out


def env_frames(limit: int = 0) -> dict[str, pd.DataFrame]:
    data = os.environ.get("LESIONLAB_HAM")
    if not data:
        raise RuntimeError("LESIONLAB_HAM is not set; run through benchmarks/gpu_check.sh")
    return frames(data, os.environ.get("LESIONLAB_SPLIT") or None, limit=limit)


def record(key: str, value) -> None:
    """Add one number (or small structure) to LESIONLAB_GPU_RESULTS/tests_record.json, if that is set."""
    folder = os.environ.get("LESIONLAB_GPU_RESULTS")
    if not folder:
        return
    path = Path(folder) / "tests_record.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1, default=float))


def gpu_info() -> dict:
    """GPU name, driver-visible CUDA version and library versions for the results."""
    import platform

    import timm

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "timm": timm.__version__, "python": platform.python_version(), "cpu_cores": os.cpu_count(),
            "gpu": None, "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count)
    from lesionlab import cpu

    info["cpu"] = cpu.model_name()
    return info
