"""A demo-sized study end to end, and the evaluation commands on its files."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lesionlab.cli import main
from lesionlab.config import load_config
from lesionlab.labels import CLASSES
from lesionlab.workflows import study


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg = load_config("demo", ["synth_images=90", "synth_sources=1", "synth_size=[80,60]", "data.image_size=32", "train.epochs=1",
                               "eval.bootstrap=20", "train.precision=fp32", "data.batch_size=16",
                               # the robustness step's own tests cover every perturbation; here two keep it cheap
                               "robustness.perturbations=[brightness,rotation]", "robustness.max_levels=1"])
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
    # the demo config's simulated reader study: its section, labelled SIMULATED, with MRMC results and figures
    assert "Reader study (SIMULATED readers)" in md and "SIMULATED READERS" in md and "Obuchowski" in md
    summary = json.loads((out / "reader_study" / "summary.json").read_text())
    assert summary["simulated"] is True and (out / "reader_study" / "reader_study.md").exists()
    assert (out / "errors" / "agreement.csv").exists() and (out / "splits.csv").exists()
    # what each model ran at is recorded, for bundles made later elsewhere
    from lesionlab.io import sha256_file

    rec = json.loads((out / "predictions" / "resnet101_inference.json").read_text())
    weights = out / "runs" / "resnet101" / "model.safetensors"
    assert rec == {"precision": "fp32", "device": "cpu", "tta": False, "engine": "torch",
                   "weights_sha256": sha256_file(weights), "weights_file": str(weights.resolve())}
    # The steps that measure the study's named limits reach the report with their files.
    for section in ("Robustness: acquisition and lesion consistency", "Subgroup performance",
                    "Trust: calibrated probabilities and prediction sets"):
        assert f"## {section}" in md
    rob = pd.read_csv(out / "robustness" / "robustness.csv")
    assert {"brightness", "rotation", "none"} <= set(rob["perturbation"]) and "ensemble" in set(rob["model"])
    cons = pd.read_csv(out / "consistency" / "lesion_consistency.csv")
    assert "ensemble" in set(cons["model"]) and (cons["consistent_share"].between(0, 1)).all()
    lm = pd.read_csv(out / "consistency" / "lesion_metrics.csv")
    assert set(lm["level"]) == {"image", "lesion"}
    sub = pd.read_csv(out / "subgroups" / "subgroups.csv")
    assert {"sex", "age_band"} <= set(sub["column"]) and (sub["n_images"] > 0).all()
    ens = pd.read_csv(out / "predictions" / "ensemble_test.csv")
    members = [pd.read_csv(out / "predictions" / f"{n}_test.csv") for n in ("resnet101", "resnext101_32x4d", "seresnet101", "seresnext101_32x4d")]
    assert np.allclose(ens[list(CLASSES)].to_numpy(), np.mean([m[list(CLASSES)].to_numpy() for m in members], axis=0), atol=2e-6)


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


# ----------------------------------------------------------------------------- fingerprinted steps (Steps unit tests)


def _steps_status(out):
    return {k: (v["status"], v["reason"]) for k, v in json.loads((out / "steps.json").read_text()).items()}


def test_steps_reasons_name_what_changed(tmp_path, monkeypatch):
    from lesionlab.workflows import steps

    out = tmp_path / "s"
    out.mkdir()
    src = tmp_path / "table.csv"
    src.write_text("a,b\n1,2\n")
    calls = []

    def flow(lr=0.1, ci=0.95, text="x", version="1", code="1"):
        # as if the source of lesionlab.labels (which step a runs) were at revision `code`
        monkeypatch.setattr(steps, "code_digest", lambda name: f"{name}@{code}")
        st = steps.Steps(out, version=version)
        st.run("a", lambda: (calls.append("a"), (out / "a.txt").write_text(text)), config={"train": {"lr": lr}},
               inputs=[src], outputs=[out / "a.txt"], code=("lesionlab.labels",))
        st.run("b", lambda: (calls.append("b"), (out / "b.txt").write_text("b")), config={"eval": {"ci": ci}},
               upstream=["a"], outputs=[out / "b.txt"], code=("lesionlab.evaluation",))
        return {k: (v["status"], v["reason"]) for k, v in json.loads((out / "steps.json").read_text()).items()}

    assert flow() == {"a": ("ran", "new"), "b": ("ran", "new")}
    assert flow() == {"a": ("reused", "unchanged"), "b": ("reused", "unchanged")}
    assert flow(lr=0.2) == {"a": ("ran", "config changed: train.lr"), "b": ("ran", "upstream changed: a")}
    assert flow(lr=0.2, ci=0.9) == {"a": ("reused", "unchanged"), "b": ("ran", "config changed: eval.ci")}
    src.write_text("a,b\n1,3\n")
    assert flow(lr=0.2, ci=0.9)["a"] == ("ran", f"input changed: {src}")
    (out / "a.txt").unlink()
    # same fingerprint, but a re-ran upstream step makes its downstream run again
    assert flow(lr=0.2, ci=0.9) == {"a": ("ran", "outputs missing: a.txt"), "b": ("ran", "upstream re-ran: a")}
    # the code a step runs is fingerprinted, per package; the version ("0.1.0" on every commit) is only recorded
    assert flow(lr=0.2, ci=0.9, version="2") == {"a": ("reused", "unchanged"), "b": ("reused", "unchanged")}
    assert flow(lr=0.2, ci=0.9, code="2") == {"a": ("ran", "code changed: lesionlab.labels"),
                                              "b": ("ran", "code changed: lesionlab.evaluation; upstream changed: a")}
    rec = json.loads((out / "steps.json").read_text())["a"]
    assert rec["config"] == {"train.lr": 0.2} and len(rec["fingerprint"]) == 64 and rec["seconds"] >= 0
    assert rec["code"] == {"lesionlab.labels": "lesionlab.labels@2"} and rec["version"] == "1"
    assert calls.count("a") == 5 and calls.count("b") == 6


def test_code_digest_hashes_the_source_of_a_package_or_module():
    from lesionlab.workflows.steps import code_digest

    assert len(code_digest("lesionlab.evaluation")) == 64
    assert code_digest("lesionlab.evaluation") != code_digest("lesionlab.evaluation.metrics")
    with pytest.raises(ValueError, match="not an importable"):
        code_digest("lesionlab.no_such_module")


def test_steps_from_before_code_fingerprints_run_once_more_from_scratch(tmp_path):
    """A record without a code hash was made by code of unknown content: even a resumable step starts over."""
    from lesionlab.workflows.steps import STEPS_FILE, Steps

    out = tmp_path / "s"
    (out / "run").mkdir(parents=True)
    (out / "run" / "last.pt").write_text("old")
    Steps(out).run("train", lambda: None, config={"lr": 1}, outputs=[out / "run"], resumable=True,
                   code=("lesionlab.labels",))
    rec = json.loads((out / STEPS_FILE).read_text())
    for r in rec.values():
        del r["code"]  # as an older LesionLab wrote it
    (out / STEPS_FILE).write_text(json.dumps(rec))
    seen = []
    Steps(out).run("train", lambda: seen.append((out / "run").exists()), config={"lr": 1}, outputs=[out / "run"],
                   resumable=True, code=("lesionlab.labels",))
    assert seen == [False]
    assert _steps_status(out)["train"] == ("ran", "new (steps.json from an older LesionLab has no code fingerprint)")


def test_steps_continuable_key_keeps_outputs_other_changes_do_not(tmp_path):
    from lesionlab.workflows.steps import Steps

    out = tmp_path / "s"
    seen = []

    def train(epochs, lr=1):
        Steps(out).run("train", lambda: (seen.append((out / "run").exists()), (out / "run").mkdir(exist_ok=True)),
                       config={"train": {"epochs": epochs, "lr": lr}}, outputs=[out / "run"], resumable=True,
                       continuable=("train.epochs",))
        return _steps_status(out)["train"]

    out.mkdir()
    assert train(1) == ("ran", "new") and seen == [False]
    assert train(2) == ("ran", "config changed: train.epochs") and seen == [False, True]  # continued
    assert train(3, lr=2) == ("ran", "config changed: train.epochs, train.lr") and seen == [False, True, False]


def test_steps_unfinished_step_reruns_and_resumable_keeps_outputs(tmp_path):
    from lesionlab.workflows.steps import Steps

    out = tmp_path / "s"
    (out / "run").mkdir(parents=True)
    (out / "run" / "partial.pt").write_text("epoch 1")

    def crash():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Steps(out).run("train", crash, outputs=[out / "run"], resumable=True)
    assert json.loads((out / "steps.json").read_text())["train"]["status"] == "running"
    seen = []
    Steps(out).run("train", lambda: seen.append((out / "run" / "partial.pt").exists()), outputs=[out / "run"],
                   resumable=True)
    assert seen == [True] and _steps_status(out)["train"] == ("ran", "did not finish")
    # a changed config is not resumed: the old outputs go first
    Steps(out).run("train", lambda: (seen.append((out / "run" / "partial.pt").exists()), (out / "run").mkdir()),
                   config={"lr": 1}, outputs=[out / "run"], resumable=True)
    assert seen == [True, False] and _steps_status(out)["train"] == ("ran", "config changed: lr")
    # a check can veto reuse
    Steps(out).run("train", lambda: (out / "run").mkdir(), config={"lr": 1}, outputs=[out / "run"],
                   check=lambda: "run folder trained with another config: train.lr")
    assert _steps_status(out)["train"] == ("ran", "run folder trained with another config: train.lr")


def test_steps_refuse_outputs_outside_the_study_and_fresh_deletes_only_the_study(tmp_path):
    from lesionlab.workflows.steps import Steps
    from lesionlab.workflows.study import reset_study

    out = tmp_path / "s"
    out.mkdir()
    with pytest.raises(ValueError, match="not inside the study folder"):
        Steps(out).run("x", lambda: None, outputs=[tmp_path / "elsewhere.txt"])
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "runs").mkdir()  # a folder named like a study output, in a folder the study never wrote
    assert reset_study(mine) == [] and (mine / "runs").exists()
    st = Steps(out)
    st.run("w", lambda: (out / "w").mkdir(), outputs=[out / "w"])
    (out / "users_file.txt").write_text("keep me")
    (out / "runs").mkdir()
    removed = reset_study(out)
    assert set(removed) == {"w", "runs", "steps.json"} and (out / "users_file.txt").exists()


def test_steps_prune_removes_steps_no_longer_in_the_study(tmp_path):
    from lesionlab.workflows.steps import Steps

    out = tmp_path / "s"
    out.mkdir()
    st = Steps(out)
    for n in ("a", "b"):
        st.run(f"train {n}", lambda n=n: (out / n).mkdir(), outputs=[out / n])
    st.prune()
    st = Steps(out)
    st.run("train a", lambda: None, outputs=[out / "a"])
    assert st.prune() == ["train b"]
    assert (out / "a").exists() and not (out / "b").exists()
    assert list(json.loads((out / "steps.json").read_text())) == ["train a"]


# ----------------------------------------------------------------------------- fingerprinted steps, end to end


TINY = ["synth_images=56", "synth_sources=1", "synth_size=[48,36]", "data.image_size=32", "train.epochs=1", "train.max_steps_per_epoch=2",
        "eval.bootstrap=10", "train.precision=fp32", "data.batch_size=16", "data.num_workers=0"]
TWO = ["train.archs=[timm:resnet10t,timm:resnet14t]", "explain.gallery=false"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Two tiny models (so there is an ensemble), one epoch of two steps, no gallery."""
    out = tmp_path_factory.mktemp("tiny") / "study"
    study.run_study(load_config("demo", TINY + TWO), out, progress=False)
    return out


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "study"
    shutil.copytree(src, dst)  # copy2: modification times are kept
    return dst


