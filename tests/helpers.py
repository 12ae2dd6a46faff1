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


def write_study(root: Path, checkpoints: dict, y, probs: dict, *, split: str = "val", precision: str = "fp32",
                tta: bool = False) -> Path:
    """A study folder written through the StudyFolder contract (as `lesionlab study` writes it): the truth and each
    model's probabilities of one split (`probs`: model name -> (N, 7)), and each model's inference record with the
    SHA-256 of its checkpoint's weights (`checkpoints`: model name -> checkpoint folder)."""
    import pandas as pd

    from lesionlab.io import sha256_file
    from lesionlab.labels import CLASSES
    from lesionlab.models import WEIGHTS_FILE
    from lesionlab.study_folder import StudyFolder

    sf = StudyFolder(root)
    sf.predictions_dir.mkdir(parents=True, exist_ok=True)
    sf.steps_file.write_text("{}")
    ids = [f"i{k}" for k in range(len(y))]
    sf.write_truth(split, pd.DataFrame({"image_id": ids, "label": [CLASSES[k] for k in y]}))
    for name, p in probs.items():
        sf.write_probabilities(name, split, ids, p)
        sf.write_inference_record(name, {"precision": precision, "device": "cpu", "tta": tta, "engine": "torch",
                                         "weights_sha256": sha256_file(Path(checkpoints[name]) / WEIGHTS_FILE)})
    return sf.root
