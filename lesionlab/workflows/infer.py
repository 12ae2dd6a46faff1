"""The study's infer step: each model's probabilities for a table of images, written in ISIC format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lesionlab.config import StudyConfig
from lesionlab.io import sha256_file
from lesionlab.models import WEIGHTS_FILE
from lesionlab.study_folder import StudyFolder


def predict_split_files(checkpoints: list[Path], df: pd.DataFrame, folder: StudyFolder, split: str, cfg: StudyConfig,
                        *, progress: bool = True, truth: bool = True, record: bool = True) -> dict[str, np.ndarray]:
    """Each model's probabilities for the rows of `df`, written as `folder`'s predictions of `split` (ISIC format),
    with `truth_<split>.csv` when `truth`.

    With `record`, also each model's inference record (StudyFolder.write_inference_record): the precision and
    device it actually ran at (what `auto` resolved to on this machine), TTA, the engine, and the SHA-256 of the
    weights it ran, so that a bundle made later, elsewhere, records the settings its threshold came from and
    refuses weights other than these.
    """
    from lesionlab import runtime
    from lesionlab.inference.predictor import infer_table

    weights = [sha256_file(Path(ck) / WEIGHTS_FILE) for ck in checkpoints]  # before inference: what was run
    probs = infer_table(checkpoints, df, device=cfg.train.device, precision=cfg.train.precision, tta=cfg.eval.tta,
                        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, progress=progress)
    if record:  # resolved as each Predictor resolved it (runtime.pick_device / pick_precision)
        device = runtime.pick_device(cfg.train.device)
        settings = {"precision": runtime.precision_name(runtime.pick_precision(cfg.train.precision, device)),
                    "device": str(device), "tta": bool(cfg.eval.tta), "engine": "torch"}
        for (name, _), ck, sha in zip(probs.items(), checkpoints, weights, strict=True):
            folder.write_inference_record(name, {**settings, "weights_sha256": sha,
                                                 "weights_file": str(Path(ck).resolve() / WEIGHTS_FILE)})
    for name, p in probs.items():
        folder.write_probabilities(name, split, df["image_id"], p)
    if truth:
        folder.write_truth(split, df)
    return probs
