"""The study's Grad-CAM gallery: members side by side and their mean for chosen test categories."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lesionlab.config import StudyConfig
from lesionlab.data.images import load_image
from lesionlab.evaluation.ensemble import ENSEMBLE
from lesionlab.io import atomic_write_json
from lesionlab.labels import names_for
from lesionlab.models import file_stem


def make_gallery(checkpoints: list[Path], test_df: pd.DataFrame, y: np.ndarray, probs: dict[str, np.ndarray], best: str,
                 out_dir: Path, cfg: StudyConfig, ids: list[str], classes: Sequence[str] | None = None) -> None:
    """Grad-CAM panels (members side by side + ensemble) for the categories the study shows.

    With a single model (no ensemble in `probs`) the categories follow that model's predictions.
    """
    from lesionlab.explain.gradcam import explain_image
    from lesionlab.explain.overlay import panel
    from lesionlab.inference.predictor import load_predictors

    judge = ENSEMBLE if ENSEMBLE in probs else best
    ens = probs[judge].argmax(1)
    names = names_for(probs[judge].shape[1], classes)
    # the flag class (column 0: MEL, MALIGNANT) and its most common benign look-alike (NV, else the second class)
    mel, nv = 0, names.index("NV") if "NV" in names else 1
    a_, b_ = names[mel], names[nv]
    cats = [(f"correct {b_}", (y == nv) & (ens == nv)), (f"correct {a_}", (y == mel) & (ens == mel)),
            (f"{a_} misclassified as {b_}", (y == mel) & (ens == nv))]
    off = (ens != y) & ~((y == mel) & (ens == nv))
    pairs = pd.Series([(int(a), int(b)) for a, b in zip(y[off], ens[off], strict=True)], dtype=object).value_counts()
    for (a, b), _ in list(pairs.items())[:2]:
        cats.append((f"{names[a]} misclassified as {names[b]}", (y == a) & (ens == b)))
    predictors = load_predictors(checkpoints, device=cfg.train.device, precision="fp32")
    path_of = dict(zip(test_df["image_id"], test_df["path"], strict=True))
    entries = []
    for title, mask in cats:
        for i in np.flatnonzero(mask)[: cfg.explain.per_category]:
            iid = ids[i]
            ex = explain_image(predictors, load_image(path_of[iid]), image_id=iid, method="gradcam")
            f = out_dir / f"{file_stem(title).replace(' ', '_')}_{iid}.png"
            panel(ex, f, title=f"{title}: {iid} (true {names[y[i]]}, {judge} {names[ens[i]]}; Grad-CAM for {ex.cls})")
            entries.append({"category": title, "image": iid, "file": f.name})
    atomic_write_json(out_dir / "gallery.json", entries)

