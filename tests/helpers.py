"""Helpers shared by several test modules."""

from pathlib import Path

import torch


def make_tiny_checkpoint(path: Path, seed: int, input_size: int = 64) -> Path:
    """A resnet10t checkpoint with random weights and a full sidecar (fast stand-in for a trained model)."""
    from lesionlab import models

    torch.manual_seed(seed)
    model, spec = models.create_model("timm:resnet10t", pretrained="none")
    models.save_checkpoint(model, {"arch": "timm:resnet10t", "timm_id": spec.timm_id, "input_size": input_size,
                                   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                   "crop_fraction": 2 / 3, "cam_layer": "layer4", "epoch": 1}, path)
    return path


def lesion_like(w: int = 200, h: int = 150, seed: int = 0):
    """A textured skin-coloured PIL image with a darker blob: passes every quality check (lesionlab.data.quality)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((xx - w / 2) / (w / 5)) ** 2 + ((yy - h / 2) / (h / 5)) ** 2))
    base = np.array([200, 150, 130]) - 110 * blob[..., None] * np.array([1, 1.1, 1.1])
    return Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
