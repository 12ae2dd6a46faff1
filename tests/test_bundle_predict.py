import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import lesion_like, make_tiny_checkpoint, write_study
from PIL import Image

from lesionlab.clinic.bundle import EnsemblePredictor, make_bundle, verify_bundle
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASSES
from lesionlab.study_folder import StudyFolder


def test_bundle_manifest_and_hash_check(tiny_bundle, tmp_path):
    m = verify_bundle(tiny_bundle)
    assert m["classes"] == list(CLASSES) and len(m["members"]) == 2
    assert m["melanoma_threshold"]["value"] == 0.15 and "lesionlab_version" in m
    assert all(len(h) == 64 for mem in m["members"] for h in mem["files"].values())
    # tamper with one weight byte in a copy
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    w = copy / m["members"][0]["dir"] / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its manifest hash"):
        verify_bundle(copy)
    with pytest.raises(UserError, match="not a LesionLab bundle"):
        verify_bundle(tmp_path)


def test_threshold_is_chosen_on_the_study_validation_split(tmp_path):
    study = tmp_path / "study"
    runs = [make_tiny_checkpoint(study / "runs" / n, seed=i) for i, n in enumerate(["a", "b"])]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    mel_a = np.array([0.9, 0.7, 0.5, 0.3, 0.6, 0.2, 0.1, 0.1, 0.05, 0.0])
    mel_b = np.array([0.7, 0.5, 0.3, 0.1, 0.2, 0.2, 0.1, 0.05, 0.05, 0.0])

    def probs(mel):
        p = np.zeros((10, 7))
        p[:, 0], p[:, 1] = mel, 1 - mel
        return p

    # members are named after their arch; both are timm:resnet10t -> timm_resnet10t, timm_resnet10t-2
    write_study(study, {"timm_resnet10t": runs[0], "timm_resnet10t-2": runs[1]}, y,
                {"timm_resnet10t": probs(mel_a), "timm_resnet10t-2": probs(mel_b)})
    m = make_bundle(runs, tmp_path / "bundle", target_sensitivity=0.75)
    # ensemble melanoma scores of the 4 melanomas: 0.8, 0.6, 0.4, 0.2 -> 3 of 4 reached at threshold 0.4, on the
    # calibrated probabilities (temperature fitted on the same validation predictions; monotone with 2 classes)
    from lesionlab.evaluation.calibration import calibrate_probs

    t = m["trust"]["models"]["ensemble"]["temperature"]
    assert m["melanoma_threshold"]["value"] == pytest.approx(calibrate_probs(np.array([[0.4, 0.6, 0, 0, 0, 0, 0]]), t)[0, 0])
    assert m["melanoma_threshold"]["validation_sensitivity"] == 0.75
    assert m["melanoma_threshold"]["probabilities"] == "calibrated ensemble"
    with pytest.raises(UserError, match="already exists and is not empty"):
        make_bundle(runs, tmp_path / "bundle", threshold=0.5)
    with pytest.raises(UserError, match="--threshold"):
        make_bundle([make_tiny_checkpoint(tmp_path / "lone", 0)], tmp_path / "b2")


