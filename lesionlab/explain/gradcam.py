"""Explanations: Grad-CAM, guided backpropagation and Guided Grad-CAM (pytorch-grad-cam), overlays, ensembles.

Maps are computed on the image the model sees (centre crop, resized to the input size) and shown on that
crop of the original image at its own resolution ("display image"): red = most important, blue = least.
The ensemble map is the mean of the members' maps, each min-max normalised to [0, 1] first (Grad-CAM's own
normalisation), all for the same class; the mean is not re-normalised, so a region only one of four
members uses stays at <= 0.25.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUasModule, GuidedBackpropReLUModel
from pytorch_grad_cam.utils.find_layers import replace_all_layer_type_recursive
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from lesionlab.exceptions import UserError
from lesionlab.explain.overlay import _to_display, display_crop
from lesionlab.inference.predictor import Predictor
from lesionlab.labels import CLASS_INDEX, CLASSES

METHODS = ("gradcam", "guided", "guided-gradcam")


# Hooks and ReLU swaps change the model while they run: one explanation at a time per process.
_LOCK = threading.Lock()


@contextlib.contextmanager
def grad_cam(model: torch.nn.Module, layer: torch.nn.Module) -> Iterator[GradCAM]:
    """pytorch-grad-cam's GradCAM whose hooks are released, and gradients freed, whatever happens."""
    cam = GradCAM(model=model, target_layers=[layer])
    try:
        yield cam
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def guided_backprop(model: torch.nn.Module) -> Iterator[GuidedBackpropReLUModel]:
    """pytorch-grad-cam's guided-backprop model; the original ReLUs come back even if the call fails."""
    try:
        yield GuidedBackpropReLUModel(model=model, device=next(model.parameters()).device)
    finally:
        replace_all_layer_type_recursive(model, GuidedBackpropReLUasModule, torch.nn.ReLU())
        model.zero_grad(set_to_none=True)


def normalise(a: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (all zeros for a constant map)."""
    a = np.asarray(a, np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def model_maps(predictor: Predictor, x: torch.Tensor, class_idx: int, method: str) -> np.ndarray:
    """One model's map (S, S) in [0, 1] for a normalised input (1, 3, S, S), in fp32."""
    model = predictor.model
    x = x.to(predictor.device)
    layer = model.get_submodule(predictor.meta["cam_layer"])
    cam_map = None
    if method in ("gradcam", "guided-gradcam"):
        with grad_cam(model, layer) as cam:
            cam_map = cam(input_tensor=x, targets=[ClassifierOutputTarget(class_idx)])[0]
        if method == "gradcam":
            return normalise(cam_map)
    with guided_backprop(model) as gb:
        grads = gb(x.clone(), target_category=class_idx)  # (S, S, 3)
    saliency = np.abs(grads).max(axis=2)
    if method == "guided":
        return normalise(saliency)
    return normalise(saliency * cam_map)


@dataclass
class Explanation:
    """Maps for one image: each member's, the ensemble mean, the display image and the explained class."""

    image_id: str
    method: str
    cls: str
    display: np.ndarray  # uint8 (H, W, 3): the centre crop of the original image
    members: dict[str, np.ndarray] = field(default_factory=dict)  # (H, W) in [0, 1], display size
    ensemble: np.ndarray | None = None
    probs: np.ndarray | None = None  # ensemble probabilities (7,)


def explain_image(
    predictors: Sequence[Predictor],
    image: Image.Image,
    *,
    image_id: str = "image",
    method: str = "gradcam",
    cls: str | None = None,
) -> Explanation:
    """Explain one image with every member (all for the same class) and their ensemble.

    Args:
        cls: class to explain; default: the ensemble's predicted class.
    """
    if method not in METHODS:
        raise UserError(f"--method {method!r} must be one of {', '.join(METHODS)}")
    if cls is not None and cls not in CLASS_INDEX:
        raise UserError(f"--class {cls!r} must be one of {', '.join(CLASSES)}")
    probs = np.mean([p.predict_images([image])[0] for p in predictors], axis=0)
    k = CLASS_INDEX[cls] if cls else int(np.argmax(probs))
    display = display_crop(image, predictors[0].spec.crop_fraction)
    ex = Explanation(image_id=image_id, method=method, cls=CLASSES[k], display=display, probs=probs)
    with _LOCK, torch.enable_grad():
        for p in predictors:
            x = p.prepare([image])
            ex.members[p.name] = _to_display(model_maps(p, x, k, method), display.shape[:2])
    ex.ensemble = np.mean(list(ex.members.values()), axis=0).astype(np.float32)
    return ex

