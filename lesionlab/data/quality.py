"""Image quality checks run before any diagnosis: too small, extreme aspect ratio, blurred, badly exposed, blank.

Every check compares one measured number with a threshold from `config.QualityConfig` (stored in each bundle) and,
when the image fails, says why in words a clinician understands and what to do about it. The measurements are
made on a grey copy resized to a fixed working size (shorter side `working_size` pixels), so a sharp image is
sharp whatever its resolution; thresholds were chosen on the real HAM10000 images (docs/ood-ham10000.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from lesionlab.config import QualityConfig, config_from_dict

# What to do about each problem, shown beside the reason (the clinician page's refusal card reads these).
ADVICE = {
    "too_small": "Upload the original photo at full resolution, not a thumbnail or a screenshot.",
    "aspect_ratio": "Photograph the lesion itself; crop strips and panoramas down to the lesion with some skin around it.",
    "blurred": "Retake the photo in focus: hold the dermatoscope still, in contact with the skin.",
    "under_exposed": "Retake the photo with the dermatoscope light on and the lesion well lit.",
    "over_exposed": "Retake the photo with less light or glare; the lesion must not be washed out.",
    "uniform": "The image shows almost nothing (blank or a single colour): photograph the whole lesion in frame.",
    "out_of_distribution": "This does not look like a dermoscopy image of a skin lesion like those the models were "
                           "trained on: retake it with a dermatoscope, in focus, well exposed, the whole lesion in frame.",
}


def thresholds_from_dict(values: dict[str, Any] | None) -> QualityConfig:
    """Thresholds from a bundle manifest or a config mapping; missing keys take the defaults."""
    return config_from_dict({"quality": dict(values or {})}).quality


@dataclass(frozen=True)
class QualityIssue:
    """One failed check: a machine-readable `code`, a sentence for people, the measured value and its limit."""

    code: str
    reason: str
    value: float
    limit: float

    @property
    def advice(self) -> str:
        return ADVICE[self.code]

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "reason": self.reason, "advice": self.advice, "value": self.value, "limit": self.limit}


def working_grey(image: Image.Image, size: int) -> np.ndarray:
    """Grey image in [0, 1], resized (aspect kept, antialiased) so that its shorter side is `size` pixels."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return np.asarray(image.convert("L").resize((nw, nh), Image.BILINEAR), dtype=np.float64) / 255.0


def measure(image: Image.Image, t: QualityConfig | None = None) -> dict[str, float]:
    """The numbers every check looks at (useful on their own for choosing thresholds on a dataset).

    sharpness: variance of the Laplacian (scipy's 3x3 kernel, as OpenCV's `Laplacian`) of the grey working image,
    divided by its standard deviation and smoothed by a small Gaussian first. The division makes it a measure
    of detail relative to contrast, so a dim or
    low-contrast image is not mistaken for a blurred one. The small Gaussian (sigma `blur_sigma` working pixels)
    keeps 8-bit and JPEG quantisation noise, which that division amplifies, from passing for detail: without it the
    measure stopped falling at moderate blur (HAM10000 images blurred by a Gaussian of 5 and of 8 pixels scored
    the same). With the default threshold 0.1% of the 10,015 real HAM10000 images are refused as blurred, and of
    400 of them blurred by a Gaussian of radius 3 / 5 pixels, 70% / 96% are.
    """
    t = t or QualityConfig()
    w, h = image.size
    g = working_grey(image, t.working_size)
    contrast = float(g.std())
    z = (g - g.mean()) / max(contrast, 1e-6)
    return {
        "width": float(w), "height": float(h), "aspect": max(w, h) / max(1, min(w, h)),
        "sharpness": float(ndimage.laplace(ndimage.gaussian_filter(z, t.blur_sigma)).var()) if contrast > 1e-6 else 0.0,
        "mean": float(g.mean()), "contrast": contrast,
        "dark_fraction": float((g <= t.dark_level).mean()), "bright_fraction": float((g >= t.bright_level).mean()),
    }


def check_quality(image: Image.Image, t: QualityConfig | None = None) -> list[QualityIssue]:
    """Every quality problem of an image (empty list: fit to be evaluated). Cheap: a few ms per image."""
    t = t or QualityConfig()
    m = measure(image, t)
    w, h = int(m["width"]), int(m["height"])
    issues: list[QualityIssue] = []
    if min(w, h) < t.min_side:
        # Nothing else can be judged on a thumbnail (upscaled, it would also look blurred): one clear reason.
        return [QualityIssue("too_small", f"The image is too small to evaluate ({w}x{h} pixels; at least "
                             f"{t.min_side} pixels are needed on the shorter side).", min(w, h), t.min_side)]
    if m["aspect"] > t.max_aspect:
        issues.append(QualityIssue("aspect_ratio", f"The image is an unusually long strip ({w}x{h} pixels, "
                                   f"{m['aspect']:.1f}:1; at most {t.max_aspect:g}:1).", m["aspect"], t.max_aspect))
    # A badly exposed or blank image also lacks detail; one reason that names the real problem is clearer than
    # three, so exposure is judged first, then uniformity, and blur only on an image that passed both.
    if m["mean"] < t.min_mean or m["dark_fraction"] > t.max_dark_fraction:
        issues.append(QualityIssue("under_exposed", f"The image is too dark (under-exposed: {m['dark_fraction']:.0%} "
                                   "of it is nearly black).", m["dark_fraction"], t.max_dark_fraction))
    elif m["mean"] > t.max_mean or m["bright_fraction"] > t.max_bright_fraction:
        issues.append(QualityIssue("over_exposed", f"The image is too bright (over-exposed: {m['bright_fraction']:.0%} "
                                   "of it is nearly white).", m["bright_fraction"], t.max_bright_fraction))
    elif m["contrast"] < t.min_contrast:
        issues.append(QualityIssue("uniform", "The image is nearly uniform (almost no detail or contrast): "
                                   "no lesion is visible.", m["contrast"], t.min_contrast))
    elif m["sharpness"] < t.min_sharpness:
        issues.append(QualityIssue("blurred", "The image is blurred (too little fine detail to see the lesion's "
                                   "structures).", m["sharpness"], t.min_sharpness))
    return issues
