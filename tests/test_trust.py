"""Trust parameters: fit on validation, store in trust.json, apply and evaluate elsewhere (synthetic scores)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax

from lesionlab.config import TrustConfig
from lesionlab.evaluation import trust as tr
from lesionlab.evaluation.calibration import calibrate_probs, ece
from lesionlab.exceptions import UserError


def _overconfident(n: int, seed: int):
    """Probabilities of a model whose logits are 2.5x too large, and labels drawn from the honest ones."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, size=(n, 7))
    honest = softmax(z, axis=1)
    y = np.minimum((rng.random(n)[:, None] > np.cumsum(honest, 1)).sum(1), 6)
    return softmax(2.5 * z, axis=1), y


def test_fit_apply_and_evaluate(tmp_path):
    pv, yv = _overconfident(1500, 0)
    pt, yt = _overconfident(1500, 1)
    cfg = TrustConfig()
    trust = tr.fit_trust(yv, {"a": pv, "ensemble": np.sqrt(pv) / np.sqrt(pv).sum(1, keepdims=True)}, cfg)
    assert trust["models"]["a"]["temperature"] == pytest.approx(2.5, rel=0.1)
    tr.write_trust(tmp_path / tr.TRUST_FILE, trust)
    back = tr.read_trust(tmp_path / tr.TRUST_FILE)
    assert back == json.loads(json.dumps(trust))
    cal, sets = tr.apply_trust(back, "a", pt)
    np.testing.assert_allclose(cal, calibrate_probs(pt, trust["models"]["a"]["temperature"]))
    assert ece(yt, cal) < ece(yt, pt)
    assert sets.shape == pt.shape and sets.dtype == bool
    res = tr.evaluate_trust(yt, pt, back, "a", groups=np.arange(len(yt)) // 3, n_boot=50)
    c, s = res["calibration"], res["conformal"]
    assert c["after"]["ece"]["value"] < 0.05 < c["before"]["ece"]["value"]
    assert abs(s["coverage"]["value"] - 0.9) < 0.04 and s["mondrian"] is True
    assert min(v["coverage"]["value"] for v in s["per_class"].values()) > 0.8
    assert len(c["reliability"]["after"]["count"]) == 15
    rows = tr.trust_table({"a": res})
    assert rows[0]["ece_after"] < rows[0]["ece_before"] and rows[0]["MEL_coverage"] is not None
    variants = tr.compare_conformal(yv, pv, yt, pt, temperature=trust["models"]["a"]["temperature"])
    assert {(r["method"], r["mondrian"]) for r in variants} == {(m, b) for m in ("lac", "aps", "raps") for b in (0, 1)}
    json.dumps(res)


def test_calibration_off_keeps_probabilities():
    pv, yv = _overconfident(300, 2)
    trust = tr.fit_trust(yv, {"a": pv}, TrustConfig(calibration=False, method="aps", mondrian=False))
    assert trust["models"]["a"]["temperature"] == 1.0
    cal, sets = tr.apply_trust(trust, "a", pv)
    np.testing.assert_allclose(cal, pv, atol=1e-12)
    assert sets.sum(1).min() >= 1  # APS never returns an empty set


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        tr.read_trust(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="models"):
        tr.read_trust(tmp_path / "bad.json")
    pv, yv = _overconfident(100, 3)
    with pytest.raises(UserError, match="no model 'b'"):
        tr.model_trust(tr.fit_trust(yv, {"a": pv}, TrustConfig()), "b")
    with pytest.raises(UserError, match="unknown conformal method"):
        tr.fit_trust(yv, {"a": pv}, TrustConfig(method="xyz"))


@pytest.mark.realdata
def test_trust_acceptance_on_the_real_study():
    """Issue 10's acceptance on the project's real-data study (benchmarks/trust_realdata.py; docs/trust-ham10000.md).

    LESIONLAB_TRUST_STUDY names the study folder (default ~/lesionlab-runs/ham10000-cpu); predictions made here are
    cached in LESIONLAB_TRUST_OUT (default ~/lesionlab-runs/trust-ham10000).
    """
    import os
    import sys
    from pathlib import Path

    study = Path(os.environ.get("LESIONLAB_TRUST_STUDY", "~/lesionlab-runs/ham10000-cpu")).expanduser()
    if not (study / "splits.csv").exists():
        pytest.skip(f"no real-data study at {study} (set LESIONLAB_TRUST_STUDY)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import trust_realdata

    from lesionlab.study_folder import StudyFolder

    models = trust_realdata.trained_models(StudyFolder(study))
    unfinished = [m["name"] for m in models if not m["finished"]]
    assert models, f"{study}: no trained model yet"
    assert not unfinished, f"{study}: training not finished for {unfinished}; the acceptance is for finished models"
    out = Path(os.environ.get("LESIONLAB_TRUST_OUT", "~/lesionlab-runs/trust-ham10000")).expanduser()
    s = trust_realdata.run(study, out, n_boot=200)
    acc = s["acceptance"]
    print(json.dumps({"models": list(s["models"]), **acc}, indent=1))
    assert acc["ece_after"] <= 0.05
    assert acc["ece_after"] < acc["ece_before"]
    assert abs(acc["coverage"] - 0.90) <= 0.03
    assert acc["mel_coverage"] >= 0.87


TINY_STUDY = ["synth_images=56", "synth_sources=1", "synth_size=[48,36]", "data.image_size=32", "train.epochs=1",
              "train.max_steps_per_epoch=2", "eval.bootstrap=10", "train.precision=fp32", "data.batch_size=16",
              "data.num_workers=0", "train.archs=[timm:resnet10t,timm:resnet14t]", "explain.gallery=false"]


def test_study_fits_trust_on_validation_and_reports_it(tmp_path):
    """The study's trust step, the calibration/conformal entries of metrics.json and the report's Trust section;
    a changed trust setting re-runs trust and metrics, not training."""
    from lesionlab.config import load_config
    from lesionlab.workflows import study

    out = tmp_path / "study"
    study.run_study(load_config("demo", TINY_STUDY), out, progress=False)
    trust = tr.read_trust(out / tr.TRUST_FILE)
    assert set(trust["models"]) == {"timm:resnet10t", "timm:resnet14t", "ensemble"}
    assert trust["config"]["method"] == "lac" and trust["models"]["ensemble"]["conformal"]["mondrian"]
    for stem in ("timm_resnet10t", "ensemble"):
        m = json.loads((out / "eval" / stem / "metrics.json").read_text())
        c, s = m["calibration"], m["conformal"]
        assert c["temperature"] > 0 and {"ece", "classwise_ece", "brier", "nll"} <= set(c["after"])
        assert c["after"]["ece"]["lo"] is not None  # lesion-bootstrap CIs
        assert 0 <= s["coverage"]["value"] <= 1 and "MEL" in s["per_class"] and len(m["conformal_variants"]) == 6
        assert (out / "eval" / stem / "reliability.png").exists()
    md = (out / "report.md").read_text()
    assert "Trust: calibrated probabilities and prediction sets" in md and "ECE after" in md and "melanoma coverage" in md  # flag metric named by the label set
    ood = json.loads((out / "ood" / "ood.json").read_text())  # the OOD step: scores in / out and their histogram
    assert 0 <= ood["test_refused"] <= 1 and (out / "ood" / "ood_scores.png").exists()
    assert "Refusal of unevaluable images" in md and "ood/ood_scores.png" in md
    study.run_study(load_config("demo", [*TINY_STUDY, "trust.method=aps"]), out, progress=False)
    st = {k: v.get("status") for k, v in json.loads((out / "steps.json").read_text()).items()}
    assert st["trust"] == "ran" and st["metrics"] == "ran"
    assert st["train timm:resnet10t"] == "reused" and st["infer timm:resnet10t"] == "reused"
    assert tr.read_trust(out / tr.TRUST_FILE)["models"]["ensemble"]["conformal"]["method"] == "aps"
