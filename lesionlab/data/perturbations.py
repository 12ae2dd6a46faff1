"""Controlled acquisition perturbations at graded severities: a registry of named, seeded transforms.

Each perturbation models one way two photographs of the same lesion differ (distance, angle, exposure, white
balance, focus, compression, orientation). It acts on the decoded source image (uint8 (3, H, W) tensor or RGB
PIL image), before the model's own preprocessing, so a checkpoint's colour constancy, framing and crop all
see the perturbed photograph. The operations are torchvision v2 functionals; `PERTURBATIONS` maps a name to its
levels (the parameter at each severity, mildest first) and its function `fn(img, level, rng)`.

Every function is deterministic given (image, level, rng); only `gaussian_noise` draws from `rng`. Use
`perturbation_rng(seed, name, level_index, image_index)` so a result does not depend on batch order.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from lesionlab.exceptions import UserError

PerturbFn = Callable[[torch.Tensor, float, np.random.Generator], torch.Tensor]


@dataclass(frozen=True)
class Perturbation:
    """A named perturbation: `levels` are its parameter at each severity; `identity` leaves the image unchanged."""

    name: str
    levels: tuple[float, ...]
    identity: float
    unit: str
    description: str
    fn: PerturbFn

    def __call__(self, img: torch.Tensor | Image.Image, level: float, rng: np.random.Generator | None = None) -> torch.Tensor:
        return self.fn(as_uint8_tensor(img), float(level), rng if rng is not None else np.random.default_rng(0))


def as_uint8_tensor(img: torch.Tensor | Image.Image) -> torch.Tensor:
    """RGB PIL image or uint8 (3, H, W) tensor -> uint8 (3, H, W) tensor."""
    if isinstance(img, Image.Image):
        return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"expected a uint8 (3, H, W) tensor, got {img.dtype} {tuple(img.shape)}")
    return img


def _zoom_in(img: torch.Tensor, level: float, rng) -> torch.Tensor:
    # Closer camera: the central `level` share of each side fills the frame.
    h, w = img.shape[-2:]
    ch, cw = max(1, round(h * level)), max(1, round(w * level))
    return F.resized_crop(img, (h - ch) // 2, (w - cw) // 2, ch, cw, [h, w], antialias=True)


def _zoom_out(img: torch.Tensor, level: float, rng) -> torch.Tensor:
    # Farther camera: the picture shrinks to `level` of each side; the new border is reflected image (a stand-in
    # for the skin around the lesion that a real photograph would show; it can mirror lesion parts at the edge).
    if not 1 / 3 < level <= 1:
        raise ValueError(f"zoom_out level must be in (1/3, 1] (reflection needs a border narrower than the image), got {level}")
    h, w = img.shape[-2:]
    sh, sw = max(1, round(h * level)), max(1, round(w * level))
    top, left = (h - sh) // 2, (w - sw) // 2
    small = F.resize(img, [sh, sw], antialias=True)
    return F.pad(small, [left, top, w - sw - left, h - sh - top], padding_mode="reflect")


def _rotation(img: torch.Tensor, level: float, rng) -> torch.Tensor:
    # Black corners, as the training augmentation's RandomRotation fills them.
    return F.rotate(img, level, interpolation=InterpolationMode.BILINEAR)


def _brightness(img: torch.Tensor, level: float, rng) -> torch.Tensor:
    return F.adjust_brightness(img, level)


def _contrast(img: torch.Tensor, level: float, rng) -> torch.Tensor:
    return F.adjust_contrast(img, level)


def _color_temperature(img: torch.Tensor, level: float, rng) -> torch.Tensor:
    # White-balance shift: red gain 1+level, blue gain 1-level (level > 0 warmer, < 0 cooler), green kept.
    gains = torch.tensor([1.0 + level, 1.0, 1.0 - level]).view(3, 1, 1)
    return (img.float() * gains).round().clamp(0, 255).to(torch.uint8)


def _blur(img: torch.Tensor, level: float, rng) -> torch.Tensor:
    # Defocus: Gaussian sigma as a share of the short side, so a severity means the same at 150 and 450 pixels.
    sigma = max(1e-3, level * min(img.shape[-2:]))
    k = 2 * int(np.ceil(3 * sigma)) + 1
    return F.gaussian_blur(img, [k, k], [sigma, sigma])


def _jpeg(img: torch.Tensor, level: float, rng) -> torch.Tensor:
    # PIL's encoder (libjpeg, 4:2:0 subsampling as cameras write); torchvision's jpeg op is deprecated in 0.29.
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=int(level))
    buf.seek(0)
    with Image.open(buf) as im:
        return as_uint8_tensor(im)


def _hflip(img: torch.Tensor, level: float, rng) -> torch.Tensor:
    return F.horizontal_flip(img) if level else img


def _vflip(img: torch.Tensor, level: float, rng) -> torch.Tensor:
    return F.vertical_flip(img) if level else img


def _gaussian_noise(img: torch.Tensor, level: float, rng: np.random.Generator) -> torch.Tensor:
    # Sensor noise, standard deviation in 8-bit levels; the only perturbation that draws from the rng.
    noise = torch.from_numpy(rng.normal(0.0, level, size=tuple(img.shape)).astype(np.float32))
    return (img.float() + noise).round().clamp(0, 255).to(torch.uint8)


def _p(name, levels, identity, unit, description, fn) -> Perturbation:
    return Perturbation(name, tuple(float(v) for v in levels), float(identity), unit, description, fn)


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p
    for p in [
        _p("zoom_in", [0.9, 0.8, 0.7, 0.6, 0.5], 1.0, "kept share of each side", "central crop resized back", _zoom_in),
        _p("zoom_out", [0.9, 0.8, 0.7, 0.6, 0.5], 1.0, "scale", "image shrunk, border reflected", _zoom_out),
        _p("rotation", [15, 30, 45, 90, 135, 180], 0.0, "degrees", "rotation about the centre", _rotation),
        _p("brightness", [0.5, 0.7, 0.85, 1.15, 1.3, 1.5], 1.0, "factor", "exposure", _brightness),
        _p("contrast", [0.5, 0.7, 0.85, 1.15, 1.3, 1.5], 1.0, "factor", "contrast", _contrast),
        _p("color_temperature", [-0.3, -0.2, -0.1, 0.1, 0.2, 0.3], 0.0, "red gain - 1 (blue gain 1 - x)",
           "white balance: warmer (>0) or cooler (<0)", _color_temperature),
        _p("blur", [0.005, 0.01, 0.02, 0.03, 0.04], 0.0, "sigma / short side", "Gaussian defocus", _blur),
        _p("jpeg", [90, 70, 50, 30, 10], 100.0, "quality", "JPEG re-compression", _jpeg),
        _p("hflip", [1], 0.0, "on", "horizontal mirror", _hflip),
        _p("vflip", [1], 0.0, "on", "vertical mirror", _vflip),
        _p("gaussian_noise", [2, 5, 10, 20], 0.0, "sigma (8-bit levels)", "sensor noise (seeded)", _gaussian_noise),
    ]
}


def get_perturbation(name: str) -> Perturbation:
    """The registered perturbation `name`; an unknown name lists the valid ones."""
    try:
        return PERTURBATIONS[name]
    except KeyError:
        raise UserError(f"unknown perturbation {name!r}; valid: {', '.join(PERTURBATIONS)}") from None


def conditions(names: Sequence[str] | None = None, *, max_levels: int = 0) -> list[tuple[str, int, float]]:
    """(name, level index, level) for every severity of the named perturbations (all by default).

    Args:
        max_levels: keep at most this many levels per perturbation, spread over its range (0 = all).
    """
    out = []
    for name in names or list(PERTURBATIONS):
        levels = get_perturbation(name).levels
        idx = list(range(len(levels)))
        if max_levels and len(levels) > max_levels:
            idx = sorted({round(i) for i in np.linspace(0, len(levels) - 1, max_levels)})
        out += [(name, i, levels[i]) for i in idx]
    return out


def perturbation_rng(seed: int, name: str, level_index: int, image_index: int) -> np.random.Generator:
    """A generator that depends only on (seed, perturbation, severity, image): results independent of batching."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(level_index), int(image_index)])


def perturb(img: torch.Tensor | Image.Image, name: str, level: float, *, seed: int = 0, level_index: int = 0,
            image_index: int = 0) -> torch.Tensor:
    """Apply perturbation `name` at `level` to one image (uint8 (3, H, W) tensor out)."""
    return get_perturbation(name)(img, level, perturbation_rng(seed, name, level_index, image_index))