def _weights_mtimes(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted((out / "runs").glob("*/model.safetensors"))}


def test_rerun_unchanged_reuses_every_step(tiny_study, tmp_path, caplog):
    out = _copy(tiny_study, tmp_path)
    before = _weights_mtimes(out)
    assert len(before) == 2
    with caplog.at_level("INFO", logger="lesionlab.workflows.study"):
        study.run_study(load_config("demo", TINY + TWO), out, progress=False)
    assert "no longer part of this study" not in caplog.text  # the report step was "removed" on every rerun
    st = _steps_status(out)
    assert {k: v for k, v in st.items() if k != "report"} == {k: ("reused", "unchanged") for k in st if k != "report"}
    assert {"train timm:resnet10t", "infer timm:resnet14t", "ensemble", "metrics", "errors"} <= set(st)
    assert _weights_mtimes(out) == before
    # the synthetic images given back as --data are the same input: nothing re-runs, and they are not removed
    study.run_study(load_config("demo", TINY + TWO), out, data=out / "data", progress=False)
    st = _steps_status(out)
    assert "synth" not in st and all(v == ("reused", "unchanged") for k, v in st.items() if k != "report")
    assert (out / "data" / "HAM10000_metadata.csv").exists() and _weights_mtimes(out) == before


def test_changed_lr_retrains_and_recomputes_downstream(tiny_study, tmp_path):
    out = _copy(tiny_study, tmp_path)
    before = _weights_mtimes(out)
    metrics_before = (out / "eval" / "ensemble" / "metrics.json").stat().st_mtime_ns
    study.run_study(load_config("demo", [*TINY, *TWO, "train.lr=0.0037"]), out, progress=False)
    st = _steps_status(out)
    for arch in ("timm:resnet10t", "timm:resnet14t"):
        assert st[f"train {arch}"] == ("ran", "config changed: train.lr")
        assert st[f"infer {arch}"] == ("ran", f"upstream changed: train {arch}")
        meta = json.loads((out / "runs" / arch.replace(":", "_") / "model.json").read_text())
        assert meta["config"]["train"]["lr"] == 0.0037
    for s in ("ensemble", "metrics", "errors"):
        assert st[s][0] == "ran" and st[s][1].startswith("upstream changed")
    for s in ("synth", "validate", "split", "truth"):
        assert st[s] == ("reused", "unchanged")
    after = _weights_mtimes(out)
    assert all(after[k] != before[k] for k in before)
    assert (out / "eval" / "ensemble" / "metrics.json").stat().st_mtime_ns != metrics_before
    md = (out / "report.md").read_text()
    assert "lr: 0.0037" in md and "config changed: train.lr" in md


