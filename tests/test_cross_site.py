"""Cross-site validation (lesionlab.workflows.cross_site, `lesionlab cross-site`): which cells, shared classes,
synthetic clinics with colour casts, and one end-to-end matrix with colour-constancy and TTA columns."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionlab.cli.main import main
from lesionlab.data.synth import SYNTH_SOURCES, make_synthetic_sources
from lesionlab.exceptions import UserError
from lesionlab.workflows import cross_site as cs

FAST = ["--config", "demo", "--set", "train.archs=[timm:resnet10t]", "--set", "cross_site.archs=[timm:resnet10t]", "--set", "data.image_size=32",
        "--set", "train.epochs=2", "--set", "eval.bootstrap=20", "--set", "data.batch_size=32", "--set", "train.precision=fp32",
        "--set", "quality.min_side=40", "--set", "ood.fit_per_class=10", "--set", "split.train=0.6",
        "--set", "split.val=0.2", "--set", "split.test=0.2", "--no-progress"]


def test_plan_cells():
    s = ["a", "b", "c"]
    assert cs.plan_cells(s) == [(("a",), ["b", "c"]), (("b",), ["a", "c"]), (("c",), ["a", "b"])]
    assert cs.plan_cells(s, scheme="leave-one-out") == [(("b", "c"), ["a"]), (("a", "c"), ["b"]), (("a", "b"), ["c"])]
    assert cs.plan_cells(s, pairs=[("a+b", "c"), ("c", "a,b"), ("a+b", "c")]) == [(("a", "b"), ["c"]), (("c",), ["a", "b"])]
    with pytest.raises(UserError, match="'d'.*known: a, b, c"):
        cs.plan_cells(s, pairs=[("a+d", "c")])
    with pytest.raises(UserError, match="both sides"):
        cs.plan_cells(s, pairs=[("a+b", "b")])
    with pytest.raises(UserError, match="at least two sources"):
        cs.plan_cells(["a"])
    with pytest.raises(UserError, match="--scheme"):
        cs.plan_cells(s, scheme="all")


def test_shared_classes_and_restrict():
    classes = ["MEL", "NV", "BCC"]
    assert cs.shared_classes(classes, ["MEL", "NV", "NV", "BCC"], ["NV", "MEL", "MEL"], min_images=1) == ["MEL", "NV"]
    assert cs.shared_classes(classes, ["MEL", "NV", "NV", "BCC"], ["NV", "MEL", "MEL"], min_images=2) == []
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])
    rows, y, p = cs.restrict(["MEL", "BCC", "NV"], probs, classes, ["MEL", "NV"])
    assert rows.tolist() == [True, False, True]
    assert y.tolist() == [0, 1]
    assert p == pytest.approx(np.array([[0.625, 0.375], [0.25, 0.75]]))  # the two columns, renormalised


@pytest.fixture(scope="module")
def clinics(tmp_path_factory):
    d = tmp_path_factory.mktemp("clinics")
    meta = make_synthetic_sources(d, n_images=100, seed=2, size=(80, 60), progress=False)
    return d, meta


def test_synthetic_clinics_differ_by_colour(clinics):
    d, meta = clinics
    assert set(meta["dataset"]) == set(SYNTH_SOURCES)
    # every clinic has every class, and lesions never span clinics
    assert (pd.crosstab(meta["dataset"], meta["dx"]) > 0).all().all()
    assert meta.groupby("lesion_id")["dataset"].nunique().max() == 1
    ratio = {}
    for src, g in meta.groupby("dataset"):
        px = np.stack([np.asarray(Image.open(d / "images" / f"{i}.jpg").convert("RGB"), float).mean((0, 1))
                       for i in g["image_id"][:20]])
        ratio[src] = float(np.mean(px[:, 0] / px[:, 2]))  # red over blue
    assert ratio["clinic_b"] > ratio["clinic_a"] * 1.3 > ratio["clinic_c"] * 1.3 * 1.3
    written = pd.read_csv(d / "HAM10000_metadata.csv")
    assert list(written["dataset"]) == list(meta["dataset"])


def test_cross_site_matrix_end_to_end(clinics, tmp_path, capsys):
    d, _ = clinics
    out = tmp_path / "cs"
    rc = main(["cross-site", "--data", str(d), "--train", "clinic_a", "--test", "clinic_b",
               "--compare", "color,tta", "--min-class-images", "2", "--refusal-rate", "0.2", "--out", str(out), *FAST])
    assert rc == 0
    assert "cross_site.md" in capsys.readouterr().out
    m = pd.read_csv(out / "matrix.csv")
    # internal + the external site, for the baseline, TTA and colour-constancy models
    assert sorted(zip(m["variant"], m["test"], strict=True)) == sorted(
        (v, t) for v in ("baseline", "tta", "color") for t in ("internal", "clinic_b"))
    # (not ECE: its bootstrap is biased upward, so its percentile interval may lie above the point value)
    for k in ("balanced_accuracy", "macro_auc", "coverage"):
        ok = m[k].notna() & m[f"{k}_lo"].notna()
        assert ok.any()
        assert (m.loc[ok, f"{k}_lo"] <= m.loc[ok, k] + 1e-9).all() and (m.loc[ok, k] <= m.loc[ok, f"{k}_hi"] + 1e-9).all()
    for _variant, g in m.groupby("variant"):
        internal = g[g["test"] == "internal"].iloc[0]
        for _, r in g[g["test"] != "internal"].iterrows():
            assert r["balanced_accuracy_drop"] == pytest.approx(internal["balanced_accuracy"] - r["balanced_accuracy"])
    # the split the internal numbers come from: lesion-grouped, clinic_a only
    sp = pd.read_csv(out / "clinic_a" / "splits.csv")
    assert sp.groupby("lesion_id")["split"].nunique().max() == 1
    assert (m.loc[m["test"] == "internal", "images"] == (sp["split"] == "test").sum()).all()

    r = pd.read_csv(out / "refusal.csv")
    assert set(r["rule"]) == {"gate", "ood", "confidence", "set_size", "combined"}
    assert set(r["test"]) == {"internal", "clinic_b"}
    acc_ok = r["accuracy_accepted"].isna() | (r["accuracy_accepted"] >= r["accuracy_all"] - 1e-9)
    assert (r["accepted_at_least_all"] == acc_ok).all()
    res = json.loads((out / "cross_site.json").read_text())
    cell = next(c for c in res["cells"] if c["variant"] == "baseline")
    rs = cell["refusal_scores"]["combined"]
    assert rs["signals"] == ["ood", "confidence", "set_size"] and rs["target_rate"] == 0.2
    curve = cell["sets"]["clinic_b"]["risk_coverage"]["combined"]
    assert curve["coverage"][-1] == pytest.approx(1.0)
    assert curve["risk"][-1] == pytest.approx(1 - r[(r["test"] == "clinic_b") & (r["rule"] == "combined")
                                                     & (r["variant"] == "baseline")]["accuracy_all"].iloc[0])
    md = (out / "cross_site.md").read_text()
    assert "## Cross-site validation" in md and "Does colour constancy or TTA shrink the drop?" in md
    assert "Lowest mean AURC" in md
    for f in ("heatmap_balanced_accuracy_baseline.png", "heatmap_macro_auc_color.png", "risk_coverage.png"):
        assert (out / "figures" / f).stat().st_size > 1000


def test_cli_errors_are_one_line(clinics, tmp_path, capsys):
    d, _ = clinics
    assert main(["cross-site", "--data", str(d), "--train", "clinic_a", "--test", "nowhere", "--out",
                 str(tmp_path / "x"), *FAST]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err and "clinic_a" in err
    assert main(["cross-site", "--data", str(d), "--source-column", "clinic", "--out", str(tmp_path / "y"), *FAST]) != 0
    err = capsys.readouterr().err.strip()
    assert "no column 'clinic'" in err and "--source-column" in err
    assert main(["cross-site", "--data", str(d), "--train", "clinic_a", "--out", str(tmp_path / "z"), *FAST]) != 0
    assert "in pairs" in capsys.readouterr().err
    assert main(["cross-site", "--data", str(d), "--compare", "gamma", "--out", str(tmp_path / "w"), *FAST]) != 0
    assert "--compare 'gamma'" in capsys.readouterr().err


def test_a_study_table_is_used_as_given(clinics, tmp_path):
    """The study passes its validated table (`table=`); nothing is read from `data` then."""
    from lesionlab.config import load_config
    from lesionlab.data.tables import read_table

    d, _ = clinics
    table = read_table(d)
    table.df = table.df[table.df["dataset"] == "clinic_a"]
    with pytest.raises(UserError, match="at least two sources.*clinic_a"):
        cs.run_cross_site(load_config("demo"), tmp_path, data=None, table=table, source_column="dataset")


def test_cross_site_is_a_study_step_and_a_report_section(clinics, tmp_path):
    """`cross_site.enabled` in a study whose data has several sources (the `dataset` column): the matrix lands in
    the study folder and its section in the report; a re-run reuses it."""
    from lesionlab.config import load_config
    from lesionlab.workflows import study

    d, _ = clinics
    sets = [s for s in FAST[2:] if s != "--set" and s != "--no-progress"]
    cfg = load_config("demo", [*sets, "cross_site.enabled=true", "cross_site.min_class_images=2",
                               "reader_study.simulate=false", "robustness.enabled=false", "explain.gallery=false",
                               "train.max_steps_per_epoch=2"])
    out = tmp_path / "study"
    study.run_study(cfg, out, data=d, progress=False)
    m = pd.read_csv(out / "cross_site" / "matrix.csv")
    assert set(m["train"]) == set(SYNTH_SOURCES) and (m["test"] == "internal").any()
    md = (out / "report.md").read_text()
    assert "## Cross-site validation" in md and "cross_site/figures/" in md
    assert "Refusal per target site" in md and "accuracy (accepted)" in md  # the gate per site, in the report
    steps = json.loads((out / "steps.json").read_text())
    assert steps["cross-site"]["status"] == "ran"
    study.run_study(cfg, out, data=d, progress=False)
    assert json.loads((out / "steps.json").read_text())["cross-site"]["status"] == "reused"


def test_a_study_whose_clinics_are_too_small_still_reaches_its_report(tmp_path, capsys):
    """Sources too small to split (or sharing too few classes) are named in the report, not a crash; a bad
    cross-site setting is refused in one line before the first step."""
    from lesionlab.config import load_config
    from lesionlab.workflows import study

    cheap = ["synth_images=60", "synth_size=[64,48]", "data.image_size=32", "train.epochs=1",
             "train.max_steps_per_epoch=1", "train.archs=[timm:resnet10t]", "cross_site.archs=[timm:resnet10t]",
             "eval.bootstrap=5", "robustness.enabled=false", "ood.method=none", "explain.gallery=false",
             "reader_study.simulate=false", "train.precision=fp32"]
    out = tmp_path / "s"
    study.run_study(load_config("demo", cheap), out, progress=False)
    md = (out / "report.md").read_text()
    assert "## Cross-site validation" in md and "Not evaluated (" in md and "too few lesions" in md
    assert "No cell was evaluated:" in (out / "cross_site" / "cross_site.md").read_text()
    assert list(pd.read_csv(out / "cross_site" / "matrix.csv").columns)[:3] == ["train", "test", "variant"]
    from lesionlab.report.model_card import model_card_files

    files = model_card_files(out, None)  # the card (also in every bundle) says why, rather than failing
    assert "no cross-site cell was evaluated: " in files["model_card.json"].decode()
    bad = tmp_path / "bad"
    assert main(["demo", "--out", str(bad), *(x for o in [*cheap, "cross_site.epochs=-1"] for x in ("--set", o))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("cross_site.epochs is -1; give 0 (the study's train.epochs) or more") and len(err.splitlines()) == 1
    assert not (bad / "steps.json").exists()
    assert main(["demo", "--out", str(bad), *(x for o in [*cheap, "cross_site.archs=[nope]"] for x in ("--set", o))]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err
