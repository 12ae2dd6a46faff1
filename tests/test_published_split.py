"""A dataset's own split (Derm7pt's meta/{train,valid,test}_indexes.csv) as the study's split: `split.published`
(lesionlab.data.split.published_split), with its checks: every image has one part, no lesion spans two."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionlab.config import load_config
from lesionlab.data.split import published_split, read_split
from lesionlab.data.tables import read_table
from lesionlab.data.validation import validate
from lesionlab.exceptions import UserError
from lesionlab.workflows import study

DIAGNOSES = ("melanoma", "clark nevus", "seborrheic keratosis")
PARTS = {"train": "train_indexes.csv", "val": "valid_indexes.csv", "test": "test_indexes.csv"}


def derm7pt_folder(root: Path, n_cases: int = 30, parts: dict[str, list[int]] | None = None) -> Path:
    """A tiny Derm7pt in its published layout: meta/meta.csv (a clinical and a dermoscopic image per case) and the
    three index files (column `indexes`: row numbers into meta.csv); by default 60/20/20% of the cases, every part
    holding every diagnosis."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(n_cases):
        dx = DIAGNOSES[i % len(DIAGNOSES)]
        rows.append({"case_num": i + 1, "diagnosis": dx, "seven_point_score": int(i % 4), "elevation": "flat",
                     "location": ("back", "upper limbs")[i % 2], "sex": ("male", "female")[(i // 3) % 2],
                     "clinic": f"Xyz/Cl{i:03d}.jpg", "derm": f"Xyz/Dm{i:03d}.jpg", "management": "excision"})
        tint = np.array([[200, 60, 60], [150, 110, 80], [90, 80, 70]][i % 3], np.uint8)
        for name in (f"Cl{i:03d}.jpg", f"Dm{i:03d}.jpg"):
            arr = np.clip(tint + rng.integers(-30, 30, (30, 40, 3)), 0, 255).astype(np.uint8)
            (root / "images" / "Xyz").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / "images" / "Xyz" / name, "JPEG")
    (root / "meta").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "meta" / "meta.csv", index=False)
    if parts is None:
        n_tr, n_va = int(0.6 * n_cases), int(0.2 * n_cases)
        parts = {"train": list(range(n_tr)), "val": list(range(n_tr, n_tr + n_va)),
                 "test": list(range(n_tr + n_va, n_cases))}
    for tag, idx in parts.items():
        pd.DataFrame({"indexes": idx}).to_csv(root / "meta" / PARTS[tag], index=False)
    return root


def _table(**cols) -> pd.DataFrame:
    n = len(cols["image_id"])
    return pd.DataFrame({"dx": ["mel"] * n, "label": ["MEL"] * n, **cols})


def test_published_split_checks_every_row_and_every_lesion():
    ok = _table(image_id=["a", "b", "c", "d"], lesion_id=["L1", "L1", "L2", "L3"],
                published_split=["train", "train", "valid", "test"])
    sp = published_split(ok)
    assert sp["split"].tolist() == ["train", "train", "val", "test"]  # Derm7pt's "valid" is our val
    assert list(sp.columns) == ["image_id", "lesion_id", "group_id", "dx", "label", "split"]
    with pytest.raises(UserError, match=r"2 images have no single published part \(first: b \(none\), d \(none\)"):
        published_split(ok.assign(published_split=["train", "", "val", ""]))
    with pytest.raises(UserError, match=r"c \(train\+test\)"):  # a case in two index files
        published_split(ok.assign(published_split=["train", "train", "train+test", "test"]))
    with pytest.raises(UserError, match=r"lesion L1 is in test and train: a in train, b in test"):
        published_split(ok.assign(published_split=["train", "test", "val", "test"]))
    # a known duplicate pair across two parts is a leak too
    dups = pd.DataFrame({"from_img": ["c"], "to_img": ["d"]})
    with pytest.raises(UserError, match=r"duplicate group L2\+L3 is in test and val: c in val, d in test"):
        published_split(ok, duplicates=dups)
    with pytest.raises(UserError, match="has no published split"):
        published_split(ok.drop(columns="published_split"))
    with pytest.raises(UserError, match="has no published split"):
        published_split(ok.assign(published_split=""))
    with pytest.raises(UserError, match=r"has no val images; a study needs all three parts"):
        published_split(ok.assign(published_split=["train", "train", "test", "test"]))


def test_derm7pt_index_files_become_the_published_split_and_validate_says_so(tmp_path):
    root = derm7pt_folder(tmp_path / "d7", n_cases=6, parts={"train": [0, 1, 2], "val": [3], "test": [4, 5]})
    t = read_table(root)
    assert t.layout == "derm7pt"
    by_case = t.df.groupby("case")["published_split"].agg(set).to_dict()
    assert by_case == {"1": {"train"}, "2": {"train"}, "3": {"train"}, "4": {"val"}, "5": {"test"}, "6": {"test"}}
    notes = " ".join(validate(t, progress=False).notes)
    assert "published split" in notes and "3 train, 1 valid, 2 test cases" in notes and "split.published" in notes
    # a case listed in two files is kept as both, so the check names it instead of one file silently winning
    root = derm7pt_folder(tmp_path / "d7b", n_cases=6, parts={"train": [0, 1, 2], "val": [3], "test": [3, 4, 5]})
    t = read_table(root)
    assert set(t.df.loc[t.df["case"] == "4", "published_split"]) == {"val+test"}
    with pytest.raises(UserError, match=r"Xyz_Dm003 \(val\+test\)"):
        published_split(t.df)


TINY = ["data.image_size=32", "train.epochs=1", "train.max_steps_per_epoch=2", "eval.bootstrap=10",
        "train.precision=fp32", "data.batch_size=16", "data.num_workers=0", "train.archs=[timm:resnet10t]",
        "explain.gallery=false", "robustness.enabled=false", "ood.method=none", "reader_study.simulate=false",
        "cross_site.enabled=false", "data.labels=ham7"]


def test_study_uses_derm7pts_published_split(tmp_path):
    root = derm7pt_folder(tmp_path / "d7")
    out = tmp_path / "study"
    study.run_study(load_config("demo", [*TINY, "split.published=true"]), out, data=root, progress=False)
    sp = read_split(out / "splits.csv")
    meta = pd.read_csv(root / "meta" / "meta.csv")
    want = {}
    for tag, f in PARTS.items():
        for i in pd.read_csv(root / "meta" / f)["indexes"]:
            for col in ("clinic", "derm"):
                want[meta.at[int(i), col].replace("/", "_").removesuffix(".jpg")] = tag
    assert dict(zip(sp["image_id"], sp["split"], strict=True)) == want
    assert "published split" in (out / "report.md").read_text()
    # a published split that leaves cases out stops the study in one line, naming the images
    bad = derm7pt_folder(tmp_path / "d7bad", parts={"train": list(range(18)), "val": list(range(18, 24)),
                                                     "test": list(range(24, 29))})
    with pytest.raises(UserError, match=r"2 images have no single published part \(first: Xyz_Dm029 \(none\), Xyz_Cl029"):
        study.run_study(load_config("demo", [*TINY, "split.published=true"]), tmp_path / "s2", data=bad,
                        progress=False)