def test_changed_bootstrap_reruns_metrics_not_training(tiny_study, tmp_path):
    out = _copy(tiny_study, tmp_path)
    before = _weights_mtimes(out)
    study.run_study(load_config("demo", [*TINY, *TWO, "eval.bootstrap=12"]), out, progress=False)
    st = _steps_status(out)
    assert st["metrics"] == ("ran", "config changed: eval.bootstrap")
    assert st["errors"] == ("ran", "upstream changed: metrics")
    assert all(v == ("reused", "unchanged") for k, v in st.items() if k.startswith(("train", "infer", "split")))
    assert _weights_mtimes(out) == before
    assert "(12 resamples)" in (out / "report.md").read_text()


def test_train_step_detects_a_run_folder_trained_with_another_config(tiny_study, tmp_path):
    from lesionlab.io import sha256_file
    from lesionlab.training.provenance import run_folder_mismatch

    out = _copy(tiny_study, tmp_path)
    cfg = load_config("demo", TINY + TWO)
    run = out / "runs" / "timm_resnet10t"
    split_hash = sha256_file(out / "splits.csv")
    assert run_folder_mismatch(run, "timm:resnet10t", cfg, split_hash) is None
    assert run_folder_mismatch(run, "timm:resnet10t", cfg, "0" * 64) == "run folder trained on another split (split SHA-256 differs)"
    meta = json.loads((run / "model.json").read_text())
    meta["config"]["train"]["lr"] = 0.5  # as if `lesionlab train --out STUDY/runs` wrote another config there
    meta["config"]["data"]["num_workers"] = 3  # workers cannot change a model: not a reason
    (run / "model.json").write_text(json.dumps(meta))
    assert run_folder_mismatch(run, "timm:resnet10t", cfg, split_hash) == "run folder trained with another config: train.lr"


