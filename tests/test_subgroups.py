"""Subgroup performance: metric definitions cross-checked, flags and small-subgroup marks, the CLI without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lesionlab.data.isic_csv import probs_frame, write_isic_csv
from lesionlab.evaluation.metrics import flat_metrics
from lesionlab.evaluation.subgroups import (
    MISSING,
    age_band,
    clean_values,
    subgroup_columns,
    subgroup_stat,
    subgroup_table,
)
from lesionlab.labels import CLASS_INDEX, CLASSES

MEL = CLASS_INDEX["MEL"]


def test_stat_matches_the_study_metrics():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 300)  # VASC absent: macro averages skip it, as in metrics.summarize
    probs = rng.dirichlet(np.ones(7), 300)
    probs[np.arange(300), y] += rng.random(300)
    probs /= probs.sum(1, keepdims=True)
    ours, ref = subgroup_stat(y, probs), flat_metrics(y, probs)
    for k in ours:
        assert ours[k] == pytest.approx(ref[k]), k


def test_threshold_changes_only_melanoma_calls():
    y = np.array([MEL, MEL, 1, 1])
    p = np.full((4, 7), 0.01)
    p[:, 1] = 0.6
    p[:, MEL] = [0.35, 0.1, 0.3, 0.05]
    assert subgroup_stat(y, p)["MEL_sensitivity"] == 0.0
    at = subgroup_stat(y, p, mel_threshold=0.3)
    assert at["MEL_sensitivity"] == 0.5 and at["MEL_specificity"] == 0.5


def test_age_bands_and_missing_values():
    assert [age_band(a) for a in (0, 25, 30, 44, 45, 59.9, 60, 74, 75, 85)] == \
        ["<30", "<30", "30-44", "30-44", "45-59", "45-59", "60-74", "60-74", "75+", "75+"]
    assert age_band("") == age_band(None) == age_band("x") == age_band(float("nan")) == MISSING
    assert list(clean_values(["male", " unknown", "", None, 3.0, np.nan])) == ["male", MISSING, MISSING, MISSING, "3", MISSING]


def _case(n_per_sex: int = 120, seed: int = 0):
    """Males predicted almost perfectly, females at random; 3 'unknown' images; lesions of 2 images."""
    rng = np.random.default_rng(seed)
    n = 2 * n_per_sex + 3
    y = rng.integers(1, 7, n)  # melanoma only in the first 12 images
    y[:12] = MEL
    sex = np.array(["male"] * n_per_sex + ["female"] * n_per_sex + ["unknown"] * 3)
    probs = rng.dirichlet(np.ones(7), n)
    good = sex == "male"
    probs[good] = 0.01
    probs[good, y[good]] = 0.94
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    meta = pd.DataFrame({"image_id": ids, "lesion_id": [f"L{i // 2}" for i in range(n)], "sex": sex,
                         "age": rng.choice(["20", "50", "80", ""], n), "localization": "back"})
    return y, probs, ids, meta


def test_table_flags_the_worse_subgroup_and_marks_small_ones():
    y, probs, ids, meta = _case()
    t = subgroup_table(y, probs, ids, meta, groups=meta["lesion_id"].to_numpy(), n_boot=200)
    assert list(t.columns[:5]) == ["column", "subgroup", "n_images", "n_lesions", "n_MEL"]
    overall = t.iloc[0]
    assert (overall["column"], overall["subgroup"], overall["n_images"]) == ("all", "all", len(y))
    sex = t[t["column"] == "sex"].set_index("subgroup")
    assert list(sex.index) == ["female", "male", MISSING]  # largest first (tie by name), unknown last, not hidden
    assert sex["n_images"].sum() == len(y)
    assert "balanced_accuracy" in sex.loc["female", "flagged"].split(";")
    assert sex.loc["female", "balanced_accuracy_hi"] < overall["balanced_accuracy"]
    assert sex.loc["male", "flagged"] == "" and not sex.loc["male", "small"]
    assert sex.loc[MISSING, "small"] and "small: 3 images" in sex.loc[MISSING, "note"]
    assert sex.loc["female", "n_lesions"] == len(set(meta.loc[meta["sex"] == "female", "lesion_id"]))
    # the columns present by default, age as bands
    assert set(t["column"]) == {"all", "sex", "age_band", "localization"}
    assert list(t.loc[t["column"] == "age_band", "subgroup"]) == ["<30", "45-59", "75+", MISSING]
    # a subgroup without melanoma is marked and has undefined melanoma metrics
    no_mel = subgroup_table(y[12:], probs[12:], ids[12:], meta, columns=["sex"], n_boot=20)
    assert no_mel["small"].all() and no_mel["MEL_sensitivity"].isna().all()


def test_columns_must_exist_and_categorical_ones_are_found(tmp_path):
    from lesionlab.exceptions import UserError

    meta = pd.DataFrame({"image_id": ["a"], "sex": ["male"], "age": ["40"]})
    assert subgroup_columns(meta) == ["sex", "age_band"]
    assert subgroup_columns(meta, ["age_band"]) == ["age_band"]
    with pytest.raises(UserError, match="no column 'fitzpatrick_skin_type'"):
        subgroup_columns(meta, ["fitzpatrick_skin_type"])
    # Every other categorical column present is a subgroup too; identifiers, labels, numbers and free text are not.
    wide = pd.DataFrame({"image_id": list("abcd"), "lesion_id": list("wxyz"), "dx": ["mel", "nv", "nv", "bkl"],
                         "sex": ["male", "female", "male", "female"], "age": [40, 50, 60, 70],
                         "dataset": ["vidir", "rosendahl", "vidir", "vam"], "scanner_id": list("pqrs"),
                         "note": [f"free text {i}" for i in range(4)], "constant": ["x"] * 4,
                         "thickness_mm": [0.5, 1.0, 2.0, 0.1], "path": list("1234")})
    assert subgroup_columns(wide) == ["sex", "age_band", "dataset", "note"]
    assert "note" not in subgroup_columns(wide.loc[wide.index.repeat(6)].assign(note=[f"t{i}" for i in range(24)]))
    # As a user's CSV arrives (every column read as text): numbers and diagnosis columns are still not subgroups.
    from lesionlab.data.metadata import read_metadata

    wide.assign(diagnostic=["MEL", "NEV", "NEV", "BCC"], three_partition_label=["m", "b", "b", "o"]).to_csv(
        tmp_path / "meta.csv", index=False)
    assert subgroup_columns(read_metadata(tmp_path / "meta.csv")) == ["sex", "age_band", "dataset", "note"]


def test_cli_writes_csv_and_forest_plot_without_torch(tmp_path):
    y, probs, ids, meta = _case(n_per_sex=60)
    meta["fitzpatrick_skin_type"] = np.where(np.arange(len(y)) % 3 == 0, "II", "IV")
    onehot = np.eye(7)[y]
    write_isic_csv(tmp_path / "truth.csv", probs_frame(ids, onehot))
    write_isic_csv(tmp_path / "model_a.csv", probs_frame(ids, probs))
    write_isic_csv(tmp_path / "model_b.csv", probs_frame(ids, np.roll(probs, 1, axis=0)))
    meta.iloc[:-5].to_csv(tmp_path / "meta.csv", index=False)  # 5 images without a metadata row
    out = tmp_path / "sub"
    code = (
        "import sys\nfrom lesionlab.cli import main\n"
        f"rc = main(['subgroups', '--truth', r'{tmp_path / 'truth.csv'}', '--pred', r'{tmp_path / 'model_a.csv'}', "
        f"r'{tmp_path / 'model_b.csv'}', '--metadata', r'{tmp_path / 'meta.csv'}', '--out', r'{out}', "
        "'--bootstrap', '50'])\n"
        "import json; print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout.strip().splitlines()[-1])
    assert status == {"rc": 0, "torch": False}
    assert "5 of 123 images have no row" in res.stdout
    table = pd.read_csv(out / "subgroups.csv", keep_default_na=False)
    assert set(table["model"]) == {"model_a", "model_b"}
    assert {"sex", "age_band", "localization", "fitzpatrick_skin_type"} <= set(table["column"])
    assert (out / "subgroups_model_a.png").stat().st_size > 5000 and (out / "subgroups_model_b.png").exists()
    # lesion ids came from the metadata: two images per lesion
    row = table[(table["model"] == "model_a") & (table["column"] == "all")].iloc[0]
    assert row["n_lesions"] == len(set(meta["lesion_id"].iloc[:-5])) + 5


def test_cli_names_a_missing_column(tmp_path, capsys):
    from lesionlab.cli import main

    y, probs, ids, meta = _case(n_per_sex=10)
    write_isic_csv(tmp_path / "truth.csv", probs_frame(ids, np.eye(7)[y]))
    write_isic_csv(tmp_path / "p.csv", probs_frame(ids, probs))
    meta.to_csv(tmp_path / "meta.csv", index=False)
    rc = main(["subgroups", "--truth", str(tmp_path / "truth.csv"), "--pred", str(tmp_path / "p.csv"), "--metadata",
               str(tmp_path / "meta.csv"), "--out", str(tmp_path / "o"), "--columns", "skin_type"])
    assert rc != 0 and "no column 'skin_type'" in capsys.readouterr().err
    assert len(CLASSES) == 7


def test_study_report_section_from_written_subgroups(tmp_path):
    from lesionlab.report.document import Report
    from lesionlab.report.evaluation_files import write_subgroups
    from lesionlab.report.study_report import subgroups_section

    y, probs, ids, meta = _case(n_per_sex=40)
    write_subgroups(tmp_path / "subgroups", y, {"timm:resnet18": probs, "ensemble": probs[::-1]}, ids, meta,
                    groups=meta["lesion_id"].to_numpy(), n_boot=30, file_names={"timm:resnet18": "timm_resnet18"})
    assert (tmp_path / "subgroups" / "subgroups_timm_resnet18.png").exists()
    rep = Report("t")
    subgroups_section(rep, tmp_path)
    md = "\n".join(rep.md)
    assert "## Subgroup performance" in md and "subgroups/subgroups_ensemble.png" in md
    assert "female" in md and "small: 3 images" in md
    empty = Report("t")
    subgroups_section(empty, tmp_path / "none")  # no subgroups folder: no section
    assert not any("Subgroup" in x for x in empty.md)
