"""Flag metrics (`MEL_*` keys in every file, whatever the label set) are named after the label set's flag class
wherever people read them: "melanoma AUC" under ham7 / isic2019, "malignant AUC" under binary, a YAML set's own
name for its flag (lesionlab.labels.metric_title, the one place the names come from)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lesionlab import labels
from lesionlab.config import load_config
from lesionlab.evaluation.subgroups import metric_titles, subgroup_table
from lesionlab.report.cross_site import cross_site_markdown, result_label_set
from lesionlab.workflows import study

# the smallest study with every report section the names appear in (no robustness, OOD or gallery: their own tests)
TINY = ["synth_images=56", "synth_sources=1", "synth_size=[96,72]", "data.image_size=32", "train.epochs=1", "train.max_steps_per_epoch=2",
        "eval.bootstrap=10", "train.precision=fp32", "data.batch_size=16", "data.num_workers=0",
        "train.archs=[timm:resnet10t]", "explain.gallery=false", "robustness.enabled=false", "ood.method=none",
        "reader_study.simulate=false", "cross_site.enabled=false"]


def test_metric_title_names_the_flag_of_each_label_set(tmp_path):
    assert labels.HAM7.metric_title("MEL_auc") == "melanoma AUC"
    assert labels.get_label_set("isic2019").metric_title("MEL_sensitivity") == "melanoma sensitivity"
    assert labels.BINARY.metric_title("MEL_auc") == "malignant AUC"
    assert labels.BINARY.metric_title("MEL_coverage") == "malignant coverage"
    assert labels.metric_title("MEL_specificity", "binary") == "malignant specificity"
    assert labels.metric_title("MEL_auc") == "melanoma AUC"  # no label set: ham7
    # plain keys keep their usual titles, whatever the set
    assert labels.BINARY.metric_title("macro_auc") == labels.HAM7.metric_title("macro_auc") == "macro AUC"
    assert labels.BINARY.metric_title("balanced_accuracy") == "balanced accuracy"
    assert labels.HAM7.metric_title("some_new_metric") == "some new metric"
    # robustness deltas and subgroup counts of the flag class
    assert labels.BINARY.metric_title("delta_mel_sensitivity") == "change in malignant sensitivity"
    assert labels.HAM7.metric_title("n_MEL") == "melanoma images"
    # a YAML set: its flag_name, else its flag's display name (first letter lower-cased, acronyms kept)
    f = tmp_path / "nev.yaml"
    f.write_text("classes: [NEV, MEL]\ndisplay: {NEV: Nevus, MEL: Melanoma}\n")
    assert labels.get_label_set(str(f)).metric_title("MEL_auc") == "nevus AUC"
    f.write_text("classes: [SCC, OTHER]\n")
    assert labels.get_label_set(str(f)).metric_title("MEL_auc") == "SCC AUC"
    f.write_text("classes: [MEL, NEV]\nflag_name: melanoma (any stage)\n")
    lset = labels.get_label_set(str(f))
    assert lset.metric_title("MEL_auc") == "melanoma (any stage) AUC"
    assert labels.LabelSet.from_dict(lset.to_dict()) == lset
    # a binary record written before flag_name existed still reads "malignant", not the long display name
    old = {k: v for k, v in labels.BINARY.to_dict().items() if k != "flag_name"}
    assert labels.LabelSet.from_dict(old).metric_title("MEL_auc") == "malignant AUC"


def test_subgroup_titles_and_notes_follow_the_label_set():
    assert metric_titles("binary")["MEL_auc"] == "malignant AUC" and metric_titles()["MEL_auc"] == "melanoma AUC"
    rng = np.random.default_rng(0)
    y = np.array([1] * 10 + [0] * 2)  # the flag class (column 0) in two images only
    p = rng.dirichlet([1, 1], size=len(y))
    meta = pd.DataFrame({"image_id": [f"i{k}" for k in range(len(y))], "sex": ["male", "female"] * 6})
    t = subgroup_table(y, p, list(meta["image_id"]), meta, n_boot=5, labels="binary")
    notes = " ".join(t["note"])
    assert "malignant" in notes and "melanoma" not in notes


def test_model_card_tables_title_flag_metrics_and_flagged_lists():
    from lesionlab.report.model_card import _compact

    row = {"column": "sex", "MEL_auc": 0.5, "MEL_auc_lo": 0.1, "MEL_auc_hi": 0.9, "flagged": "MEL_auc;accuracy",
           "note": None}
    assert _compact([row], "malignant").to_dict("records") == [
        {"column": "sex", "malignant AUC": "0.500 [0.10, 0.90]", "flagged": "malignant AUC, accuracy", "note": ""}]


def test_cross_site_markdown_names_the_flag_metric():
    result = {"source_column": "source", "label_set": "binary", "archs": ["a"], "epochs": 1, "image_size": 32,
              "pretrained": "none", "min_class_images": 1,
              "sources": {"s1": {"images": 4, "lesions": 4, "classes": {"MALIGNANT": 2, "BENIGN": 2}}},
              "cells": [], "refusal_rate": 0.1}
    row = {"train": "s1", "test": "internal", "variant": "baseline", "classes": "MALIGNANT,BENIGN", "images": 4,
           "lesions": 4, **{k: 0.5 for k in ("balanced_accuracy", "macro_auc", "MEL_auc", "ece", "coverage",
                                               "mean_set_size")}}
    md = cross_site_markdown(result, pd.DataFrame([row]), pd.DataFrame())
    assert "malignant AUC" in md and "melanoma" not in md
    assert "melanoma AUC" in cross_site_markdown({**result, "label_set": "ham7"}, pd.DataFrame([row]), pd.DataFrame())
    # a YAML set known only by its name does not borrow melanoma's
    assert "melanoma" not in result_label_set({"label_set": "mel-vs-nev"}).metric_title("MEL_auc")


@pytest.fixture(scope="module")
def binary_and_ham7(tmp_path_factory):
    root = tmp_path_factory.mktemp("flagnames")
    out = {}
    for name in ("binary", "ham7"):
        out[name] = root / name
        study.run_study(load_config("demo", [*TINY, f"data.labels={name}"]), out[name], progress=False)
    return out


def test_study_report_and_model_card_name_the_flag(binary_and_ham7, tmp_path):
    from lesionlab.workflows.model_card import write_model_card

    b, h = binary_and_ham7["binary"], binary_and_ham7["ham7"]
    for f in ("report.md", "report.html"):
        text = (b / f).read_text()
        assert "malignant AUC" in text and "malignant sensitivity" in text, f
        assert "melanoma AUC" not in text and "MEL AUC" not in text and "Melanoma operating points" not in text, f
        assert "Malignant operating points" in text
        ham = (h / f).read_text()
        assert "melanoma AUC" in ham and "malignant AUC" not in ham and "Melanoma operating points" in ham, f
    # the files keep their keys: subgroups.csv has MEL_auc under binary too
    assert "MEL_auc" in pd.read_csv(b / "subgroups" / "subgroups.csv").columns
    card = write_model_card(b, tmp_path / "card")
    md = card["model_card.md"].read_text()
    assert "malignant AUC" in md and "melanoma AUC" not in md
    data = json.loads(card["model_card.json"].read_text())
    assert data["model"]["flag_name"] == "malignant"
    assert any("MEL_auc" in r for r in data["subgroups"]["rows"])  # JSON keeps the keys
    ham_md = write_model_card(h, tmp_path / "ham_card")["model_card.md"].read_text()
    assert "melanoma AUC" in ham_md and "malignant AUC" not in ham_md


def test_subgroups_command_names_the_flag_class_of_its_files(tmp_path, capsys):
    """`lesionlab subgroups` on binary prediction files says "malignant", from the files' class columns."""
    from lesionlab.cli.main import main

    rng = np.random.default_rng(0)
    ids = [f"I{i:03d}" for i in range(40)]
    y = rng.integers(0, 2, 40)
    pd.DataFrame({"image": ids, "MALIGNANT": (y == 0).astype(float), "BENIGN": (y == 1).astype(float)}).to_csv(
        tmp_path / "truth.csv", index=False)
    p = np.clip(np.where(y == 0, 0.7, 0.3) + rng.normal(0, 0.2, 40), 0.01, 0.99)
    pd.DataFrame({"image": ids, "MALIGNANT": p, "BENIGN": 1 - p}).to_csv(tmp_path / "pred.csv", index=False)
    pd.DataFrame({"image_id": ids, "sex": ["male", "female"] * 20}).to_csv(tmp_path / "meta.csv", index=False)
    assert main(["subgroups", "--truth", str(tmp_path / "truth.csv"), "--pred", str(tmp_path / "pred.csv"),
                 "--metadata", str(tmp_path / "meta.csv"), "--out", str(tmp_path / "out"), "--bootstrap", "20",
                 "--min-images", "5"]) == 0
    out = capsys.readouterr().out
    assert "malignant AUC" in out and "malignant images" in out and "melanoma" not in out
