"""The study's infer step: each model's probabilities for a table of images, written in ISIC format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lesionlab.config import StudyConfig
from lesionlab.io import atomic_write_json
from lesionlab.models import file_stem


def predict_split_files(checkpoints: list[Path], df: pd.DataFrame, out_dir: Path, tag: str, cfg: StudyConfig,
                        *, progress: bool = True, truth: bool = True, record: bool = True) -> dict[str, np.ndarray]:
    """Per-model probability CSVs `<arch>_<tag>.csv` (and `truth_<tag>.csv`) in ISIC format for a frame.

    With `record`, also `<arch>_inference.json`: the precision and device each model actually ran at (what `auto` resolved to on
    this machine) and TTA, so that a bundle made later, elsewhere, records the settings its threshold came from.
    """
    from lesionlab import runtime
    from lesionlab.clinic.bundle import precision_name
    from lesionlab.data.isic_csv import probs_frame, truth_frame, write_isic_csv
    from lesionlab.inference.predictor import infer_table

    probs = infer_table(checkpoints, df, device=cfg.train.device, precision=cfg.train.precision, tta=cfg.eval.tta,
                        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, progress=progress)
    if record:  # resolved as each Predictor resolved it (runtime.pick_device / pick_precision)
        device = runtime.pick_device(cfg.train.device)
        settings = {"precision": precision_name(runtime.pick_precision(cfg.train.precision, device)),
                    "device": str(device), "tta": bool(cfg.eval.tta)}
        for name in probs:
            atomic_write_json(out_dir / f"{file_stem(name)}_inference.json", settings)
    for name, p in probs.items():
        write_isic_csv(out_dir / f"{file_stem(name)}_{tag}.csv", probs_frame(df["image_id"], p))
    if truth:
        write_isic_csv(out_dir / f"truth_{tag}.csv", truth_frame(df))
    return probs
