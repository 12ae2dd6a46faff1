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