def test_ensemble_predictor_result(tiny_bundle):
    ens = EnsemblePredictor(tiny_bundle, device="cpu")
    im = lesion_like()
    r = ens.predict([im, im])
    assert len(r) == 2 and r[0]["top"] in CLASSES
    assert sum(r[0]["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert r[0]["melanoma_flag"] == (r[0]["melanoma_probability"] >= 0.15)
    assert set(r[0]["members"]) == {"timm_resnet10t", "timm_resnet10t-2"} and r[0]["agreement"].endswith("/2")


def test_predict_cli_keeps_going_past_bad_files(tiny_bundle, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    lesion_like(seed=1).save(d / "a.jpg")
    lesion_like(seed=2).convert("L").save(d / "b.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    r = subprocess.run([sys.executable, "-m", "lesionlab.cli", "predict", str(d), "--bundle", str(tiny_bundle),
                        "--format", "json", "--device", "cpu", "--explain", str(tmp_path / "ex")], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    rows = json.loads(r.stdout)
    assert [("error" in x) for x in rows] == [False, False, True]
    assert "broken.jpg" in r.stderr and "Traceback" not in r.stderr
    assert len(list((tmp_path / "ex").glob("*.png"))) == 2
    r = subprocess.run([sys.executable, "-m", "lesionlab.cli", "predict", str(d / "a.jpg"), "--bundle", str(tiny_bundle),
                        "--format", "csv", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("image,status,top,")


def test_member_names_follow_one_rule_for_study_files_and_bundles(tmp_path):
    from lesionlab.inference.predictor import unique_names

    assert unique_names(["a", "b", "a", "a"]) == ["a", "b", "a-2", "a-3"]
    # interleaved duplicates: the bundle must name members exactly as the study named their prediction files
    from lesionlab import models

    runs = []
    for i, arch in enumerate(["timm:resnet10t", "other", "timm:resnet10t"]):
        ck = make_tiny_checkpoint(tmp_path / f"r{i}", seed=i)
        meta = json.loads((ck / models.META_FILE).read_text())
        meta["arch"] = arch
        (ck / models.META_FILE).write_text(json.dumps(meta))
        runs.append(ck)
    m = make_bundle(runs, tmp_path / "bundle", threshold=0.5)
    assert [x["name"] for x in m["members"]] == ["timm_resnet10t", "other", "timm_resnet10t-2"]


def _fake_study(root, names=("timm_resnet10t",)):
    """A study folder with validation predictions for `names` (8 images, 4 melanomas), one checkpoint each
    (`runs/<name>`), written through the StudyFolder contract."""
    study = root / "study"
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.zeros((8, 7))
    p[:, 0] = [0.9, 0.7, 0.5, 0.3, 0.4, 0.2, 0.1, 0.0]
    p[:, 1] = 1 - p[:, 0]
    cks = {n: make_tiny_checkpoint(study / "runs" / n, seed=i) for i, n in enumerate(names)}
    return write_study(study, cks, y, {n: p for n in names})


def test_bundle_records_the_settings_its_threshold_was_chosen_under(tmp_path):
    from lesionlab.config import load_config, save_config

    study = _fake_study(tmp_path)
    runs = [study / "runs" / "timm_resnet10t"]
    cfg = load_config(None, ["eval.tta=true", "train.precision=bf16", "train.device=cpu"])
    save_config(cfg, study / "config.yaml")
    m = make_bundle(runs, tmp_path / "b1")
    assert m["inference"]["tta"] is True and m["inference"]["precision"] == "bf16"
    with pytest.raises(UserError, match="--no-tta differs from the study's eval.tta True"):
        make_bundle(runs, tmp_path / "b2", tta=False)
    with pytest.raises(UserError, match="--precision fp32 differs from the study's train.precision bf16"):
        make_bundle(runs, tmp_path / "b3", precision="fp32")
    # precision auto: what the study's infer steps recorded it resolved to on the study's machine
    save_config(load_config(None, ["train.precision=auto", "train.device=cpu"]), study / "config.yaml")
    inf = make_bundle(runs, tmp_path / "b4")["inference"]
    assert inf == {"tta": False, "precision": "fp32", "engine": "torch", "source": inf["source"]}
    assert "infer steps" in inf["source"]
    sf = StudyFolder(study)
    sf.write_inference_record("timm_resnet10t", {**sf.inference_record("timm_resnet10t"), "precision": "bf16",
                                                 "device": "cuda:0"})
    inf = make_bundle(runs, tmp_path / "b8")["inference"]
    assert inf["precision"] == "bf16" and "infer steps" in inf["source"]
    with pytest.raises(UserError, match="--precision fp32 differs from the bf16 the study's models ran at"):
        make_bundle(runs, tmp_path / "b9", precision="fp32")
    # a threshold given by hand: the caller states the settings (default TTA off, precision unknown)
    assert make_bundle(runs, tmp_path / "b6", threshold=0.3)["inference"]["precision"] is None
    with pytest.raises(UserError, match="--precision 'fp64' must be one of"):
        make_bundle(runs, tmp_path / "b7", threshold=0.3, precision="fp64")


def test_predict_runs_at_the_bundles_settings_and_refuses_others(tmp_path):
    from lesionlab.inference.predictor import Predictor

    run = make_tiny_checkpoint(tmp_path / "runs" / "a", seed=0)
    make_bundle([run], tmp_path / "tta", threshold=0.3, tta=True, precision="fp32")
    ens = EnsemblePredictor(tmp_path / "tta", device="cpu")
    im = lesion_like()
    ref = Predictor(run, device="cpu", precision="fp32").predict_images([im], tta=True)[0]
    got = ens.predict([im])[0]["probabilities"]
    np.testing.assert_allclose([got[c] for c in CLASSES], ref, atol=1e-6)
    with pytest.raises(UserError, match="TTA off was asked for, but .* chosen with TTA on at fp32"):
        ens.predict([im], tta=False)
    with pytest.raises(UserError, match="--precision bf16: .*TTA on at fp32"):
        EnsemblePredictor(tmp_path / "tta", device="cpu", precision="bf16")


def _cli(capsys, *args) -> tuple[int, str, str]:
    from lesionlab.cli import main

    capsys.readouterr()
    code = main([str(x) for x in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predict_cli_refuses_other_settings_in_one_line(tiny_bundle, tmp_path, capsys):
    lesion_like().save(tmp_path / "a.jpg")
    code, out, err = _cli(capsys, "predict", tmp_path / "a.jpg", "--bundle", tiny_bundle, "--tta", "--device", "cpu")
    assert code != 0 and len(err.strip().splitlines()) == 1 and not out, err
    assert "TTA on was asked for" in err and "chosen with TTA off" in err
    make_bundle([make_tiny_checkpoint(tmp_path / "r", seed=0)], tmp_path / "b", threshold=0.3, precision="fp32")
    code, out, err = _cli(capsys, "predict", tmp_path / "a.jpg", "--bundle", tmp_path / "b", "--precision", "bf16",
                          "--device", "cpu")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "TTA off at fp32" in err
    code, out, err = _cli(capsys, "predict", tmp_path / "a.jpg", "--bundle", tmp_path / "b", "--format", "json",
                          "--device", "cpu")
    assert code == 0 and "TTA off, fp32" in err and json.loads(out)[0]["top"] in CLASSES


def _lesion_images(trust_study, n=6):
    """Validation images of the trust study's synthetic dataset (160x120: they pass the quality checks)."""

    sp = pd.read_csv(trust_study / "splits.csv", dtype=str)
    data = trust_study.parent / "data"
    paths = {p.stem: p for p in data.rglob("*.jpg")}
    return [paths[i] for i in sp.loc[sp["split"] == "val", "image_id"][:n]]


def test_trust_bundle_carries_calibration_conformal_ood_and_quality(trust_bundle, trust_study, tmp_path):
    import shutil

    m = verify_bundle(trust_bundle)
    assert m["inference"]["precision"] == "fp32"
    t = m["trust"]
    assert set(t["models"]) == {"timm_resnet10t", "timm_resnet10t-2", "ensemble"}
    assert all(0.05 <= v["temperature"] <= 20 for v in t["models"].values())
    assert t["models"]["ensemble"]["conformal"]["coverage"] == 0.9 and t["config"]["mondrian"] is True
    assert m["ood"]["method"] == "mahalanobis" and m["ood"]["validation_refused"] <= 0.05 + 1e-9
    assert len(m["ood"]["sha256"]) == 64 and (trust_bundle / m["ood"]["file"]).exists()
    assert m["quality"]["min_side"] == 100
    assert m["melanoma_threshold"]["probabilities"] == "calibrated ensemble"
    # the OOD arrays are hashed like the weights
    copy = tmp_path / "b"
    shutil.copytree(trust_bundle, copy)
    f = copy / m["ood"]["file"]
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its manifest hash"):
        verify_bundle(copy)


def test_trust_bundle_predicts_calibrated_with_differential_and_refuses_unevaluable(trust_bundle, trust_study):
    from lesionlab.evaluation.calibration import calibrate_probs

    ens = EnsemblePredictor(trust_bundle, device="cpu", precision="fp32")
    ims = [Image.open(p).convert("RGB") for p in _lesion_images(trust_study)]
    thumb = ims[0].resize((16, 12))
    res = ens.predict(ims + [thumb])
    ok = [r for r in res[:-1] if r["status"] == "ok"]
    assert len(ok) >= 4  # in-distribution images pass (95% of validation does)
    r = ok[0]
    assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-6) and r["calibrated"] is True
    assert r["differential_coverage"] == 0.9 and set(r["differential"]) <= set(CLASSES)
    probs = [r["probabilities"][c] for c in r["differential"]]
    assert probs == sorted(probs, reverse=True)
    assert r["melanoma_flag"] == (r["melanoma_probability"] >= r["melanoma_threshold"])
    # calibrated = softmax(log(mean raw member probabilities) / T_ensemble)
    raw = np.mean([pr.predict_images([ims[res.index(r)]]) for pr in ens.members], axis=0)
    t = ens.manifest["trust"]["models"]["ensemble"]["temperature"]
    np.testing.assert_allclose(calibrate_probs(raw, t)[0], [r["probabilities"][c] for c in CLASSES], atol=1e-5)
    bad = res[-1]
    assert bad["status"] == "unevaluable" and bad["reason_codes"] == ["too_small"]
    assert "16x12" in bad["reasons"][0] and bad["advice"] and "probabilities" not in bad and "top" not in bad
    research = ens.predict([thumb], research=True)[0]
    assert research["status"] == "unevaluable" and set(research["research"]["probabilities"]) == set(CLASSES)


def test_out_of_distribution_photo_is_refused(trust_bundle):
    ens = EnsemblePredictor(trust_bundle, device="cpu", precision="fp32")
    # a sharp, well exposed, non-dermoscopy image: stripes and text-like blocks, far from the training features
    rng = np.random.default_rng(0)
    arr = np.zeros((300, 400, 3), np.uint8)
    arr[:, ::8] = 255
    arr[::10] = rng.integers(0, 255, (30, 400, 3), dtype=np.uint8)
    r = ens.predict([Image.fromarray(arr)])[0]
    assert r["status"] == "unevaluable" and "out_of_distribution" in r["reason_codes"], r


def test_predict_cli_reports_unevaluable_with_its_exit_code(trust_bundle, trust_study, tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    good = _lesion_images(trust_study, 1)[0]
    Image.open(good).save(d / "a_lesion.jpg")
    Image.open(good).resize((16, 12)).save(d / "b_thumb.jpg")
    base = ["--bundle", trust_bundle, "--device", "cpu"]
    code, out, err = _cli(capsys, "predict", d, "--format", "json", *base)
    assert code == 3, err
    rows = json.loads(out)
    assert rows[1]["status"] == "unevaluable" and "too small" in rows[1]["reasons"][0]
    assert "Traceback" not in err and "unevaluable" in err
    code, out, err = _cli(capsys, "predict", d / "b_thumb.jpg", *base)
    assert code == 3 and "UNEVALUABLE" in out and "too small" in out and "nan" not in out.lower()
    code, out, err = _cli(capsys, "predict", d / "a_lesion.jpg", "--format", "csv", *base)
    assert out.startswith("image,status,") and code in (0, 3), out  # 0 unless the OOD score refuses it