def test_changed_code_reruns_the_steps_that_run_it_not_training(tiny_study, tmp_path, monkeypatch):
    """Issue 16.7: a fix to the metrics code (same version number) re-runs the metrics, and only what reads them."""
    from lesionlab.workflows import steps

    out = _copy(tiny_study, tmp_path)
    before = _weights_mtimes(out)
    real = steps.code_digest
    monkeypatch.setattr(steps, "code_digest", lambda name: "fixed" if name == "lesionlab.evaluation" else real(name))
    study.run_study(load_config("demo", TINY + TWO), out, progress=False)
    st = _steps_status(out)
    assert st["metrics"] == ("ran", "code changed: lesionlab.evaluation")
    assert all(v == ("reused", "unchanged") for k, v in st.items()
               if k.startswith(("train", "infer", "split", "validate", "truth", "ensemble", "trust", "robustness", "ood")))
    assert _weights_mtimes(out) == before
    assert json.loads((out / "steps.json").read_text())["metrics"]["code"]["lesionlab.evaluation"] == "fixed"


def test_more_epochs_continue_training_fewer_start_over_as_train_resume_decides(tiny_study, tmp_path, caplog):
    """Issue 16.8: one rule for the study and `train --resume`. Before, the study retrained from scratch on any change of
    train.epochs while a resume accepted any (fewer epochs: silently the longer run). Now more epochs continue the run
    in both, and fewer than were run is refused by both."""
    from lesionlab.exceptions import UserError
    from lesionlab.io import sha256_file
    from lesionlab.training.fit import check_resume
    from lesionlab.training.provenance import run_folder_mismatch

    out = _copy(tiny_study, tmp_path)
    run = out / "runs" / "timm_resnet10t"
    first = pd.read_csv(run / "history.csv")
    # one model (the other is pruned), no robustness or OOD step: seconds
    cheap = [*TINY, "train.archs=[timm:resnet10t]", "explain.gallery=false", "robustness.enabled=false", "ood.method=none"]
    study.run_study(load_config("demo", [*cheap, "train.epochs=2"]), out, progress=False)
    st = _steps_status(out)
    assert st["train timm:resnet10t"] == ("ran", "config changed: train.epochs")
    hist = pd.read_csv(run / "history.csv")
    assert len(hist) == 2 and hist.iloc[:1].equals(first)  # epoch 1 kept: continued, not trained again
    fewer = load_config("demo", cheap)  # train.epochs=1 < the 2 epochs run
    split_hash = sha256_file(out / "splits.csv")
    assert run_folder_mismatch(run, "timm:resnet10t", fewer, split_hash) == (
        "run folder trained with another config: train.epochs")
    with pytest.raises(UserError, match="train.epochs 1 < 2 epochs already run"):
        check_resume(run / "last.pt", "timm:resnet10t", fewer, split_hash)
    with caplog.at_level("INFO", logger="lesionlab.workflows.study"):
        study.run_study(fewer, out, progress=False)
    assert "train timm:resnet10t: run folder trained with another config: train.epochs; starting over" in caplog.text
    assert len(pd.read_csv(run / "history.csv")) == 1


