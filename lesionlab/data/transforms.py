"""Training and evaluation transforms (uint8 CHW tensors in, normalised float tensors out)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, v2

from lesionlab.data.color import color_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataSpec:
    """What preprocessing a model expects: input size and normalisation (from its pretrained config)."""

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_fraction: float = 2 / 3
    color_constancy: str = "none"  # none | shades_of_gray (lesionlab.data.color), after the frame, before rotation
    color_constancy_p: float = 6.0


class CenterCropFraction(torch.nn.Module):
    """Centre crop keeping `fraction` of each side (600x450 -> 400x300 at 2/3), at any resolution."""

    def __init__(self, fraction: float):
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        return v2.functional.center_crop(img, [max(1, round(h * self.fraction)), max(1, round(w * self.fraction))])


def frame_size(input_size: int, crop_fraction: float) -> int:
    """Side of the square frame every image is first resized to; its centre `input_size` square is the crop."""
    return max(int(input_size), round(input_size / crop_fraction))


class SquareFrame(torch.nn.Module):
    """Resize the whole image (any aspect ratio) to `size` x `size` uint8; an image already that size passes as is.

    This is the one deterministic, cacheable step of preprocessing: the training cache stores exactly this
    output (`lesionlab.data.cache`), so cached training, uncached training and inference give the same tensor.
    Squashing the whole frame and then cutting its centre `input_size` pixels covers the same region as the
    centre crop of `crop_fraction` of each side followed by a resize to a square (what the model has always
    seen), but needs only one resampling, so no second interpolation can make the paths disagree.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return frame_image(img, self.size)


def frame_image(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size), antialiased bilinear (torchvision's resize; the cache uses this too)."""
    if tuple(img.shape[-2:]) == (size, size):
        return img
    return v2.functional.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def build_train_transform(
    *,
    spec: DataSpec,
    rotation: float = 180.0,
    hflip: bool = False,
    vflip: bool = False,
    color_jitter: float = 0.0,
) -> v2.Compose:
    """Paper protocol: random rotation in [-rotation, rotation], centre crop, resize, normalise.

    Order: the whole image squashed to a square frame of side input_size / crop_fraction (`SquareFrame`, a no-op
    on cached images, which are stored at that size), rotation about its centre, then the centre `input_size`
    square. The frame keeps the context outside the crop, so rotated corners are filled with image, not black
    (up to 45 degrees the crop's corners stay inside the frame for crop_fraction <= 0.7). Rotation acts in the
    square frame, the geometry the model sees at inference. Flips and colour jitter are extra augmentations,
    off in the paper protocol.
    """
    steps: list[torch.nn.Module] = [SquareFrame(frame_size(spec.input_size, spec.crop_fraction))]
    # Colour constancy on the whole frame (the same pixels in training, cached or not, and at inference); the
    # illuminant estimate then never sees the black corners that rotation adds.
    cc = color_transform(spec.color_constancy, spec.color_constancy_p)
    if cc is not None:
        steps.append(cc)
    if rotation > 0:
        steps.append(v2.RandomRotation(rotation, interpolation=InterpolationMode.BILINEAR))
    steps.append(v2.CenterCrop(spec.input_size))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if vflip:
        steps.append(v2.RandomVerticalFlip())
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter, min(0.5, color_jitter / 2)))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    return v2.Compose(steps)


def build_eval_transform(*, spec: DataSpec) -> v2.Compose:
    """Evaluation: the training path without randomness (square frame, centre crop, normalise)."""
    return build_train_transform(spec=spec, rotation=0.0)


def display_image(img: torch.Tensor, *, spec: DataSpec) -> torch.Tensor:
    """The uint8 image exactly as the model sees it (frame + crop, no normalisation): for overlays."""
    img = frame_image(img, frame_size(spec.input_size, spec.crop_fraction))
    cc = color_transform(spec.color_constancy, spec.color_constancy_p)
    return v2.functional.center_crop(cc(img) if cc is not None else img, [spec.input_size, spec.input_size])


def spec_from_timm(model: torch.nn.Module, *, input_size: int = 0, crop_fraction: float = 2 / 3,
                   color_constancy: str = "none", color_constancy_p: float = 6.0) -> DataSpec:
    """Mean/std (and default size) from the model's pretrained config via timm's resolve_data_config."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = input_size or int(cfg["input_size"][-1])
    if size < 16 or math.isnan(size):
        raise ValueError(f"input size {size} is too small")
    return DataSpec(
        input_size=size,
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        crop_fraction=crop_fraction,
        color_constancy=color_constancy,
        color_constancy_p=float(color_constancy_p),
    )

