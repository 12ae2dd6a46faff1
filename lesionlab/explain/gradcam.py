"""Explanation maps: Grad-CAM, guided backpropagation and Guided Grad-CAM (pytorch-grad-cam), per model and for
the ensemble (overlays, PNG/NPY output and panels: lesionlab.explain.overlay).

Maps are computed on the image the model sees (centre crop, resized to the input size) and shown on that
crop of the original image at its own resolution ("display image"): red = most important, blue = least.
The ensemble map is the mean of the members' maps, each min-max normalised to [0, 1] first (Grad-CAM's own
normalisation), all for the same class; the mean is not re-normalised, so a region only one of four
members uses stays at <= 0.25.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
import weakref
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

METHODS = ("gradcam", "guided", "guided-gradcam")


class _ExplainCopies:
    """Private copies of one fp32 model for explanations: one checked out per explanation in flight.

    Grad-CAM hooks and guided backprop's ReLU swaps change the module they run on. On the module that
    predictions share, a concurrent prediction's activations land in another request's heatmap (the hooks
    fire for every forward pass). Serialising predictions and explanations would make every prediction wait
    behind a whole forward + backward pass, so instead each explanation runs on a module tree of its own.
    The copies share the parameter and buffer storage with the original (no extra weight memory; in-place
    weight changes show through), and their parameters do not require gradients: Grad-CAM needs gradients
    with respect to activations only, which flow from an input that requires them. Copies go back to the
    pool after use, so the pool holds as many as explanations ever ran at once.
    """

    def __init__(self, model: torch.nn.Module):
        self._model = weakref.ref(model)
        self._free: list[torch.nn.Module] = []
        self._lock = threading.Lock()

    def _new_copy(self) -> torch.nn.Module:
        model = self._model()
        memo: dict[int, object] = {}
        for t in itertools.chain(model.parameters(), model.buffers()):
            memo[id(t)] = torch.nn.Parameter(t.detach(), requires_grad=False) if isinstance(t, torch.nn.Parameter) else t
        return copy.deepcopy(model, memo).eval()

    @contextlib.contextmanager
    def checkout(self) -> Iterator[torch.nn.Module]:
        with self._lock:
            m = self._free.pop() if self._free else None
        m = m if m is not None else self._new_copy()
        try:
            yield m
        finally:
            with self._lock:
                self._free.append(m)


_POOLS: weakref.WeakKeyDictionary[torch.nn.Module, _ExplainCopies] = weakref.WeakKeyDictionary()
_POOLS_LOCK = threading.Lock()


@contextlib.contextmanager
def explain_model(predictor: Predictor) -> Iterator[torch.nn.Module]:
    """A private, weight-sharing copy of the predictor's fp32 model, for hooks and module swaps."""
    with _POOLS_LOCK:
        pool = _POOLS.get(predictor.model)
        if pool is None:
            pool = _POOLS[predictor.model] = _ExplainCopies(predictor.model)
    with pool.checkout() as m:
        yield m


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
    """One model's map (S, S) in [0, 1] for a normalised input (1, 3, S, S), in fp32.

    Runs on a private copy of the model (`explain_model`), never on the module predictions share.
    """
    with explain_model(predictor) as model, torch.enable_grad():
        # the copy's weights do not require gradients: the input does, so activations get theirs
        x = x.to(predictor.device).requires_grad_(True)
        layer = model.get_submodule(predictor.meta["cam_layer"])
        cam_map = None
        if method in ("gradcam", "guided-gradcam"):
            with grad_cam(model, layer) as cam:
                cam_map = cam(input_tensor=x, targets=[ClassifierOutputTarget(class_idx)])[0]
            if method == "gradcam":
                return normalise(cam_map)
        with guided_backprop(model) as gb:
            grads = gb(x.detach().clone(), target_category=class_idx)  # (S, S, 3)
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
    classes = list(predictors[0].classes)  # the members' label set (lesionlab.labels)
    if cls is not None and cls not in classes:
        raise UserError(f"--class {cls!r} must be one of {', '.join(classes)}")
    probs = np.mean([p.predict_images([image])[0] for p in predictors], axis=0)
    k = classes.index(cls) if cls else int(np.argmax(probs))
    display = display_crop(image, predictors[0].spec.crop_fraction)
    ex = Explanation(image_id=image_id, method=method, cls=classes[k], display=display, probs=probs)
    for p in predictors:
        ex.members[p.name] = _to_display(model_maps(p, p.prepare([image]), k, method), display.shape[:2])
    ex.ensemble = np.mean(list(ex.members.values()), axis=0).astype(np.float32)
    return ex

