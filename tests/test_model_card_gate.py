"""The model card describes the whole refusal gate: quality checks, the OOD score and the error-targeting refusal
(`likely_wrong`, trust.error_refusal_rate, fitted on validation), with its refusal rate and the accuracy of accepted
vs refused images where they were measured (the fit's validation summary a bundle records; the study's test refusals)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_model_card import ARCHS, _base_study, _evaluated, _validate

from lesionlab.report import model_card as mc
from lesionlab.report.model_card_facts import ERROR_CODE, OOD_CODE, build_card
from lesionlab.study_folder import StudyFolder


def test_card_codes_are_the_pipelines():
    from lesionlab.clinic import screening

    assert (OOD_CODE, ERROR_CODE) == (screening.OOD_CODE, screening.ERROR_CODE)


@pytest.fixture(scope="module")
def gated_study(tmp_path_factory):
    """A study folder (test_model_card's, with real metrics and trust) whose ood/ood.json comes from the screening
    tables of a pipeline with the error gate: 3 of the test images refused as likely wrong."""
    from lesionlab.io import atomic_write_json
    from lesionlab.workflows.refusal import refusal_summary

    sf = _evaluated(_base_study(tmp_path_factory.mktemp("card_gate")))
    n = int(json.loads(sf.ood_summary_file.read_text())["test_images"])
    rng = np.random.default_rng(1)
    err = [False] * (n - 3) + [True] * 3
    test = pd.DataFrame({"ood_score": rng.normal(0, 1, n), "refused": err, "quality": [""] * n,
                         "ood_refused": [False] * n, "error_refused": err})
    noise = pd.DataFrame({"ood_score": rng.normal(4, 1, 10), "refused": [True] * 10, "quality": [""] * 10,
                          "ood_refused": [True] * 10, "error_refused": [False] * 10})
    atomic_write_json(sf.ood_summary_file, refusal_summary(test, {"noise": noise}, 2.0, 0.05))
    return sf.root, n


def test_study_card_describes_every_stage_of_the_gate(gated_study):
    root, n = gated_study
    card = build_card(root)
    d = json.loads(mc.card_json(card))
    _validate(d)
    r = d["refusal"]
    assert [g["codes"] for g in r["gate"]][1:] == [["out_of_distribution"], ["likely_wrong"]]
    assert "blurred" in r["gate"][0]["codes"] and all(g["on"] for g in r["gate"])
    assert r["gate"][1]["threshold"] == 2.0
    e = r["error_refusal"]
    assert e["status"] == "reported" and e["code"] == "likely_wrong" and e["configured_rate"] == 0.1
    assert "validation split" in e["rule"] and "wrong top-1 answer" in e["rule"]
    assert r["test_refused_by_error"] == e["test"]["refusal_rate"] == round(3 / n, 4)
    # the study alone does not record the fitted score's validation refusals; the card says so instead of guessing
    assert e["validation"] is None and "bundles made from this study" in e["note"]
    assert e["test"]["accuracy"] is None and "not recorded" in e["test"]["note"]
    md = mc.card_markdown(card)
    for text in ("## Refusals: the gate (quality, out-of-distribution, likely wrong)", "likely_wrong",
                 "out_of_distribution", "trust.error_refusal_rate 0.1", "as likely wrong",
                 f"{100 * 3 / n:.1f}%"):
        assert text in md, text
    assert "likely_wrong" in mc.card_html(card)


def test_bundle_card_gives_the_error_refusals_accuracy_accepted_vs_refused(gated_study):
    """With the manifest a bundle of this study holds (its error score fitted by the same function the bundle builder
    calls), the card carries the validation refusal rate and accuracy of all, accepted and refused images."""
    from lesionlab.clinic.trust import fit_error_refusal
    from lesionlab.models import file_stem

    root, _ = gated_study
    sf = StudyFolder(root)
    err = fit_error_refusal(sf, ARCHS, sf.trust(), None, sf.config().trust)
    v = err["info"]["validation"]
    assert v["n_refused"] > 0 and v["accuracy_refused"] is not None
    manifest = {"members": [{"name": file_stem(a)} for a in ARCHS], "format_version": 1, "error_refusal": err,
                "melanoma_threshold": {"value": 0.3, "source": "given"}, "inference": {}, "ood": None}
    card = build_card(root, manifest, bundle_path="bundle")
    d = json.loads(mc.card_json(card))
    _validate(d)
    e = d["refusal"]["error_refusal"]
    assert e["validation"] == {k: (round(x, 4) if isinstance(x, float) else x) for k, x in v.items()}
    assert e["threshold"] == round(err["threshold"], 4) and e["fitted_on"].startswith("validation split of")
    assert e["signals"] == ["the calibrated confidence (1 - top probability)", "the conformal set size"]
    assert "without the OOD score" in e["note"]  # fitted without OOD scores, and the card says it
    md = mc.card_markdown(card)
    triple = " / ".join(mc._num(round(v[k], 4)) for k in ("accuracy_all", "accuracy_accepted", "accuracy_refused"))
    assert triple in md and f"{100 * v['refusal_rate']:.1f}%" in md


def test_error_refusal_off_is_said_and_named_a_limitation(gated_study, tmp_path):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(gated_study[0], root)
    sf = StudyFolder(root)
    cfg = sf.config()
    cfg.trust.error_refusal_rate = 0.0
    sf.write_config(cfg)
    card = build_card(root)
    e = card.refusal["error_refusal"]
    assert e["status"] == "not run" and "error_refusal_rate is 0" in e["reason"]
    assert not card.refusal["gate"][2]["on"]
    assert any("No error-targeting (likely_wrong) refusal" in x for x in card.limitations)
    assert "Error-targeting refusal (likely_wrong): off." in mc.card_markdown(card)


def test_a_study_that_fitted_no_error_score_is_not_said_to_refuse_likely_wrong_images():
    """ood.json from this LesionLab records the fitted score beside test accuracy; with the accuracy and no score
    the card says the stage did not run, not "on"; an older ood.json (no test accuracy) keeps the stage reported."""
    from lesionlab.config import load_config
    from lesionlab.report.model_card import NOT_RUN, REPORTED
    from lesionlab.report.model_card_facts import _error_refusal

    cfg = load_config("demo")
    assert cfg.trust.error_refusal_rate > 0
    new = {"test_refused_by_error": 0.0, "test_images": 10, "test_accuracy": {"n": 10, "n_refused": 0}}
    e = _error_refusal(cfg, new, None)
    assert e["status"] == NOT_RUN and "fitted no error score" in e["reason"]
    old = {"test_refused_by_error": 0.0, "test_images": 10}
    assert _error_refusal(cfg, old, None)["status"] == REPORTED