def test_single_model_study_reaches_its_report_and_fresh_reruns_everything(tmp_path):
    out = tmp_path / "one"
    args = ["study", "--config", "demo", "--out", str(out), *(x for o in [*TINY, "train.archs=[timm:resnet10t]",
                                                                          "explain.per_category=1"] for x in ("--set", o))]
    assert main(args) == 0
    md = (out / "report.md").read_text()
    assert "One model (timm:resnet10t): there is no ensemble row" in md and "no model-agreement table" in md
    assert "ensemble: per-class metrics" not in md and not (out / "predictions" / "ensemble_test.csv").exists()
    assert pd.read_csv(out / "errors" / "agreement.csv").empty
    assert "Grad-CAM gallery" in md and json.loads((out / "gallery" / "gallery.json").read_text())
    (out / "my_notes.txt").write_text("not the study's")
    mtime = (out / "runs" / "timm_resnet10t" / "model.safetensors").stat().st_mtime_ns
    # an external set with absent classes (only NV and MEL, like PH2), made from the study's own synthetic images
    sp = pd.read_csv(out / "splits.csv")
    ext = pd.concat([sp[sp["label"] == c].head(3) for c in ("MEL", "NV")])
    pd.DataFrame({"image": ext["image_id"], **{c: (ext["label"] == c).astype(float) for c in CLASSES}}).to_csv(
        tmp_path / "gt.csv", index=False)
    assert main([*args, "--fresh", "--external", f"nvmel={out / 'data'},{tmp_path / 'gt.csv'}"]) == 0
    st = _steps_status(out)
    assert all(v == ("ran", "new") for k, v in st.items() if k != "report") and "external nvmel" in st
    assert (out / "runs" / "timm_resnet10t" / "model.safetensors").stat().st_mtime_ns != mtime
    assert (out / "my_notes.txt").exists()
    summary = json.loads((out / "external" / "nvmel" / "summary.json").read_text())
    assert list(summary["models"]) == ["timm:resnet10t"] and summary["classes_absent"] == ["BCC", "AKIEC", "BKL", "DF", "VASC"]
    md = (out / "report.md").read_text()
    assert "External validation" in md and "BCC, AKIEC, BKL, DF, VASC" in md


