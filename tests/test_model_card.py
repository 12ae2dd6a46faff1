"""The model card (issue 18 part 6): built from a tiny synthetic study folder written through the StudyFolder
contract with the real metric, trust, refusal and subgroup writers; three formats; the JSON checked against the
documented fields with pydantic; licences and the non-commercial warning; "not run" for what a study lacks; the CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesionlab.cli.main import main
from lesionlab.config import load_config
from lesionlab.data.licences import (
    LICENCES,
    commercial_use,
    dataset_licences,
    forbids_commercial_use,
    licence_warning,
)
from lesionlab.evaluation.ensemble import ENSEMBLE
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASSES
from lesionlab.report import model_card as mc
from lesionlab.report.model_card_facts import build_card
from lesionlab.study_folder import StudyFolder

ARCHS = ["timm:resnet10t", "resnet18"]


def _probs(y: np.ndarray, rng: np.random.Generator, skill: float) -> np.ndarray:
    p = rng.dirichlet(np.ones(len(CLASSES)), len(y))
    p[np.arange(len(y)), y] += skill
    return p / p.sum(1, keepdims=True)


def _base_study(root: Path, *, synth: bool = False) -> StudyFolder:
    """config, dataset.json, splits.csv, split_summary.csv, model sidecars: what a study has after training."""
    from lesionlab.data.split import make_split, summary_table, write_split
    from lesionlab.data.synth import make_synthetic
    from lesionlab.data.tables import read_table
    from lesionlab.io import atomic_write_csv

    data, sf = root / "data", StudyFolder(root / "study")
    make_synthetic(data, n_images=70, seed=1, size=(64, 48), progress=False)
    meta_csv = data / "HAM10000_metadata.csv"  # two acquisition sites, as HAM10000's `dataset` column names them
    meta = pd.read_csv(meta_csv, dtype=str)
    meta["dataset"] = np.where(np.arange(len(meta)) % 3 == 0, "rosendahl", "vidir_modern")
    meta.to_csv(meta_csv, index=False)
    table = read_table(data)
    sp = make_split(table.df, fractions=(0.5, 0.25, 0.25), seed=0)
    write_split(sp, sf.split_file)
    atomic_write_csv(sf.split_summary_file, summary_table(sp, CLASSES))
    cfg = load_config(None, ["train.device=cpu", "train.epochs=3", "eval.bootstrap=30"])
    cfg.train.archs = list(ARCHS)
    cfg.name = "tiny"
    sf.write_config(cfg)
    sf.write_dataset({"source": str(table.source), "layout": table.layout, "rows": len(table.df), "problems": {},
                      "notes": ["columns that give the label away (never fed to a model): dx, dx_type, label"]})
    sf.steps_file.write_text(json.dumps({"synth": {}} if synth else {}))
    sf.predictions_dir.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(ARCHS):
        d = sf.run_dir(a)
        d.mkdir(parents=True)
        (d / "model.json").write_text(json.dumps({"arch": a, "timm_id": f"{a}.x", "input_size": 48 + 16 * i,
                                                  "pretrained": "none", "epoch": 2}))
        pd.DataFrame({"epoch": [1, 2], "val_loss": [1.0, 0.9]}).to_csv(d / "history.csv", index=False)
    return sf


def _evaluated(sf: StudyFolder) -> StudyFolder:
    """Predictions, trust.json, eval/*/metrics.json, ood/ood.json and subgroups/ as the study's steps write them."""
    from lesionlab.evaluation.evaluate import evaluate_arrays
    from lesionlab.evaluation.trust import fit_trust, trust_metrics
    from lesionlab.io import atomic_write_json
    from lesionlab.report.evaluation_files import write_subgroups
    from lesionlab.workflows.refusal import refusal_summary

    cfg = sf.config()
    rng = np.random.default_rng(0)
    sp = sf.split()
    ys, ps = {}, {}
    for tag in ("val", "test"):
        rows = sp[sp["split"] == tag]
        sf.write_truth(tag, rows)
        y = np.array([CLASSES.index(c) for c in rows["label"]])
        probs = {a: _probs(y, rng, 1.0 + i) for i, a in enumerate(ARCHS)}
        probs[ENSEMBLE] = np.mean(list(probs.values()), axis=0)
        for n, p in probs.items():
            sf.write_probabilities(n, tag, list(rows["image_id"]), p)
        ys[tag], ps[tag] = y, probs
    trust = fit_trust(ys["val"], ps["val"], cfg.trust, CLASSES)
    sf.write_trust(trust)
    lesion = sf.lesion_of()
    test_ids = list(sp.loc[sp["split"] == "test", "image_id"])
    groups = np.array([lesion[i] for i in test_ids])
    for n in [*ARCHS, ENSEMBLE]:
        m = evaluate_arrays(ys["test"], ps["test"][n], cfg=cfg.eval, groups=groups, val=(ys["val"], ps["val"][n]),
                            classes=CLASSES)
        m.update(trust_metrics(ys["test"], ps["test"][n], sf.trust(), n, val=(ys["val"], ps["val"][n]),
                               groups=groups, n_boot=cfg.eval.bootstrap, ci=cfg.eval.ci))
        atomic_write_json(sf.metrics_file(n), m)
    n_test = len(test_ids)
    test = pd.DataFrame({"ood_score": rng.normal(0, 1, n_test), "refused": [False] * (n_test - 2) + [True, True],
                         "quality": [""] * (n_test - 1) + ["too dark"], "ood_refused": [False] * (n_test - 2) + [True] * 2})
    noise = pd.DataFrame({"ood_score": rng.normal(4, 1, 10), "refused": [True] * 10, "quality": [""] * 10,
                          "ood_refused": [True] * 10})
    atomic_write_json(sf.ood_summary_file, refusal_summary(test, {"noise": noise}, 2.0, 0.05))
    meta = pd.DataFrame({"image_id": test_ids, "sex": rng.choice(["male", "female"], n_test),
                         "fitzpatrick": rng.choice(["I-II", "III-IV"], n_test)})
    write_subgroups(sf.folder("subgroups"), ys["test"], {ENSEMBLE: ps["test"][ENSEMBLE]}, test_ids, meta,
                    groups=groups, columns=["sex", "fitzpatrick"], n_boot=20, min_images=5)
    return sf


@pytest.fixture(scope="module")
def full_study(tmp_path_factory) -> Path:
    return _evaluated(_base_study(tmp_path_factory.mktemp("card_full"))).root


@pytest.fixture(scope="module")
def bare_study(tmp_path_factory) -> Path:
    return _base_study(tmp_path_factory.mktemp("card_bare")).root


# ----------------------------------------------------------------------------- licences


def test_licence_table_and_commercial_use():
    assert LICENCES["ham10000"].licence == "CC BY-NC 4.0"
    assert LICENCES["pad_ufes_20"].licence == "CC BY 4.0"
    assert LICENCES["fitzpatrick17k"].licence == "CC BY-NC-SA 3.0"
    expected = {"ham10000": "forbidden", "isic2018": "forbidden", "isic2019": "forbidden", "isic2020": "forbidden",
                "ph2": "forbidden", "derm7pt": "forbidden", "pad_ufes_20": "allowed", "fitzpatrick17k": "forbidden",
                "ddi": "forbidden"}
    assert {k: v.commercial_use for k, v in LICENCES.items()} == expected
    for key, lic in LICENCES.items():  # every entry says where its licence is stated and what to cite
        assert lic.url.startswith("https://") and lic.citation and lic.checked, key
    assert commercial_use("CC0 1.0") == "allowed" and commercial_use("CC BY-ND 4.0") == "allowed"
    assert commercial_use("CC BY-NC-ND 4.0") == "forbidden" and commercial_use("non-commercial use") == "forbidden"
    assert commercial_use("proprietary, ask the owner") == "unknown" and commercial_use("") == "unknown"
    assert forbids_commercial_use("CC BY-NC 4.0") and not forbids_commercial_use("CC BY 4.0")


def test_licence_warning_for_sources():
    ham = dataset_licences({"layout": "ham10000", "rows": 10})
    assert ham[0]["commercial_use"] == "forbidden" and ham[0]["images"] == 10
    w = licence_warning(ham)
    assert w and "HAM10000 (CC BY-NC 4.0)" in w and "non-commercial" in w
    pad = dataset_licences({"layout": "pad_ufes_20", "rows": 5})
    assert licence_warning(pad) is None
    both = dataset_licences({"layout": "multi", "rows": 15, "sources": [
        {"name": "pad", "layout": "pad_ufes_20", "rows": 5}, {"name": "fitz", "layout": "fitzpatrick17k", "rows": 10}]})
    assert [d["name"] for d in both] == ["pad", "fitz"]
    w = licence_warning(both)
    assert "Fitzpatrick17k (CC BY-NC-SA 3.0)" in w and "PAD-UFES-20" not in w
    own = dataset_licences({"layout": "isic2018x", "rows": 3})
    assert own[0]["commercial_use"] == "unknown" and "unknown" in licence_warning(own)
    synth = dataset_licences({"layout": "ham10000", "rows": 3}, synthetic=True)
    assert synth[0]["commercial_use"] == "allowed" and licence_warning(synth) is None


# ----------------------------------------------------------------------------- the card


def _validate(card: dict) -> None:
    """The JSON against the documented fields (report.model_card.SECTION_FIELDS), checked by pydantic models built
    from that documentation: an independent check of types and presence, not the card code checking itself."""
    from pydantic import BaseModel, ConfigDict, create_model

    class CI(BaseModel):
        model_config = ConfigDict(extra="forbid")
        value: float | int | None
        lo: float | None
        hi: float | None

    def section(name: str, fields: tuple[str, ...], reported: bool):
        spec = {f: (object, ...) for f in fields} if reported else {"status": (str, ...), "reason": (str, ...)}
        return create_model(f"S_{name}", __config__=ConfigDict(extra="allow" if not reported else "forbid"), **spec)

    top = {f.name for f in mc.ModelCard.__dataclass_fields__.values()}
    assert set(card) == top
    for name, fields in mc.SECTION_FIELDS.items():
        s = card[name]
        reported = s.get("status", mc.REPORTED) == mc.REPORTED
        section(name, fields, reported).model_validate(s)
        assert s.get("status", mc.REPORTED) in (mc.REPORTED, mc.NOT_RUN)
        assert re.search(rf"^\s+{name}\s", mc.__doc__, re.M), f"section {name} is not documented"
    for lic in card["licences"]["items"]:
        assert set(lic) == set(mc.LICENCE_FIELDS)
    if card["performance"]["status"] == mc.REPORTED:
        for v in card["performance"]["summary"].values():
            CI.model_validate(v)
        for r in card["performance"]["models"]:
            CI.model_validate(r["balanced_accuracy"])
    for k in ("ece_before", "ece_after", "brier_after", "nll_after"):
        if card["calibration"]["status"] == mc.REPORTED:
            CI.model_validate(card["calibration"][k])
    assert isinstance(card["limitations"], list) and all(isinstance(x, str) for x in card["limitations"])
    assert {r["section"] for r in card["tripod_ai"]} <= set(card)


def test_card_three_formats_from_a_study(full_study):
    files = mc.model_card_files(full_study, None)
    assert set(files) == set(mc.CARD_FILES)
    card = json.loads(files["model_card.json"])
    _validate(card)
    sf = StudyFolder(full_study)
    ens = sf.metrics(ENSEMBLE)
    perf = card["performance"]
    # the ensemble is the headline; its numbers are the study's own, per class with lesion-bootstrap CIs
    assert perf["model"] == ENSEMBLE and perf["n_test"] == ens["n"] and perf["ci_resampling"] == "lesions"
    mel = next(r for r in perf["per_class"] if r["class"] == "MEL")
    assert mel["sensitivity"] == round(ens["per_class"]["MEL"]["sensitivity"], 4)
    assert mel["auc_lo"] == round(ens["ci"]["MEL_auc"]["lo"], 4) and mel["auc_hi"] == round(ens["ci"]["MEL_auc"]["hi"], 4)
    assert perf["summary"]["balanced_accuracy"]["value"] == round(ens["ci"]["balanced_accuracy"]["value"], 4)
    assert [r["name"] for r in perf["models"]] == [*ARCHS, ENSEMBLE]
    assert card["calibration"]["temperature"] == round(ens["calibration"]["temperature"], 4)
    assert card["conformal"]["coverage"]["value"] == round(ens["conformal"]["coverage"]["value"], 4)
    assert set(card["conformal"]["per_class_coverage"]) == set(CLASSES)
    ood = sf.ood_summary()
    assert card["refusal"]["test_refused"] == round(ood["test_refused"], 4) and card["refusal"]["sets"][0]["set"] == "noise"
    # data, split and training facts
    sp = sf.split()
    assert card["data"]["total_images"] == len(sp) and card["data"]["per_class"][-1]["class"] == "total"
    assert card["data"]["sources"][0]["licence"] == "CC BY-NC 4.0"
    sites = pd.read_csv(sf.dataset()["source"]).set_index("image_id").loc[sp["image_id"], "dataset"].value_counts()
    assert {s["site"]: s["images"] for s in card["data"]["sites"]} == sites.to_dict()
    assert card["split"]["lesions_across_splits"] == 0
    assert card["split"]["images"] == {k: int((sp["split"] == k).sum()) for k in ("train", "val", "test")}
    assert card["training"]["archs"] == ARCHS and card["training"]["input_size"] == "48, 64"
    assert "Adam" in card["training"]["optimizer"] and "inverse class frequency" in card["training"]["loss"]
    assert [m["epochs_run"] for m in card["model"]["members"]] == [2, 2]
    # subgroups, with the skin-tone column measured
    assert card["subgroups"]["model"] == ENSEMBLE and card["subgroups"]["columns"] == ["sex", "fitzpatrick"]
    assert card["subgroups"]["skin_tone"]["status"] == "reported"
    assert sum(card["subgroups"]["skin_tone"]["groups"].values()) == perf["n_test"]
    assert not any("Skin-tone coverage is unknown" in x for x in card["limitations"])
    assert card["cross_site"]["status"] == "not run" and any("No external validation" in x for x in card["limitations"])
    assert any(x.startswith("Class imbalance") for x in card["limitations"])
    assert any(c.startswith("lesionlab study --config") for c in card["reproduce"])
    # Markdown and HTML carry the same facts; the HTML is one self-contained page
    md, page = files["model_card.md"].decode(), files["model_card.html"].decode()
    for h in ("Intended use and users", "Data sources and licences", "Split and leakage checks", "Training",
              "Performance on the test split", "Calibration", "Conformal differential",
              "Refusals: the gate (quality, out-of-distribution, likely wrong)", "Subgroups", "Cross-site validation",
              "Known limitations", "How to reproduce", "TRIPOD+AI items answered"):
        assert f"\n## {h}\n" in md and f"<h2>{h}</h2>" in page
    for text in ("CC BY-NC 4.0", "not a diagnosis", "vidir_modern"):
        assert text in md and text in page
    ba = perf["summary"]["balanced_accuracy"]
    assert f"{ba['value']:.3f} [{ba['lo']:.2f}, {ba['hi']:.2f}]" in md
    assert page.startswith("<!doctype html>") and "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page)  # no CDN, no remote fonts or images
    assert "<table" in page and "licence: trained on data whose licence forbids commercial use" in page


def test_non_commercial_licence_warns(full_study):
    card = json.loads(mc.model_card_files(full_study, None)["model_card.json"])
    w = card["licences"]["warning"]
    assert w and "HAM10000 (CC BY-NC 4.0)" in w and w == mc.licence_warning(card["licences"]["items"])


def test_synthetic_study_has_no_licence_warning(tmp_path):
    sf = _base_study(tmp_path, synth=True)
    card = build_card(sf.root)
    assert card.data["synthetic"] and card.licences["warning"] is None
    assert card.data["sources"][0]["key"] == "synthetic"
    assert card.limitations[0].startswith("Trained and tested on synthetic images")
    assert "makes the synthetic images again" in card.reproduce[0]


def test_missing_parts_say_not_run(bare_study):
    card = build_card(bare_study)
    d = card.to_dict()
    _validate(json.loads(mc.card_json(card)))
    for name in ("performance", "calibration", "conformal", "refusal", "subgroups", "cross_site", "external"):
        assert d[name]["status"] == "not run" and d[name]["reason"], name
    assert d["subgroups"]["skin_tone"]["status"] == "not run"
    assert d["data"]["status"] == "reported" and d["split"]["status"] == "reported"
    lim = " ".join(d["limitations"])
    for text in ("No external validation", "Skin-tone coverage is unknown", "Test performance not measured",
                 "Calibration not measured", "Refusal of unevaluable images not measured"):
        assert text in lim
    md = mc.card_markdown(card)
    assert md.count("Not run:") >= 7 and "Skin tone: not measured" in md


def test_missing_dataset_and_split_say_not_run(tmp_path, bare_study):
    root = tmp_path / "s"
    shutil.copytree(bare_study, root)
    (root / "dataset.json").unlink()
    (root / "splits.csv").unlink()
    (root / "split_summary.csv").unlink()
    card = build_card(root)
    assert card.data["status"] == "not run" and card.split["status"] == "not run"
    assert card.licences["items"][0]["commercial_use"] == "unknown" and "unknown" in card.licences["warning"]
    _validate(json.loads(mc.card_json(card)))


def test_cross_site_folder_and_bundle_manifest(tmp_path, full_study):
    xs = tmp_path / "xs"
    xs.mkdir()
    pd.DataFrame({"train": ["vidir_modern+vidir_molemax"], "test": ["rosendahl"], "balanced_accuracy": [0.61234567],
                  "balanced_accuracy_lo": [0.5], "balanced_accuracy_hi": [0.7]}).to_csv(xs / "matrix.csv", index=False)
    pd.DataFrame({"train": ["a"], "test": ["rosendahl"], "rule": ["gate"], "refused": [0.12]}).to_csv(
        xs / "refusal.csv", index=False)
    manifest = {"format_version": 1, "members": [{"name": "resnet18"}],
                "melanoma_threshold": {"value": 0.31, "source": "validation"}, "inference": {"tta": False}}
    card = build_card(full_study, manifest, cross_site_dir=xs, bundle_path=str(tmp_path / "bundle"))
    assert card.cross_site["status"] == "reported" and card.cross_site["rows"][0]["balanced_accuracy"] == 0.6123
    assert not any("No external validation" in x for x in card.limitations)
    # a one-member bundle: the card's numbers are that member's, and it lists only that member
    assert card.performance["model"] == "resnet18" and [m["name"] for m in card.model["members"]] == ["resnet18"]
    assert card.model["bundle"]["melanoma_threshold"]["value"] == 0.31 and card.model["kind"] == "single model"
    assert any(c.startswith("lesionlab bundle --runs") for c in card.reproduce)
    two = {**manifest, "members": [{"name": "timm_resnet10t"}, {"name": "resnet18"}]}
    assert build_card(full_study, two).performance["model"] == ENSEMBLE
    md = mc.card_markdown(card)
    assert "rosendahl" in md and "0.31" in md and "0.612 [0.50, 0.70]" in md and "| gate" in md
    assert card.cross_site["refusal_rows"] == [{"train": "a", "test": "rosendahl", "rule": "gate", "refused": 0.12}]


def test_cli_model_card(tmp_path, full_study, capsys):
    out = tmp_path / "card"
    assert main(["model-card", "--study", str(full_study), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CC BY-NC 4.0" in printed and "model_card.html" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(mc.CARD_FILES)
    _validate(json.loads((out / "model_card.json").read_text()))
    assert main(["model-card", "--study", str(tmp_path), "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "is not a study folder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["model-card", "--study", str(full_study), "--cross-site", str(tmp_path / "nope"),
                 "--out", str(out)]) != 0
    assert "--cross-site" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the card in every bundle


def test_bundle_from_a_study_carries_its_card_and_licence_warning(tmp_path, trust_study, caplog):
    """`lesionlab bundle` from a study (conftest's trust_study: HAM10000-layout data, so CC BY-NC 4.0): the bundle
    holds the three card files, hashed in the manifest with the data licences; the non-commercial warning is logged
    (the CLI prints log lines); a card edited afterwards fails verification like modified weights."""
    import logging

    from lesionlab.clinic.bundle import verify_bundle
    from lesionlab.clinic.bundle.manifest import listed_files
    from lesionlab.io import sha256_file

    out = tmp_path / "bundle"
    with caplog.at_level(logging.WARNING):
        assert main(["bundle", "--runs", str(trust_study / "runs"), "--study", str(trust_study), "--out", str(out),
                     "--no-ood"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "licence" in r.getMessage()]
    assert len(warned) == 1 and "HAM10000 (CC BY-NC 4.0)" in warned[0] and "non-commercial" in warned[0]
    manifest = verify_bundle(out)
    assert sorted(manifest["model_card"]) == sorted(mc.CARD_FILES)
    for name, digest in manifest["model_card"].items():
        assert sha256_file(out / name) == digest and (out / name).resolve() in listed_files(out, manifest)
    assert [d["licence"] for d in manifest["data_licences"]] == ["CC BY-NC 4.0"]
    card = json.loads((out / "model_card.json").read_text())
    _validate(card)
    assert card["licences"]["items"] == manifest["data_licences"]  # one source: the card's licence entries
    assert card["model"]["bundle"]["path"] == str(out)
    assert card["model"]["bundle"]["melanoma_threshold"] == manifest["melanoma_threshold"]
    assert "licence: trained on data whose licence forbids commercial use" in (out / "model_card.md").read_text()
    # tampering with the card is caught
    original = (out / "model_card.md").read_bytes()
    (out / "model_card.md").write_text(original.decode().replace("CC BY-NC 4.0", "CC BY 4.0"))
    with pytest.raises(UserError, match="model_card.md does not match its manifest hash"):
        verify_bundle(out)
    (out / "model_card.md").write_bytes(original)
    verify_bundle(out)
    (out / "model_card.json").unlink()
    with pytest.raises(UserError, match="model_card.json is missing"):
        verify_bundle(out)


def test_bundle_without_a_study_has_no_card(tiny_bundle):
    from lesionlab.clinic.bundle import verify_bundle

    manifest = verify_bundle(tiny_bundle)
    assert manifest["model_card"] is None and manifest["data_licences"] is None
    assert not any((tiny_bundle / name).exists() for name in mc.CARD_FILES)
