"""Colour constancy, acquisition perturbations, robustness metrics and lesion-level consistency."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_tiny_checkpoint
from PIL import Image

from lesionlab.data.color import color_transform, shades_of_gray, shades_of_gray_gains
from lesionlab.data.perturbations import PERTURBATIONS, conditions, get_perturbation, perturb
from lesionlab.evaluation.consistency import (
    consistency,
    consistency_table,
    image_vs_lesion,
    lesion_level,
    lesion_table,
)
from lesionlab.evaluation.robustness import (
    condition_metrics,
    flip_rate,
    robustness_table,
    summarize_robustness,
)
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASS_INDEX, CLASSES

# ----------------------------------------------------------------------------- colour constancy


def _numpy_shade_of_gray(img_hwc: np.ndarray, power: float = 6) -> np.ndarray:
    """Independent formulation: the widely copied `shade_of_gray_cc` (numpy, HWC), rounding instead of truncating."""
    img = img_hwc.astype("float64")
    rgb_vec = np.power(np.mean(np.power(img, power), (0, 1)), 1 / power)
    rgb_vec = rgb_vec / np.sqrt(np.sum(np.power(rgb_vec, 2.0)))
    rgb_vec = 1 / (rgb_vec * np.sqrt(3))
    return np.clip(np.round(img * rgb_vec), 0, 255).astype(np.uint8)


def test_shades_of_gray_hand_worked_case():
    # Two pixels, p=2: R = (100, 100), G = (50, 50), B = (0, 200).
    # e = (sqrt(mean R^2), sqrt(mean G^2), sqrt(mean B^2)) = (100, 50, sqrt(20000)=141.42...) (in 0..255 units)
    # ||e|| = sqrt(100^2 + 50^2 + 20000) = sqrt(32500) = 180.28; gain_c = ||e|| / (sqrt(3) e_c)
    # gains = (1.0408, 2.0817, 0.7360): R -> 104.08, G -> 104.08, B -> (0, 147.2)
    img = torch.tensor([[[100, 100]], [[50, 50]], [[0, 200]]], dtype=torch.uint8)
    g = shades_of_gray_gains(img, p=2).numpy()
    np.testing.assert_allclose(g, [np.sqrt(32500) / (np.sqrt(3) * e) for e in (100, 50, np.sqrt(20000))], rtol=1e-12)
    np.testing.assert_allclose(g, [1.04083, 2.08167, 0.73598], atol=1e-5)
    out = shades_of_gray(img, p=2)
    assert out[:, 0, :].tolist() == [[104, 104], [104, 104], [0, 147]]


def test_shades_of_gray_matches_independent_numpy_formulation():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    hwc[..., 0] = (hwc[..., 0] * 0.6).astype(np.uint8)  # a colour cast, so the gains are far from 1
    ours = shades_of_gray(torch.from_numpy(hwc).permute(2, 0, 1), p=6).permute(1, 2, 0).numpy()
    ref = _numpy_shade_of_gray(hwc, 6)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1  # float64 vs float64: rounding ties only
    assert (ours == ref).mean() > 0.999


def test_shades_of_gray_removes_a_colour_cast_and_keeps_brightness_changes():
    rng = np.random.default_rng(1)
    base = torch.from_numpy(rng.integers(40, 200, size=(3, 40, 40), dtype=np.uint8))
    cast = (base.double() * torch.tensor([1.2, 1.0, 0.8]).view(3, 1, 1)).round().clamp(0, 255).to(torch.uint8)
    # The cast is undone up to one global factor (||e|| changes with the cast): equal ratios in every channel.
    ratio = shades_of_gray(cast).double().mean((1, 2)) / shades_of_gray(base).double().mean((1, 2))
    assert ratio.max() / ratio.min() < 1.01
    before = cast.double().mean((1, 2)) / base.double().mean((1, 2))
    assert before.max() / before.min() > 1.4
    # A brightness change scales every channel alike: the gains do not move.
    np.testing.assert_allclose(shades_of_gray_gains(base), shades_of_gray_gains(base // 2 * 1), rtol=0.02)
    # A neutral (grey) image is left alone; an all-black one does not divide by zero.
    grey = torch.full((3, 8, 8), 90, dtype=torch.uint8)
    assert torch.equal(shades_of_gray(grey), grey)
    black = torch.zeros((3, 8, 8), dtype=torch.uint8)
    assert torch.equal(shades_of_gray(black), black)


def test_color_transform_names():
    assert color_transform("none") is None
    assert color_transform("shades_of_gray", 6).p == 6
    with pytest.raises(UserError, match="color_constancy"):
        color_transform("grey_world")


# ----------------------------------------------------------------------------- perturbations


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:90, 0:120]
    blob = ((yy - 45) ** 2 + (xx - 60) ** 2 < 600)[None]
    img = np.where(blob, [[[120]], [[60]], [[40]]], [[[210]], [[170]], [[150]]]) + rng.normal(0, 8, (3, 90, 120))
    return torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8))


def test_every_perturbation_keeps_shape_and_is_deterministic(photo):
    for name, li, level in conditions():
        a = perturb(photo, name, level, seed=3, level_index=li, image_index=7)
        b = perturb(photo, name, level, seed=3, level_index=li, image_index=7)
        assert a.shape == photo.shape and a.dtype == torch.uint8, name
        assert torch.equal(a, b), name
        assert not torch.equal(a, photo), f"{name} at {level} left the image unchanged"
    # Only the noise draws from the seed; its draws depend on the image index, not on batch order.
    n1 = perturb(photo, "gaussian_noise", 5, seed=3, image_index=1)
    assert not torch.equal(n1, perturb(photo, "gaussian_noise", 5, seed=3, image_index=2))
    assert torch.equal(n1, perturb(photo, "gaussian_noise", 5, seed=3, image_index=1))


def test_perturbations_do_what_they_say(photo):
    assert torch.equal(perturb(photo, "hflip", 1), photo.flip(-1))
    assert torch.equal(perturb(photo, "vflip", 1), photo.flip(-2))
    assert torch.equal(perturb(photo, "rotation", 180), photo.flip(-1).flip(-2))
    assert perturb(photo, "brightness", 0.5).float().mean() < 0.55 * photo.float().mean()
    assert perturb(photo, "contrast", 0.5).float().std() < 0.6 * photo.float().std()
    warm = perturb(photo, "color_temperature", 0.2).float().mean((1, 2)) / photo.float().mean((1, 2))
    assert warm[0] > 1.15 and abs(warm[1] - 1) < 0.01 and warm[2] < 0.85
    # Blur lowers high-frequency energy more as severity grows.
    hf = [perturb(photo, "blur", s).float().diff(dim=-1).abs().mean() for s in (0.005, 0.02, 0.04)]
    assert hf[0] > hf[1] > hf[2]
    # Zooming in enlarges the (central) dark blob; zooming out shrinks it.
    dark = [(perturb(photo, n, v)[0] < 160).float().mean() for n, v in (("zoom_out", 0.6), ("zoom_in", 1.0), ("zoom_in", 0.6))]
    assert dark[0] < dark[1] < dark[2]
    # Lower JPEG quality moves further from the original.
    err = [(perturb(photo, "jpeg", q).float() - photo.float()).abs().mean() for q in (90, 10)]
    assert err[0] < err[1]


def test_perturbation_registry_and_conditions():
    assert {"zoom_in", "zoom_out", "rotation", "brightness", "contrast", "color_temperature", "blur", "jpeg",
            "hflip", "vflip"} <= set(PERTURBATIONS)
    with pytest.raises(UserError, match="valid: zoom_in"):
        get_perturbation("fisheye")
    c = conditions(["rotation"], max_levels=3)
    assert [lv for _, _, lv in c] == [15.0, 45.0, 180.0] or len(c) == 3
    assert [lv for _, _, lv in conditions(["jpeg"])] == [90, 70, 50, 30, 10]
    pil = Image.fromarray(np.zeros((10, 12, 3), np.uint8))
    assert perturb(pil, "hflip", 1).shape == (3, 10, 12)


# ----------------------------------------------------------------------------- robustness metrics


def test_flip_rate_and_condition_metrics_by_hand():
    clean = np.eye(7)[[0, 1, 2, 3]]
    pert = np.eye(7)[[0, 1, 1, 1]]
    assert flip_rate(clean, pert) == 0.5
    y = np.array([0, 1, 2, 3])
    m = condition_metrics(y, pert)
    assert m["mel_sensitivity"] == 1.0
    assert m["balanced_accuracy"] == pytest.approx(0.5)  # MEL, NV right; BCC, AKIEC wrong
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 200)
    p = rng.dirichlet(np.ones(7), 200)
    m = condition_metrics(y, p)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_robustness_table_rows_and_deltas():
    y = np.array([0, 0, 1, 1])
    clean = {"a": np.eye(7)[[0, 0, 1, 1]] * 0.9 + 0.01}
    pert = {"a": {("blur", 0.01): np.eye(7)[[0, 1, 1, 1]] * 0.9 + 0.01, ("blur", 0.04): np.eye(7)[[1, 1, 1, 1]] * 0.9 + 0.01}}
    t = robustness_table(y, clean, pert)
    assert list(t["perturbation"]) == ["none", "blur", "blur"]
    row = t[t["level"] == 0.04].iloc[0]
    assert row["flip_rate"] == 0.5 and row["mel_sensitivity"] == 0.0 and row["delta_mel_sensitivity"] == -1.0
    assert row["delta_balanced_accuracy"] == pytest.approx(-0.5)
    s = summarize_robustness(t)
    assert s.iloc[0]["max_flip_rate"] == 0.5 and s.iloc[0]["mean_flip_rate"] == 0.375
    unlabelled = robustness_table(None, clean, pert)
    assert unlabelled["flip_rate"].tolist() == [0.0, 0.25, 0.5] and unlabelled["balanced_accuracy"].isna().all()


# ----------------------------------------------------------------------------- lesion consistency


def test_consistency_by_hand():
    # Lesion A: 2 images, same class (correct). B: 3 images, two classes. C: 1 image (not counted).
    ids = np.array(["A", "A", "B", "B", "B", "C"])
    pred = np.eye(7)[[1, 1, 0, 0, 2, 3]]
    y = np.array([1, 1, 0, 0, 0, 3])
    t = lesion_table(ids, pred, y)
    assert t.set_index("lesion_id").loc["B", "classes"] == "MEL,BCC"
    c = consistency(ids, pred, y, n_boot=200)
    assert (c["lesions"], c["images"]) == (2, 5)
    assert c["consistent_share"] == 0.5 and c["all_correct_share"] == 0.5
    assert 0 <= c["consistent_lo"] <= 0.5 <= c["consistent_hi"] <= 1
    tab = consistency_table(ids, {"m": pred, "ensemble": np.eye(7)[[1, 1, 0, 0, 0, 3]]}, y, n_boot=0)
    assert tab["consistent_share"].tolist() == [0.5, 1.0]


def test_lesion_level_means_and_metrics():
    ids = np.array(["A", "A", "B"])
    p = np.zeros((3, 7))
    p[0, [0, 1]] = [0.6, 0.4]
    p[1, [0, 1]] = [0.2, 0.8]
    p[2, 2] = 1
    lid, y, pl = lesion_level(ids, np.array([1, 1, 2]), p)
    assert lid.tolist() == ["A", "B"] and y.tolist() == [1, 2]
    np.testing.assert_allclose(pl[0, :2], [0.4, 0.6])
    with pytest.raises(UserError, match="lesion A"):
        lesion_level(ids, np.array([1, 0, 2]), p)
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(60), 2)
    y = np.repeat(rng.integers(0, 7, 60), 2)
    probs = rng.dirichlet(np.ones(7), 120)
    probs[np.arange(120), y] += 0.5
    t = image_vs_lesion(ids, y, probs / probs.sum(1, keepdims=True), n_boot=50)
    assert set(t["level"]) == {"image", "lesion"} and t.groupby("level")["n"].first().to_dict() == {"image": 120, "lesion": 60}
    assert t["value"].notna().all()


# ----------------------------------------------------------------------------- the runner, on a tiny model


def test_predict_perturbed_matches_plain_inference(tmp_path):
    from lesionlab.inference.perturbed import predict_perturbed
    from lesionlab.inference.predictor import load_predictors

    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (45, 60, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    df = pd.DataFrame({"path": paths, "label": ["MEL", "NV", "NV", "BCC", "MEL"]})
    preds = load_predictors([make_tiny_checkpoint(tmp_path / "m", seed=0, input_size=32)], device="cpu", precision="fp32")
    conds = conditions(["hflip", "gaussian_noise"], max_levels=1)
    clean, pert = predict_perturbed(preds, df, conds, seed=1, chunk=2, progress=False)
    name = preds[0].name
    np.testing.assert_allclose(clean[name], preds[0].predict_frame(df, progress=False), atol=1e-5)
    flipped = preds[0].predict_images([Image.open(p).transpose(Image.FLIP_LEFT_RIGHT) for p in paths])
    np.testing.assert_allclose(pert[name][("hflip", 1.0)], flipped, atol=1e-5)
    # Seeded per image, so the chunk size does not change the noisy predictions.
    _, pert2 = predict_perturbed(preds, df, conds, seed=1, chunk=5, progress=False)
    np.testing.assert_allclose(pert[name][("gaussian_noise", 2.0)], pert2[name][("gaussian_noise", 2.0)], atol=1e-6)
    t = robustness_table(np.array([CLASS_INDEX[c] for c in df["label"]]), clean, pert)
    assert len(t) == 1 + len(conds) and set(t["model"]) == {name}
    assert len(CLASSES) == clean[name].shape[1]
    # --tta: the clean and every perturbed copy go through the same TTA views as `infer --tta`.
    clean_t, pert_t = predict_perturbed(preds, df, conds, seed=1, chunk=2, tta=True, progress=False)
    np.testing.assert_allclose(clean_t[name], preds[0].predict_frame(df, tta=True, progress=False), atol=1e-5)
    assert np.abs(clean_t[name] - clean[name]).max() > 1e-4
    flipped_t = preds[0].predict_images([Image.open(p).transpose(Image.FLIP_LEFT_RIGHT) for p in paths], tta=True)
    np.testing.assert_allclose(pert_t[name][("hflip", 1.0)], flipped_t, atol=1e-5)


# ----------------------------------------------------------------------------- colour constancy, train to inference


def test_color_constancy_is_trained_recorded_and_applied_at_inference(synth_dir, synth_split, tiny_cfg, tmp_path):
    from lesionlab.config import load_config
    from lesionlab.data.cache import pil_to_uint8_tensor
    from lesionlab.data.color import ShadesOfGray
    from lesionlab.data.dataset import make_dataset
    from lesionlab.data.images import load_image
    from lesionlab.data.split import read_split
    from lesionlab.data.subsets import split_frames
    from lesionlab.data.tables import read_table
    from lesionlab.data.transforms import build_eval_transform
    from lesionlab.inference.predictor import Predictor
    from lesionlab.models import read_meta
    from lesionlab.training.fit import fit

    cfg = load_config("demo", [f"{k}={v}" for k, v in {
        "data.image_size": 32, "data.batch_size": 16, "data.num_workers": 0, "train.epochs": 1, "train.max_steps_per_epoch": 2,
        "train.pretrained": "none", "train.device": "cpu", "train.precision": "fp32",
        "data.color_constancy": "shades_of_gray", "data.color_constancy_p": 4}.items()])
    tr, va = split_frames(read_table(synth_dir), read_split(synth_split))
    fit("timm:resnet10t", tr, va, cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    meta = read_meta(tmp_path / "run")
    assert (meta["color_constancy"], meta["color_constancy_p"]) == ("shades_of_gray", 4.0)
    pr = Predictor(tmp_path / "run", device="cpu", precision="fp32")
    assert [t.p for t in pr.transform.transforms if isinstance(t, ShadesOfGray)] == [4.0]
    # The training pipeline (through the image cache, augmentation off) and inference give the same tensor.
    ds = make_dataset(va.head(3), build_eval_transform(spec=pr.spec), input_size=pr.spec.input_size,
                      crop_fraction=pr.spec.crop_fraction, cache_dir=tmp_path / "cache", progress=False)
    for i, path in enumerate(va["path"].head(3)):
        assert torch.equal(ds[i][0], pr.transform(pil_to_uint8_tensor(load_image(path))))
    with pytest.raises(UserError, match="color_constancy"):
        fit("timm:resnet10t", tr, va, load_config("demo", ["data.color_constancy=gray"]), tmp_path / "bad", progress=False)


# ----------------------------------------------------------------------------- the command and the report section


def test_robustness_command_writes_tables_plots_and_report_section(synth_dir, synth_split, tmp_path, capsys):
    import json

    from lesionlab.cli import main
    from lesionlab.report.document import Report
    from lesionlab.report.study_report import robustness_section

    for i in range(2):
        make_tiny_checkpoint(tmp_path / "runs" / f"m{i}", seed=i, input_size=32)
    out = tmp_path / "rob"
    rc = main(["robustness", "--data", str(synth_dir), "--split", str(synth_split), "--runs", str(tmp_path / "runs"),
               "--perturbations", "hflip,color_temperature", "--max-levels", "2", "--max-images", "8", "--device", "cpu",
               "--precision", "fp32", "--set", "eval.bootstrap=20", "--set", "data.num_workers=0", "--out", str(out)])
    assert rc == 0 and "8 of" in capsys.readouterr().out
    t = pd.read_csv(out / "robustness.csv")
    assert set(t["model"]) == {"timm:resnet10t", "timm:resnet10t-2", "ensemble"}
    assert len(t) == 3 * (1 + 1 + 2) and (t["n"] == 8).all()
    assert set(t.loc[t["perturbation"] == "color_temperature", "level"]) == {-0.3, 0.3}
    for m in ("flip_rate", "delta_balanced_accuracy", "delta_mel_sensitivity", "delta_macro_auc"):
        assert (out / f"robustness_{m}.png").stat().st_size > 1000
    cons = pd.read_csv(out / "lesion_consistency.csv")
    assert list(cons["model"]) == ["timm:resnet10t", "timm:resnet10t-2", "ensemble"] and (cons["lesions"] >= 1).all()
    assert set(pd.read_csv(out / "lesion_metrics.csv")["level"]) == {"image", "lesion"}
    assert json.loads((out / "robustness.json").read_text())["perturbed_images"] == 8
    assert not t["tta"].any()
    rc = main(["robustness", "--data", str(synth_dir), "--split", str(synth_split), "--runs", str(tmp_path / "runs" / "m0"),
               "--perturbations", "hflip", "--max-levels", "1", "--max-images", "4", "--device", "cpu", "--tta",
               "--precision", "fp32", "--set", "eval.bootstrap=20", "--set", "data.num_workers=0", "--out", str(out / "tta")])
    assert rc == 0 and json.loads((out / "tta" / "robustness.json").read_text())["tta"] is True
    assert pd.read_csv(out / "tta" / "robustness.csv")["tta"].all()
    # The study report's section reads the same files (the study writes consistency/ beside robustness/).
    (tmp_path / "study" / "consistency").mkdir(parents=True)
    (out).rename(tmp_path / "study" / "robustness")
    for f in ("lesion_consistency.csv", "lesion_metrics.csv"):
        (tmp_path / "study" / "robustness" / f).rename(tmp_path / "study" / "consistency" / f)
    rep = Report("t")
    robustness_section(rep, tmp_path / "study")
    md = "\n".join(rep.md)
    assert "Robustness" in md and "color_temperature" in md and "same class" in md and "lesion" in md
    with pytest.raises(SystemExit):
        main(["robustness", "--data", str(synth_dir), "--split", str(synth_split), "--runs", str(tmp_path / "runs"),
              "--subset", "holdout", "--out", str(out)])
    assert main(["robustness", "--data", str(synth_dir), "--split", str(synth_split), "--runs", str(tmp_path / "runs"),
                 "--perturbations", "fisheye", "--out", str(out)]) != 0
    assert "unknown perturbation 'fisheye'" in capsys.readouterr().err


def test_consistency_command_from_prediction_csvs(tmp_path, capsys):
    from lesionlab.cli import main
    from lesionlab.data.isic_csv import write_isic_csv

    ids = [f"ISIC_{i:07d}" for i in range(6)]
    truth = pd.DataFrame(np.eye(7)[[1, 1, 0, 0, 0, 3]], columns=list(CLASSES))
    truth.insert(0, "image", ids)
    write_isic_csv(tmp_path / "truth.csv", truth)
    for name, rows in (("a", [1, 1, 0, 0, 2, 3]), ("b", [1, 1, 0, 0, 0, 3])):
        pred = pd.DataFrame(np.eye(7)[rows] * 0.9 + 0.1 / 7, columns=list(CLASSES))
        pred.insert(0, "image", ids)
        write_isic_csv(tmp_path / f"{name}.csv", pred)
    pd.DataFrame({"image_id": ids, "group_id": ["A", "A", "B", "B", "B", "C"]}).to_csv(tmp_path / "les.csv", index=False)
    argv = ["consistency", "--truth", str(tmp_path / "truth.csv"), "--pred", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
            "--lesions", str(tmp_path / "les.csv"), "--bootstrap", "20", "--ensemble", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    cons = pd.read_csv(tmp_path / "out" / "lesion_consistency.csv").set_index("model")
    assert cons.loc["a", "consistent_share"] == 0.5 and cons.loc["b", "consistent_share"] == 1.0
    assert cons.loc["ensemble", "lesions"] == 2 and "ensemble" in capsys.readouterr().out
    pd.DataFrame({"image_id": ids[:5], "group_id": ["A", "A", "B", "B", "B"]}).to_csv(tmp_path / "les.csv", index=False)
    assert main(argv) != 0 and "no lesion id" in capsys.readouterr().err


def test_robustness_runs_accept_a_bundle_folder(tiny_bundle):
    from lesionlab.workflows.robustness import model_dirs

    dirs = model_dirs([tiny_bundle])
    assert len(dirs) == 2 and all(d.parent.name == "members" for d in dirs)
