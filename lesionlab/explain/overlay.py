"""Heatmap overlays, PNG/NPY output and the side-by-side panel of members and ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image

from lesionlab.data.transforms import CenterCropFraction
from lesionlab.io import atomic_write
from lesionlab.models import file_stem

if TYPE_CHECKING:
    from lesionlab.explain.gradcam import Explanation


def display_crop(image: Image.Image, crop_fraction: float) -> np.ndarray:
    """The part of the original image the model sees, at its own resolution."""
    t = torch.from_numpy(np.asarray(image, np.uint8).copy()).permute(2, 0, 1)
    return CenterCropFraction(crop_fraction)(t).permute(1, 2, 0).numpy()


def _to_display(m: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    im = Image.fromarray(np.float32(m), mode="F").resize((hw[1], hw[0]), Image.BILINEAR)
    return np.clip(np.asarray(im, np.float32), 0.0, 1.0)


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

