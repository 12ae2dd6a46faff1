import io

import numpy as np
import pandas as pd
import pytest
import torch
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


def _textured(w: int, h: int, seed: int) -> Image.Image:
    """Noise over a gradient: any second resampling or geometric mismatch shows up in many pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(96, 96), (120, 90), (120, 80), (90, 120), (61, 97)], ids=["1:1", "4:3", "3:2", "portrait", "odd"])
def test_training_cached_uncached_and_inference_give_the_same_tensor(size, tmp_path):
    """One preprocessing path: dataset item (augmentation off) cached == uncached == Predictor, at any aspect ratio."""
    from helpers import make_tiny_checkpoint

    from lesionlab.data.transforms import build_eval_transform
    from lesionlab.inference.predictor import Predictor

    paths = []
    for k in range(2):  # two images of the same shape, plus one 4:3 first so the cache cannot copy image 0's shape
        if k == 0:
            _textured(200, 150, 99).save(tmp_path / "first.png")
            paths.append(tmp_path / "first.png")
        _textured(*size, seed=k).save(tmp_path / f"img{k}.png")
        paths.append(tmp_path / f"img{k}.png")
    df = pd.DataFrame({"path": [str(p) for p in paths], "label": ["NV"] * len(paths)})
    pred = Predictor(make_tiny_checkpoint(tmp_path / "ck", seed=0, input_size=48), device="cpu", precision="fp32")
    spec = pred.spec
    tf = build_eval_transform(spec=spec)
    cached = make_dataset(df, tf, input_size=spec.input_size, crop_fraction=spec.crop_fraction, cache_dir=tmp_path / "c",
                          progress=False)
    direct = make_dataset(df, tf, input_size=spec.input_size, crop_fraction=spec.crop_fraction, cache_dir=None)
    assert cached.cache is not None and direct.cache is None
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]
    for i, p in enumerate(paths):
        a, b = cached[i][0] * std + mean, direct[i][0] * std + mean
        c = pred.prepare([load_image(p)])[0] * std + mean
        assert a.shape == b.shape == c.shape == (3, 48, 48)
        assert (a - b).abs().max() <= 1 / 255 + 1e-6, f"{p.name}: cached vs uncached"
        assert (a - c).abs().max() <= 1 / 255 + 1e-6, f"{p.name}: training vs inference"


def test_rotation_augmentation_is_seeded_per_sample_and_same_cached_or_not(synth_dir, tmp_path):
    from lesionlab.data.dataset import EpochSampler
    from lesionlab.data.transforms import DataSpec, build_train_transform

    df = read_table(synth_dir).df.head(6)
    tf = build_train_transform(spec=DataSpec(input_size=32), rotation=180)
    cached = make_dataset(df, tf, input_size=32, crop_fraction=2 / 3, cache_dir=tmp_path, progress=False)
    direct = make_dataset(df, tf, input_size=32, crop_fraction=2 / 3, cache_dir=None)
    assert len(list(tmp_path.glob("images-*.npy"))) == 1
    sampler = EpochSampler(len(df), seed=3)
    e0 = list(sampler)
    sampler.set_epoch(1)
    e1 = list(sampler)
    assert sorted(i for i, _ in e0) == list(range(6)) and e0 != e1 and e0 == list(EpochSampler(len(df), seed=3))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for idx in e0:
        a, b = cached[idx][0], direct[idx][0]
        assert torch.equal(a, b) and torch.equal(a, cached[idx][0])  # same seed, same rotation, cached or not
        assert a.shape == (3, 32, 32)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    i = e0[0][0]
    assert not torch.equal(cached[e0[0]][0], cached[(i, e0[0][1] + 1)][0])  # another seed, another rotation


def test_image_less_folder_is_a_problem_not_nothing(tmp_path):
    from lesionlab.data.images import expand_image_paths

    (tmp_path / "x.jpg").mkdir()  # a folder that looks like an image
    (tmp_path / "imgs").mkdir()
    _img(tmp_path / "imgs" / "b.png")
    _img(tmp_path / "imgs" / "a.jpg")
    paths, problems = expand_image_paths([tmp_path / "x.jpg", tmp_path / "imgs", tmp_path / "c.jpg"])
    assert paths == [tmp_path / "imgs" / "a.jpg", tmp_path / "imgs" / "b.png", tmp_path / "c.jpg"]
    assert len(problems) == 1 and problems[0][0] == tmp_path / "x.jpg" and "no JPG/JPEG/PNG images" in problems[0][1]


def test_predict_reports_an_image_less_folder_and_still_predicts_the_rest(tiny_bundle, tmp_path, capsys):
    from lesionlab.cli import main

    (tmp_path / "x.jpg").mkdir()
    _img(tmp_path / "ok.jpg", size=(80, 60))
    code = main(["predict", str(tmp_path / "x.jpg"), str(tmp_path / "ok.jpg"), "--bundle", str(tiny_bundle),
                 "--device", "cpu", "--format", "csv"])
    out, err = capsys.readouterr()
    assert code != 0
    assert f"lesionlab predict: error: {tmp_path / 'x.jpg'}: a folder with no" in err and "Traceback" not in err
    assert str(tmp_path / "ok.jpg") in out and "1 of 2 input(s) failed" in err
