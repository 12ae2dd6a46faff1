import numpy as np
import pandas as pd
import torch

from lesionlab.data.tables import read_table
from lesionlab.data.transforms import (
    CenterCropFraction,
    DataSpec,
    build_eval_transform,
    build_train_transform,
)
from lesionlab.data.validation import validate
from lesionlab.labels import CLASS_TO_DX, CLASSES


def test_centre_crop_keeps_two_thirds_at_any_resolution():
    assert CenterCropFraction(2 / 3)(torch.zeros(3, 450, 600)).shape == (3, 300, 400)
    assert CenterCropFraction(2 / 3)(torch.zeros(3, 150, 200)).shape == (3, 100, 133)


def test_eval_transform_is_deterministic_and_normalised():
    spec = DataSpec(input_size=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    img = torch.full((3, 150, 200), 255, dtype=torch.uint8)
    out = build_eval_transform(spec=spec)(img)
    assert out.shape == (3, 48, 48) and torch.allclose(out, torch.full_like(out, 2.0))


def test_train_transform_rotates_randomly_but_only_in_training():
    spec = DataSpec(input_size=32)
    img = torch.zeros(3, 90, 120, dtype=torch.uint8)
    img[:, :, :60] = 255  # left half white: rotation changes what the centre crop sees
    tf = build_train_transform(spec=spec, rotation=180)
    outs = {round(float(tf(img)[0, :, :16].mean()), 3) for _ in range(8)}
    assert len(outs) > 1
    names = [t.__class__.__name__ for t in build_train_transform(spec=spec, rotation=0, hflip=False).transforms]
    assert names[:2] == ["SquareFrame", "CenterCrop"] and "RandomRotation" not in names


def test_synthetic_dataset_layout_and_proportions(synth_dir):
    meta = pd.read_csv(synth_dir / "HAM10000_metadata.csv")
    assert list(meta.columns) == ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    assert set(meta["dx"]) == {CLASS_TO_DX[c] for c in CLASSES}
    per_lesion = meta.groupby("lesion_id").size()
    assert per_lesion.min() >= 1 and per_lesion.max() <= 6
    assert meta["dx"].value_counts().idxmax() == "nv"
    assert (meta.groupby("lesion_id")["dx"].nunique() == 1).all()
    table = read_table(synth_dir)
    assert validate(table, progress=False).ok


def test_synthetic_classes_differ_visibly(synth_dir):
    """Mean colour inside the image centre separates e.g. melanoma (dark) from BCC (pink)."""
    from PIL import Image

    meta = pd.read_csv(synth_dir / "HAM10000_metadata.csv")

    def centre_mean(dx):
        ids = meta[meta["dx"] == dx]["image_id"].head(4)
        return np.mean([np.asarray(Image.open(synth_dir / "images" / f"{i}.jpg"))[35:55, 50:70].mean() for i in ids])

    assert centre_mean("mel") + 40 < centre_mean("bcc")
