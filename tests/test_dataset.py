import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionlab.data.dataset import make_dataset
from lesionlab.data.images import ImageError, decode_image, load_image
from lesionlab.data.tables import read_table
from lesionlab.data.validation import load_valid_table, validate
from lesionlab.exceptions import UserError


def _img(path, size=(60, 45), mode="RGB", color=(200, 100, 50)):
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)


def _ham(tmp_path, rows, images):
    (tmp_path / "HAM10000_images_part_1").mkdir()
    for iid in images:
        _img(tmp_path / "HAM10000_images_part_1" / f"{iid}.jpg")
    pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "extra"]).to_csv(
        tmp_path / "HAM10000_metadata.csv", index=False
    )


def test_clean_ham_layout_keeps_extra_columns(tmp_path):
    rows = [("L1", "I1", "mel", "histo", 50, "male", "back", "x"), ("L1", "I2", "mel", "histo", 50, "male", "back", "y"),
            ("L2", "I3", "nv", "follow_up", 40, "female", "face", "z")]
    _ham(tmp_path, rows, ["I1", "I2", "I3"])
    t = read_table(tmp_path)
    assert t.layout == "ham10000" and list(t.df["label"]) == ["MEL", "MEL", "NV"]
    assert "extra" in t.df.columns and all(t.df["path"] != "")
    assert validate(t, progress=False).ok


def test_validation_finds_every_kind_of_problem(tmp_path):
    rows = [
        ("L1", "I1", "mel", "histo", 50, "male", "back", ""),
        ("L1", "I2", "nv", "histo", 50, "male", "back", ""),  # lesion with two diagnoses
        ("L2", "I3", "lentigo", "histo", 50, "male", "back", ""),  # unknown dx
        ("L3", "I4", "bcc", "histo", 50, "male", "back", ""),  # missing image
        ("L4", "I1", "mel", "histo", 50, "male", "back", ""),  # duplicate image id
        ("", "I5", "bkl", "histo", 50, "male", "back", ""),  # empty lesion id
        ("L6", "I6", "df", "histo", 50, "male", "back", ""),  # truncated image
        ("L8", "I8", "vasc", "histo", 50, "male", "back", ""),  # fine
    ]
    _ham(tmp_path, rows, ["I1", "I2", "I3", "I5", "I6", "I7", "I8"])  # I7 has no row
    data = (tmp_path / "HAM10000_images_part_1" / "I6.jpg").read_bytes()
    (tmp_path / "HAM10000_images_part_1" / "I6.jpg").write_bytes(data[: len(data) // 2])
    rep = validate(read_table(tmp_path), progress=False)
    c = rep.counts()
    assert c == {
        "empty lesion_id": 1, "unknown dx code": 1, "duplicate image id": 1, "lesion with two diagnoses": 2,
        "missing image file": 1, "image without a row": 1, "unreadable image": 1,
    }
    s = rep.summary()
    assert "\n" not in s and "row 4 I3" in s and "--skip-invalid" in s
    with pytest.raises(UserError):
        load_valid_table(tmp_path)
    table, _ = load_valid_table(tmp_path, skip_invalid=True, skipped_csv=tmp_path / "skipped.csv")
    assert list(table.df["image_id"]) == ["I8"]
    assert len(pd.read_csv(tmp_path / "skipped.csv")) == len(rep.problems)


def test_isic_layout_with_and_without_groupings(tmp_path):
    for i in range(3):
        _img(tmp_path / f"ISIC_{i}.png")
    gt = pd.DataFrame({"image": ["ISIC_0", "ISIC_1", "ISIC_2"], "MEL": [1.0, 0, 0], "NV": [0, 1.0, 0.5], "BCC": [0, 0, 0.5],
                       "AKIEC": 0.0, "BKL": 0.0, "DF": 0.0, "VASC": 0.0})
    gt.to_csv(tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    t = read_table(tmp_path)
    assert t.layout == "isic2018" and any("own lesion" in n for n in t.notes)
    assert list(t.df["label"]) == ["MEL", "NV", ""]
    rep = validate(t, progress=False)
    assert rep.counts() == {"bad label row": 1}
    pd.DataFrame({"image": ["ISIC_0", "ISIC_1"], "lesion_id": ["A", "A"]}).to_csv(
        tmp_path / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    t2 = read_table(tmp_path)
    assert list(t2.df["lesion_id"]) == ["A", "A", "ISIC_2"]


def test_unrecognised_csv_and_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_table(tmp_path / "nope")
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(UserError, match="unrecognised columns"):
        read_table(tmp_path, tmp_path / "x.csv")


def test_decoding_exif_modes_and_bombs(tmp_path):
    # EXIF orientation 6 (rotate 90): a 60x40 stored image is shown as 40x60
    im = Image.new("RGB", (60, 40), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (40, 60)
    for mode in ("L", "RGBA", "CMYK", "I;16", "P"):
        p = tmp_path / f"m_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (8, 8)).save(p)
        assert load_image(p).mode == "RGB"
    arr = np.full((4, 4), 65535, np.uint16)
    Image.fromarray(arr).save(tmp_path / "w16.png")
    assert np.asarray(load_image(tmp_path / "w16.png")).min() == 255
    _img(tmp_path / "big.png", size=(400, 300))
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(tmp_path / "big.png", max_pixels=1000)
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(io.BytesIO(b"not an image"), name="upload")


def test_cache_matches_direct_decoding(synth_dir, tmp_path):
    from lesionlab.data.transforms import DataSpec, build_eval_transform

    t = read_table(synth_dir)
    df = t.df.head(5)
    tf = build_eval_transform(spec=DataSpec(input_size=32))
    cached = make_dataset(df, tf, input_size=32, crop_fraction=2 / 3, cache_dir=tmp_path, progress=False)
    direct = make_dataset(df, tf, input_size=32, crop_fraction=2 / 3, cache_dir=None)
    assert len(list(tmp_path.glob("images-*.npy"))) == 1
    for i in range(5):
        a, ya = cached[i]
        b, yb = direct[i]
        assert a.shape == b.shape == (3, 32, 32) and ya == yb
        assert (a - b).abs().mean() < 0.15  # resize order differs slightly; content is the same
