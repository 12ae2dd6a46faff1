"""Images the models should refuse: synthetic blank / solid-colour and noise images, and lesions made unevaluable.

For measuring the refusal of unevaluable images (lesionlab.workflows.refusal, benchmarks/bench_ood.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def synthetic_ood_images(n: int = 20, seed: int = 0, size: tuple[int, int] = (200, 150)) -> dict[str, list[Image.Image]]:
    """Blank / solid-colour images and noise images (uniform and Gaussian), seeded."""
    rng = np.random.default_rng(seed)
    w, h = size
    solid = [Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(n - 2)]
    solid += [Image.new("RGB", size, (255, 255, 255)), Image.new("RGB", size, (0, 0, 0))]
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n // 2)]
    noise += [Image.fromarray(np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (h, w, 3)), 0, 255)
                              .astype(np.uint8)) for _ in range(n - n // 2)]
    return {"synthetic solid/blank": solid, "synthetic noise": noise}


def degraded_lesions(images: list[Image.Image]) -> dict[str, list[Image.Image]]:
    """Lesion images made unevaluable: heavy blur, over-exposure, a tiny central crop, a 16x12 thumbnail."""
    from PIL import ImageEnhance, ImageFilter

    def crop(im: Image.Image) -> Image.Image:
        w, h = im.size
        return im.crop((w * 2 // 5, h * 2 // 5, w * 3 // 5, h * 3 // 5))

    return {
        "lesion heavy blur": [im.filter(ImageFilter.GaussianBlur(max(2.0, min(im.size) / 25))) for im in images],
        "lesion over-exposed": [ImageEnhance.Brightness(im).enhance(2.5) for im in images],
        "lesion tiny crop": [crop(im) for im in images],
        "lesion thumbnail": [im.resize((16, 12), Image.BILINEAR) for im in images],
    }
