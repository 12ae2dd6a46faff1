"""A demo-sized study end to end, and the evaluation commands on its files."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lesionlab import study
from lesionlab.cli import main
from lesionlab.config import load_config
from lesionlab.labels import CLASSES


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg = load_config("demo", ["synth_images=90", "synth_size=[80,60]", "data.image_size=32", "train.epochs=1",
                               "eval.bootstrap=20", "train.precision=fp32", "data.batch_size=16"])
    html = study.run_study(cfg, out, progress=False)
    return out, html


def test_study_report_has_all_models_and_the_ensemble(small_study):
    out, html = small_study
    text = html.read_text()
    md = (out / "report.md").read_text()
    for name in ("resnet101", "resnext101_32x4d", "seresnet101", "seresnext101_32x4d", "ensemble"):
        assert f"{name}: per-class metrics" in md
        m = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert m["classes"] == list(CLASSES) and len(m["confusion"]) == 7
        for f in ("metrics.csv", "confusion_counts.png", "confusion_normalized.png", "roc.png"):
            assert (out / "eval" / name / f).exists()
    assert "data:image/png;base64," in text and "Decision support, not a diagnosis" in text
    for section in ("Melanoma operating points", "Error analysis", "Grad-CAM gallery", "Reproducibility", "paper: ResNeXt-101"):
        assert section in md
    assert (out / "errors" / "agreement.csv").exists() and (out / "splits.csv").exists()
    ens = pd.read_csv(out / "predictions" / "ensemble_test.csv")
    members = [pd.read_csv(out / "predictions" / f"{n}_test.csv") for n in ("resnet101", "resnext101_32x4d", "seresnet101", "seresnext101_32x4d")]
    assert np.allclose(ens[list(CLASSES)].to_numpy(), np.mean([m[list(CLASSES)].to_numpy() for m in members], axis=0), atol=2e-6)


def test_rerun_skips_finished_steps(small_study):
    out, _ = small_study
    before = json.loads((out / "steps.json").read_text())
    cfg = load_config(out / "config.yaml")
    study.run_study(cfg, out, data=out / "data", progress=False)
    after = json.loads((out / "steps.json").read_text())
    assert {k: v for k, v in after.items() if k != "report"} == {k: v for k, v in before.items() if k != "report"}


def test_infer_evaluate_ensemble_commands(small_study, tmp_path, capsys):
    out, _ = small_study
    run = out / "runs" / "resnet101"
    pred = tmp_path / "pred.csv"
    assert main(["infer", "--run", str(run), "--data", str(out / "data"), "--split", str(out / "splits.csv"),
                 "--subset", "test", "--out", str(pred), "--tta", "--precision", "fp32"]) == 0
    p = pd.read_csv(pred)
    assert list(p.columns) == ["image", *CLASSES] and np.allclose(p[list(CLASSES)].sum(axis=1), 1, atol=1e-4)
    truth = tmp_path / "pred_truth.csv"
    assert truth.exists()
    ev = tmp_path / "ev"
    assert main(["evaluate", "--truth", str(truth), "--pred", str(pred), "--out", str(ev), "--lesions",
                 str(out / "splits.csv"), "--bootstrap", "20"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert m["n"] == len(p) and m["ci_resampling"] == "lesions"
    ens = tmp_path / "ens.csv"
    assert main(["ensemble", "--pred", str(pred), str(pred), "--weights", "1", "3", "--out", str(ens)]) == 0
    assert np.allclose(pd.read_csv(ens)[list(CLASSES)], p[list(CLASSES)], atol=2e-6)


def test_evaluate_reports_bad_files_in_one_line(small_study, tmp_path):
    out, _ = small_study
    truth = out / "predictions" / "truth_test.csv"
    pred = pd.read_csv(out / "predictions" / "resnet101_test.csv")
    cases = {
        "missing": pred.iloc[1:],
        "nonnumeric": pred.assign(MEL=["x"] + list(pred["MEL"].iloc[1:])),
    }
    msgs = {"missing": "have no prediction", "nonnumeric": "non-numeric"}
    for name, frame in cases.items():
        f = tmp_path / f"{name}.csv"
        frame.to_csv(f, index=False)
        r = subprocess.run([sys.executable, "-m", "lesionlab.cli", "evaluate", "--truth", str(truth), "--pred", str(f),
                            "--out", str(tmp_path / "o")], capture_output=True, text=True)
        assert r.returncode == 2 and msgs[name] in r.stderr and "Traceback" not in r.stderr
    bad_truth = tmp_path / "bt.csv"
    t = pd.read_csv(truth)
    t.loc[0, "NV"] = 1.0
    t.loc[0, "MEL"] = 1.0
    t.to_csv(bad_truth, index=False)
    r = subprocess.run([sys.executable, "-m", "lesionlab.cli", "evaluate", "--truth", str(bad_truth), "--pred",
                        str(out / "predictions" / "resnet101_test.csv"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "exactly one label" in r.stderr


def test_external_validation_reports_absent_classes(small_study, tmp_path, capsys):
    out, _ = small_study
    # an "external" set with only NV and MEL, like PH2
    sp = pd.read_csv(out / "splits.csv")
    ext = sp[sp["label"].isin(["NV", "MEL"])].head(12)
    gt = pd.DataFrame({"image": ext["image_id"], **{c: (ext["label"] == c).astype(float) for c in CLASSES}})
    gt.to_csv(tmp_path / "gt.csv", index=False)
    assert main(["evaluate-external", "--runs", str(out / "runs"), "--images", str(out / "data"), "--truth",
                 str(tmp_path / "gt.csv"), "--out", str(tmp_path / "ext"), "--set", "eval.bootstrap=0"]) == 0
    s = json.loads((tmp_path / "ext" / "summary.json").read_text())
    assert s["classes_absent"] == ["BCC", "AKIEC", "BKL", "DF", "VASC"] and "ensemble" in s["models"]
    assert "classes absent from this set: BCC" in capsys.readouterr().out


def test_study_report_puts_external_sets_beside_the_internal_test(small_study, tmp_path):
    from lesionlab.config import ExternalSet

    out, _ = small_study
    sp = pd.read_csv(out / "splits.csv")
    ext = pd.concat([sp[sp["label"] == c].head(5) for c in ("MEL", "NV")])
    gt = pd.DataFrame({"image": ext["image_id"], **{c: (ext["label"] == c).astype(float) for c in CLASSES}})
    gt.to_csv(tmp_path / "ph2_like.csv", index=False)
    cfg = load_config(out / "config.yaml")
    cfg.external.append(ExternalSet(name="ph2-like", images=str(out / "data"), truth=str(tmp_path / "ph2_like.csv")))
    study.run_study(cfg, out, data=out / "data", progress=False)
    md = (out / "report.md").read_text()
    assert "External validation" in md and "ph2-like" in md and "internal test" in md
    summary = json.loads((out / "external" / "ph2-like" / "summary.json").read_text())
    assert summary["classes_absent"] == ["BCC", "AKIEC", "BKL", "DF", "VASC"] and summary["n"] == 10
