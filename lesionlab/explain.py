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
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUasModule, GuidedBackpropReLUModel
from pytorch_grad_cam.utils.find_layers import replace_all_layer_type_recursive
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from lesionlab.errors import UserError
from lesionlab.io import atomic_write
from lesionlab.labels import CLASS_INDEX, CLASSES
from lesionlab.models import file_stem
from lesionlab.predict import Predictor
from lesionlab.transforms import CenterCropFraction

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


def display_crop(image: Image.Image, crop_fraction: float) -> np.ndarray:
    """The part of the original image the model sees, at its own resolution."""
    t = torch.from_numpy(np.asarray(image, np.uint8).copy()).permute(2, 0, 1)
    return CenterCropFraction(crop_fraction)(t).permute(1, 2, 0).numpy()


def _to_display(m: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    im = Image.fromarray(np.float32(m), mode="F").resize((hw[1], hw[0]), Image.BILINEAR)
    return np.clip(np.asarray(im, np.float32), 0.0, 1.0)


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


def overlay(display: np.ndarray, heatmap: np.ndarray, *, weight: float = 0.5) -> np.ndarray:
    """Jet-coloured heatmap (red high, blue low) blended over the display image; uint8 (H, W, 3)."""
    return show_cam_on_image(display.astype(np.float32) / 255.0, heatmap, use_rgb=True, image_weight=weight)


def save_png(arr: np.ndarray, path: str | Path) -> None:
    atomic_write(Path(path), lambda p: Image.fromarray(arr).save(p, format="PNG"))


def save_npy(arr: np.ndarray, path: str | Path) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, arr.astype(np.float32))

    atomic_write(Path(path), write)


def write_explanation(ex: Explanation, out_dir: str | Path, *, save_raw: bool = False) -> list[Path]:
    """PNG overlays (ensemble + each member) and, with `save_raw`, the maps as .npy; returns the files."""
    out = Path(out_dir)
    written = []
    items = [("ensemble", ex.ensemble)] + list(ex.members.items()) if len(ex.members) > 1 else list(ex.members.items())
    for name, m in items:
        stem = f"{ex.image_id}_{ex.method}_{ex.cls}_{file_stem(name)}"
        save_png(overlay(ex.display, m), out / f"{stem}.png")
        written.append(out / f"{stem}.png")
        if save_raw:
            save_npy(m, out / f"{stem}.npy")
            written.append(out / f"{stem}.npy")
    return written


def panel(ex: Explanation, path: str | Path, *, title: str = "") -> None:
    """One figure: the image, then each member's overlay and the ensemble's, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [("image", None), *ex.members.items(), ("ensemble", ex.ensemble)]
    fig, axes = plt.subplots(1, len(items), figsize=(2.3 * len(items), 2.3))
    for ax, (name, m) in zip(np.atleast_1d(axes), items, strict=True):
        ax.imshow(ex.display if m is None else overlay(ex.display, m))
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=90, bbox_inches="tight", format="png"))
    plt.close(fig)
