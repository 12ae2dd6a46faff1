"""A Predictor's outputs (probabilities, logits, penultimate features) for table rows or decoded images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from lesionlab import runtime
from lesionlab.data.cache import pil_to_uint8_tensor
from lesionlab.data.dataset import LesionDataset
from lesionlab.exceptions import UserError
from lesionlab.inference.predictor import Predictor


def frame_outputs(pr: Predictor, df: pd.DataFrame, *, batch_size: int = 32, num_workers: int = 0,
                  progress: bool = True, desc: str = "") -> dict[str, np.ndarray]:
    """`probs`, `logits` and `features` of one member for every row of `df` (needs a `path` column)."""
    ds = LesionDataset(df, pr.transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=runtime.worker_count(num_workers))
    parts = [pr.outputs_batch(x) for x, _ in tqdm(loader, desc=desc or f"features {pr.name}", disable=not progress,
                                                  leave=False)]
    if not parts:
        raise UserError("no images to compute features on")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def image_outputs(pr: Predictor, images: list[Image.Image], *, tta: bool = False,
                  metadata: list[dict] | None = None) -> dict[str, np.ndarray]:
    """The same for decoded images (predict, the service); `metadata` (one mapping per image) for fused models."""
    x = torch.stack([pr.transform(pil_to_uint8_tensor(im)) for im in images])
    return pr.outputs_batch(x, tta=tta, meta=pr.encode_metadata(metadata, len(images))[0])
