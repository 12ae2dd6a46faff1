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


def draw_geometry(*, rotation: float = 180.0, hflip: bool = False, vflip: bool = False) -> torch.Tensor:
    """One sample's random geometry, (angle in degrees, hflip 0/1, vflip 0/1) as float64, from torch's global RNG.

    The one sampler of both augmentation paths: `RandomGeometry` (CPU, per image) calls it, and so does the GPU
    path's worker step (`lesionlab.data.gpu_augment`), which sends the parameters with the uint8 image, so both
    paths draw the same parameters from the same per-sample seed (`data.dataset.LesionDataset`). The draws are
    torchvision's own, in the order its transforms made them (v2.RandomRotation's uniform angle, then one
    `torch.rand(1) < 0.5` per enabled flip), so the CPU path's outputs are unchanged by this refactor.
    """
    angle = torch.empty(1).uniform_(-float(rotation), float(rotation)).item() if rotation > 0 else 0.0
    h = bool(torch.rand(1) < 0.5) if hflip else False
    v = bool(torch.rand(1) < 0.5) if vflip else False
    return torch.tensor([angle, float(h), float(v)], dtype=torch.float64)


def apply_geometry(img: torch.Tensor, params: torch.Tensor, *, size: int) -> torch.Tensor:
    """uint8 (3, F, F) frame -> uint8 (3, size, size): rotation about the centre (bilinear, black corners), the
    centre `size` square, then the flips; `params` as `draw_geometry` returns them. The CPU reference the GPU
    path's batched kernels are tested against."""
    angle, h, v = (float(p) for p in params)
    if angle != 0.0:
        img = v2.functional.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
    img = v2.functional.center_crop(img, [size, size])
    if h:
        img = v2.functional.horizontal_flip(img)
    if v:
        img = v2.functional.vertical_flip(img)
    return img


class RandomGeometry(torch.nn.Module):
    """Random rotation in [-rotation, rotation], the centre `size` square, optional flips (CPU, one image)."""

    def __init__(self, *, size: int, rotation: float = 180.0, hflip: bool = False, vflip: bool = False):
        super().__init__()
        self.size, self.rotation, self.hflip, self.vflip = int(size), float(rotation), bool(hflip), bool(vflip)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        params = draw_geometry(rotation=self.rotation, hflip=self.hflip, vflip=self.vflip)
        return apply_geometry(img, params, size=self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, rotation={self.rotation:g}, hflip={self.hflip}, vflip={self.vflip}"


def build_frame_transform(*, spec: DataSpec) -> v2.Compose:
    """The deterministic uint8 start of every path: the square frame, then colour constancy when configured.

    Training (CPU or GPU augmentation) and inference all begin with exactly this, so the pixels the random
    geometry acts on are the same wherever it runs.
    """
    steps: list[torch.nn.Module] = [SquareFrame(frame_size(spec.input_size, spec.crop_fraction))]
    # Colour constancy on the whole frame (the same pixels in training, cached or not, and at inference); the
    # illuminant estimate then never sees the black corners that rotation adds.
    cc = color_transform(spec.color_constancy, spec.color_constancy_p)
    if cc is not None:
        steps.append(cc)
    return v2.Compose(steps)


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
    off in the paper protocol. The random geometry is `RandomGeometry` (parameters from `draw_geometry`, shared
    with the GPU path in `lesionlab.data.gpu_augment`).
    """
    steps: list[torch.nn.Module] = list(build_frame_transform(spec=spec).transforms)
    if rotation > 0 or hflip or vflip:
        steps.append(RandomGeometry(size=spec.input_size, rotation=rotation, hflip=hflip, vflip=vflip))
    else:
        steps.append(v2.CenterCrop(spec.input_size))
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

