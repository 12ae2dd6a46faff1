"""Tiny datasets generated in each public layout (lesionlab.data.sources), with tiny images, for the loader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def _img(path: Path, seed: int, fmt: str = "JPEG", size: tuple[int, int] = (40, 30)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, fmt)


def isic2019(root: Path) -> Path:
    cls = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    rows, meta = [], []
    lesions = ["L0", "L1", "L1", "L3", "L4", ""]  # the last: no lesion id (its own group)
    for i, c in enumerate(["MEL", "NV", "NV", "SCC", "UNK", "AK"]):
        iid = f"ISIC_{i:07d}"
        rows.append({"image": iid, **{k: float(k == c) for k in cls}})
        meta.append({"image": iid, "age_approx": 50, "anatom_site_general": "back",
                     "lesion_id": lesions[i], "sex": "male"})
        _img(root / "ISIC_2019_Training_Input" / f"{iid}.jpg", i)
    pd.DataFrame(rows).to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame(meta).to_csv(root / "ISIC_2019_Training_Metadata.csv", index=False)
    return root


def isic2020(root: Path) -> Path:
    rows = []
    for i, (dx, bm) in enumerate([("melanoma", "malignant"), ("nevus", "benign"), ("unknown", "benign"),
                                  ("nevus", "benign")]):
        rows.append({"image_name": f"ISIC_{9000 + i}", "patient_id": f"IP_{i // 2}", "sex": "female", "age_approx": 40,
                     "anatom_site_general_challenge": "torso", "diagnosis": dx, "benign_malignant": bm,
                     "target": int(bm == "malignant")})
        _img(root / "jpeg" / "train" / f"ISIC_{9000 + i}.jpg", 10 + i)
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def ph2(root: Path) -> Path:
    lines = ["||   Name   | Histological Diagnosis | Clinical Diagnosis | Asymmetry ||"]
    for i, code in enumerate([0, 1, 2]):
        name = f"IMD{i + 2:03d}"
        lines.append(f"|| {name} ||  {'Melanoma' if code == 2 else ''}  ||  {code}  ||  0  ||")
        _img(root / "PH2 Dataset images" / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp", 20 + i, fmt="BMP")
    lines.append("")
    lines.append("Legend: 0 - Common Nevus; 1 - Atypical Nevus; 2 - Melanoma")
    (root / "PH2_dataset.txt").write_text("\n".join(lines))
    return root


def derm7pt(root: Path) -> Path:
    rows = []
    for i, dx in enumerate(["melanoma (in situ)", "clark nevus", "basal cell carcinoma"]):
        rows.append({"case_num": i + 1, "diagnosis": dx, "seven_point_score": 3, "pigment_network": "typical",
                     "level_of_diagnostic_difficulty": "low", "elevation": "flat", "location": "back", "sex": "male",
                     "clinic": f"Aaa/Cl{i:03d}.jpg", "derm": f"Aaa/Dm{i:03d}.jpg", "management": "excision"})
        _img(root / "images" / "Aaa" / f"Cl{i:03d}.jpg", 30 + i)
        _img(root / "images" / "Aaa" / f"Dm{i:03d}.jpg", 40 + i)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "meta" / "meta.csv", index=False)
    pd.DataFrame({"indexes": [0, 1]}).to_csv(root / "meta" / "train_indexes.csv", index=False)
    pd.DataFrame({"indexes": [2]}).to_csv(root / "meta" / "test_indexes.csv", index=False)
    return root


def pad_ufes_20(root: Path) -> Path:
    rows = []
    for i, dx in enumerate(["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]):
        rows.append({"patient_id": f"PAT_{i // 2}", "lesion_id": 100 + i // 2 * 0 + i, "smoke": "False", "age": 60,
                     "fitspatrick": (i % 3) + 1, "region": "FACE", "diagnostic": dx, "img_id": f"PAT_{i // 2}_{i}_1.png",
                     "biopsed": str(dx in ("BCC", "MEL", "SCC"))})
        _img(root / "images" / f"PAT_{i // 2}_{i}_1.png", 50 + i, fmt="PNG")
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def fitzpatrick17k(root: Path) -> Path:
    rows = []
    for i, part in enumerate(["malignant", "benign", "non-neoplastic", "benign"]):
        md5 = f"{i:032x}"
        rows.append({"md5hash": md5, "fitzpatrick_scale": [1, 5, -1, 3][i], "fitzpatrick_centaur": 2,
                     "label": "psoriasis", "nine_partition_label": "inflammatory", "three_partition_label": part,
                     "qc": "", "url": f"https://example.org/{i}.jpg", "url_alphanum": f"x{i}"})
        _img(root / "images" / f"{md5}.jpg", 60 + i)
    pd.DataFrame(rows).to_csv(root / "fitzpatrick17k.csv", index=False)
    return root


def ddi(root: Path) -> Path:
    rows = []
    for i, (tone, mal) in enumerate([(12, True), (34, False), (56, True), (56, False)]):
        rows.append({"DDI_ID": i + 1, "DDI_file": f"{i + 1:06d}.png", "skin_tone": tone, "malignant": mal,
                     "disease": "melanoma-in-situ" if mal else "seborrheic-keratosis"})
        _img(root / "images" / f"{i + 1:06d}.png", 70 + i, fmt="PNG")
    pd.DataFrame(rows).to_csv(root / "ddi_metadata.csv", index=False)
    return root


BUILDERS = {"isic2019": isic2019, "isic2020": isic2020, "ph2": ph2, "derm7pt": derm7pt, "pad_ufes_20": pad_ufes_20,
            "fitzpatrick17k": fitzpatrick17k, "ddi": ddi}