_HOLD = """
import sys, time
from pathlib import Path
from lesionlab.workflows.steps import folder_lock
with folder_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_study_into_a_running_study_folder_stops_in_one_line(tmp_path, capsys):
    """Issue 16.9: the folder is locked while a study runs in it; a lock left by a killed process does not block."""
    import os
    import signal

    from lesionlab.exceptions import UserError
    from lesionlab.workflows.steps import LOCK_FILE, folder_lock

    out = tmp_path / "s"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["study", "--config", "demo", "--out", str(out), "--set", "train.archs=[timm:resnet10t]"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{out} is in use by another `lesionlab study` (pid {holder.pid} on " in err
        assert err.endswith("; wait for it or use another --out")
        assert main([*args, "--fresh"]) == 2 and (out / LOCK_FILE).exists()  # --fresh deletes nothing while locked
        assert not (out / "steps.json").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by the killed process
    with folder_lock(out):  # ... and no obstacle
        with pytest.raises(UserError, match="in use by another"):
            with folder_lock(out):  # a second open file in one process conflicts too
                pass
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_study_refuses_an_architecture_given_twice(tmp_path, capsys):
    r = main(["study", "--config", "demo", "--out", str(tmp_path / "x"), "--set", "train.archs=[timm:resnet10t,timm:resnet10t]"])
    err = capsys.readouterr().err
    assert r == 2 and "lists timm:resnet10t twice" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
