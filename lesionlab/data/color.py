"""Colour constancy: Shades of Gray (Finlayson & Trezzi 2004), the preprocessing of the ISIC 2018/2019 winners.

The illuminant of each channel is estimated as the Minkowski p-norm mean of its pixel values,
e_c = (mean_x v_c(x)^p)^(1/p); p=1 is Gray World, p=inf is max-RGB, p=6 is what Barata et al. (2015) found best
for dermoscopy and what the ISIC 2018/2019 winning entries used. The image is then divided by the illuminant,
scaled so that a neutral illuminant leaves it unchanged: gain_c = 1 / (sqrt(3) * e_c / ||e||_2). This is the
normalisation of the widely copied `shade_of_gray_cc` (Barata; Gessert et al. ISIC 2019), written here for
uint8 CHW tensors because no maintained library ships Shades of Gray (scikit-image and OpenCV's xphoto have
Gray World / learned white balance only); tests/test_robustness.py checks it against an independent numpy
formulation and a hand-worked case.

Properties worth knowing: the gains do not change when the whole image is scaled (a brightness change passes
through untouched, as it should for a colour correction), and a pure per-channel colour cast is undone up to
clipping and rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from lesionlab.exceptions import UserError

METHODS = ("none", "shades_of_gray")


def shades_of_gray_gains(img: torch.Tensor, p: float = 6.0) -> torch.Tensor:
    """Per-channel gains (3,) of a uint8 or float (3, H, W) image; ones for an all-black image."""
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(img.shape)}")
    if not p >= 1:
        raise ValueError(f"Minkowski p must be >= 1, got {p}")
    # float64 and values scaled to [0, 1]: 255**6 summed over a large image would lose precision in float32.
    x = img.to(torch.float64).flatten(1) / 255.0
    e = x.amax(dim=1) if np.isinf(p) else x.pow(p).mean(dim=1).pow(1.0 / p)
    norm = torch.linalg.vector_norm(e)
    if norm <= 0 or (e <= 0).any():  # a channel with no light at all has no illuminant to divide by
        return torch.ones(3, dtype=torch.float64)
    return norm / (np.sqrt(3.0) * e)


def shades_of_gray(img: torch.Tensor, p: float = 6.0) -> torch.Tensor:
    """Colour-corrected copy of a uint8 (3, H, W) tensor (values rounded and clipped to 0..255)."""
    gains = shades_of_gray_gains(img, p).view(3, 1, 1)
    out = img.to(torch.float64) * gains
    return out.round_().clamp_(0, 255).to(torch.uint8)


class ShadesOfGray(torch.nn.Module):
    """Shades of Gray as a transform step on uint8 (3, H, W) tensors (for `v2.Compose`)."""

    def __init__(self, p: float = 6.0):
        super().__init__()
        if not p >= 1:
            raise UserError(f"data.color_constancy_p must be >= 1 (6 is the dermoscopy default), got {p}")
        self.p = float(p)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return shades_of_gray(img, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


def color_transform(method: str, p: float = 6.0) -> torch.nn.Module | None:
    """The colour-constancy step named in the config (`data.color_constancy`), or None for `none`."""
    if method not in METHODS:
        raise UserError(f"data.color_constancy {method!r} must be one of {', '.join(METHODS)}")
    return ShadesOfGray(p) if method == "shades_of_gray" else None

