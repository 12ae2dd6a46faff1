"""What the clinician page shows for one image: the answer plus, for an evaluable image, the Grad-CAM overlay of
the class it shows, as PNG data URLs at a capped size. The service and the reader study's AI arm both call this,
so readers see exactly what the page shows."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

EXPLAIN_MAX_PX = 1024


def png_data_url(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def capped(image: Image.Image, max_px: int) -> Image.Image:
    """The image with its long side at most `max_px` (explanations are shown on screen, never at 48 MP)."""
    if max(image.size) <= max_px:
        return image
    small = image.copy()
    small.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    return small


def add_explanation(ens: Any, image: Image.Image, answer: dict[str, Any], *,
                    max_px: int = EXPLAIN_MAX_PX) -> dict[str, Any]:
    """Add `heatmap`, `heatmap_crop` and `heatmap_class` to an evaluable answer (a refused one is left alone):
    Grad-CAM of the class the answer shows (`screening.explained_class`), computed on the image capped to `max_px`."""
    if answer.get("status") != "ok":
        return answer
    from lesionlab.explain.overlay import overlay

    ex = ens.explain(capped(image, max_px), answer)
    answer["heatmap"] = png_data_url(overlay(ex.display, ex.ensemble))
    answer["heatmap_crop"] = png_data_url(ex.display)
    answer["heatmap_class"] = ex.cls
    return answer


def page_answer(ens: Any, image: Image.Image, *, max_px: int = EXPLAIN_MAX_PX) -> dict[str, Any]:
    """The page's answer with its explanation, at the bundle's own TTA setting (what `/api/predict?explain=true`
    gives for an upload without metadata)."""
    answer = ens.predict([image], tta=ens.resolve_tta(None))[0]
    return add_explanation(ens, image, answer, max_px=max_px)
