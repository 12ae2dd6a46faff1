"""Reader-study analysis: per-reader metrics and the AI-changed-answer table on reads worked out by hand, reads files
(full and long MRMC format, and bad input), the simulator, and simulate -> run_analysis end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesionlab.evaluation.readers import (
    changed_answers,
    model_vs_readers,
    paired_reads,
    pooled_metrics,
    reader_metrics,
    time_per_case,
)
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASSES, MALIGNANT
from lesionlab.workflows.reader_study.analyse import read_reads_file, run_analysis
from lesionlab.workflows.reader_study.schema import CASE_COLUMNS, READ_COLUMNS
from lesionlab.workflows.reader_study.simulate import ai_cases_from_study, simulate_reads

VANDYKE = Path(__file__).parent / "data" / "vandyke_mrmc.csv"


def _read(reader, modality, case, truth, dx, rating, mg, ai_top, seconds=10.0, level="resident"):
    return {"reader": reader, "reader_level": level, "reader_years": 1.0, "modality": modality,
            "phase": 1 if modality == "unaided" else 2, "case": case, "truth": truth, "diagnosis": dx,
            "rating": rating, "management": mg, "seconds": seconds, "ai_top": ai_top, "ai_mel_prob": 0.5,
            "ai_malignant_prob": 0.5, "ai_melanoma_flag": False}


@pytest.fixture
def hand_reads() -> pd.DataFrame:
    # one reader, four cases: k1 MEL, k2 BCC, k3 NV, k4 NV; the AI shows MEL, NV (wrong), NV, MEL (wrong)
    ai = {"k1": "MEL", "k2": "NV", "k3": "NV", "k4": "MEL"}
    truth = {"k1": "MEL", "k2": "BCC", "k3": "NV", "k4": "NV"}
    unaided = {"k1": ("NV", 2, "follow-up"), "k2": ("BCC", 5, "excise"), "k3": ("NV", 1, "reassure"),
               "k4": ("NV", 3, "follow-up")}
    aided = {"k1": ("MEL", 6, "excise"), "k2": ("NV", 2, "reassure"), "k3": ("NV", 1, "reassure"),
             "k4": ("MEL", 5, "excise")}
    rows = []
    for modality, answers in (("unaided", unaided), ("aided", aided)):
        for k, (dx, rating, mg) in answers.items():
            rows.append(_read("r1", modality, k, truth[k], dx, rating, mg, ai[k],
                              seconds=10.0 if modality == "unaided" else 20.0))
    return pd.DataFrame(rows, columns=list(READ_COLUMNS))


def test_reader_metrics_by_hand(hand_reads):
    m = reader_metrics(hand_reads, "melanoma").set_index("modality")
    # unaided: says MEL never -> sensitivity 0/1, specificity 3/3; rating AUC: MEL rated 2 vs 5,1,3 -> 1/3
    assert m.loc["unaided", "sensitivity"] == 0 and m.loc["unaided", "specificity"] == 1
    assert m.loc["unaided", "auc"] == pytest.approx(1 / 3)
    assert m.loc["unaided", "accuracy"] == pytest.approx(3 / 4)
    # aided: says MEL for k1 (right) and k4 (wrong) -> sensitivity 1, specificity 2/3; ratings 6 vs 2,1,5 -> 1
    assert m.loc["aided", "sensitivity"] == 1 and m.loc["aided", "specificity"] == pytest.approx(2 / 3)
    assert m.loc["aided", "auc"] == 1
    assert m.loc["aided", "accuracy"] == pytest.approx(2 / 4)
    mal = reader_metrics(hand_reads, "malignancy").set_index("modality")
    # malignant k1, k2. unaided says malignant (MEL/BCC/AKIEC) for k2 only; excises k2 only
    assert mal.loc["unaided", "sensitivity"] == 0.5 and mal.loc["unaided", "specificity"] == 1
    assert mal.loc["unaided", "excise_sensitivity"] == 0.5 and mal.loc["unaided", "excise_specificity"] == 1
    # ratings: malignant 2, 5 vs benign 1, 3 -> pairs (2>1) (2<3) (5>1) (5>3) -> 3/4
    assert mal.loc["unaided", "auc"] == pytest.approx(0.75)
    assert mal.loc["aided", "excise_sensitivity"] == 0.5 and mal.loc["aided", "excise_specificity"] == 0.5
    pooled = pooled_metrics(mal).set_index("modality")
    assert pooled.loc["unaided", "readers"] == 1 and pooled.loc["unaided", "auc"] == pytest.approx(0.75)


def test_changed_answers_by_hand(hand_reads):
    pairs = paired_reads(hand_reads).set_index("case")
    # k1: NV -> MEL, AI right: wrong to right; k2: BCC -> NV, AI wrong: right to wrong;
    # k3: NV -> NV, AI right: right kept;       k4: NV -> MEL, AI wrong: right to wrong
    assert pairs["dx_kind"].to_dict() == {"k1": "wrong to right", "k2": "right to wrong", "k3": "right kept",
                                          "k4": "right to wrong"}
    assert pairs["ai_right"].to_dict() == {"k1": True, "k2": False, "k3": True, "k4": False}
    t = changed_answers(pairs.reset_index()).set_index(["reader", "ai"])
    assert t.loc[("all", "AI right"), "wrong to right"] == 1 and t.loc[("all", "AI right"), "right kept"] == 1
    assert t.loc[("all", "AI wrong"), "right to wrong"] == 2 and t.loc[("all", "AI wrong"), "net"] == -2
    assert t.loc[("r1", "AI wrong"), "n"] == 2
    # management (right = excise exactly the malignant ones): k1 follow-up -> excise (wrong to right),
    # k2 excise -> reassure (right to wrong), k3 kept right, k4 follow-up -> excise (right to wrong)
    assert pairs["mg_kind"].to_dict() == {"k1": "wrong to right", "k2": "right to wrong", "k3": "right kept",
                                          "k4": "right to wrong"}
    # the AI's class was of the right kind (malignant or not) for k1, k3 only
    assert pairs["ai_kind_right"].to_dict() == {"k1": True, "k2": False, "k3": True, "k4": False}


def test_refused_ai_is_its_own_group(hand_reads):
    reads = hand_reads.copy()
    reads.loc[reads["case"] == "k3", "ai_top"] = ""
    t = changed_answers(paired_reads(reads), by_reader=False).set_index("ai")
    assert t.loc["AI refused", "n"] == 1 and t.loc["AI right", "n"] == 1


def test_time_per_case(hand_reads):
    t = time_per_case(hand_reads).set_index("modality")
    assert t.loc["unaided", "median_s"] == 10 and t.loc["aided", "median_s"] == 20 and t.loc["aided", "reads"] == 4


def test_model_vs_readers_by_hand():
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    score = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.05])
    # readers' mean sensitivity 0.75: the model reaches it at threshold 0.7, flagging 0.9, 0.8, 0.7 -> spec 4/4
    r = model_vs_readers(truth, score, 0.75, 0.5)
    assert r["model_specificity_at_readers_sensitivity"] == 1.0 and r["model_sensitivity_there"] == 0.75
    # at specificity >= 0.5 the model can flag down to 0.2 (spec 3/4, sens 4/4)
    assert r["model_sensitivity_at_readers_specificity"] == 1.0


def _cases(n: int = 90, seed: int = 0, ai_accuracy: float = 0.85, ai_separation: float = 3.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    truth = rng.choice(CLASSES, n, p=[0.2, 0.4, 0.1, 0.08, 0.12, 0.05, 0.05])
    mal = np.isin(truth, list(MALIGNANT))
    p_mal = 1 / (1 + np.exp(-(ai_separation * (mal - 0.5) + rng.normal(0, 1, n))))
    wrong = rng.random(n) > ai_accuracy
    ai_top = np.where(wrong, [CLASSES[(CLASSES.index(t) + 1) % 7] for t in truth], truth)
    return pd.DataFrame({"case": [f"c{i:03d}" for i in range(n)], "image_id": [f"img{i}" for i in range(n)],
                         "truth": truth, "ai_top": ai_top, "ai_mel_prob": np.where(truth == "MEL", p_mal, p_mal / 2),
                         "ai_malignant_prob": p_mal, "ai_melanoma_flag": p_mal > 0.5})


def test_simulate_reads_shape_and_determinism():
    cases = _cases(40)
    a = simulate_reads(cases, readers=3, seed=7)
    b = simulate_reads(cases, readers=3, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == list(READ_COLUMNS) and len(a) == 3 * 2 * 40
    assert a["rating"].between(1, 6).all() and set(a["management"]) <= {"excise", "follow-up", "reassure"}
    assert (a["management"] == "excise").eq(a["rating"] >= 4).all()
    assert set(a["diagnosis"]) <= set(CLASSES) and (a["seconds"] > 0).all()
    assert set(a["reader_level"]) == {"resident", "board-certified", "expert"}
    c = simulate_reads(cases, readers=4, seed=7, crossover=True)
    first = c[c["phase"] == 1].groupby("reader")["modality"].first()
    assert sorted(first) == ["aided", "aided", "unaided", "unaided"]
    with pytest.raises(UserError, match="follow_ai"):
        simulate_reads(cases, readers=[{"follow_ai": 1.5}], seed=0)
    with pytest.raises(UserError, match="lacks column"):
        simulate_reads(cases.drop(columns="ai_top"), readers=1, seed=0)


def test_simulate_then_analyse_end_to_end(tmp_path):
    cases = _cases(90, seed=1)
    readers = [{"reader": f"s{i}", "level": lv, "skill": 1.0 if lv == "resident" else 1.6, "follow_ai": 0.6}
               for i, lv in enumerate(["resident", "resident", "board-certified", "board-certified", "resident"])]
    reads = simulate_reads(cases, readers=readers, seed=3)
    summary = run_analysis(reads, cases, tmp_path / "rs", simulated=True)
    out = tmp_path / "rs"
    for name in ("reader_study.md", "reader_study.html", "summary.json", "per_reader.csv", "changed_answers.csv",
                 "reader_study_roc.png", "reader_study_auc_pairs.png", "reader_study_changed_answers.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
    md = (out / "reader_study.md").read_text()
    assert "SIMULATED" in md and "SIMULATED" in (out / "reader_study.html").read_text()
    assert "![Readers' diagnoses on the model's ROC curve" in md and "(reader_study_roc.png)" in md
    on_disk = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert on_disk["simulated"] is True and on_disk["readers"] == 5 and on_disk["cases"] == 90
    # skilled readers who follow a good AI: aided AUC above unaided, for both tasks, significantly for malignancy
    for task in ("melanoma", "malignancy"):
        assert summary[f"{task}_auc_aided"] > summary[f"{task}_auc_unaided"]
        assert summary[f"{task}_auc_difference_aided_minus_unaided"] > 0
    assert summary["malignancy_p_value"] < 0.05
    mr = summary["tasks"]["malignancy"]["mrmc"]
    assert mr["modalities"] == ["aided", "unaided"] and mr["differences"][0]["ci_lower"] > 0
    assert {r["reader_level"] for r in summary["by_level"]} == {"resident", "board-certified"}
    # the model's ROC comparison is there, and the AI-changed table nets positive when the AI was right
    assert summary["tasks"]["malignancy"]["model"]["auc"] > 0.8
    assert summary["tasks"]["melanoma"]["comparison"]["unaided"]["model_specificity_at_readers_sensitivity"] is not None
    dx = {r["ai"]: r for r in summary["changed_answers"]["diagnosis"] if r["reader"] == "all"}
    assert dx["AI right"]["net"] > 0 and dx["AI wrong"]["net"] < 0


def test_a_misleading_ai_pulls_following_readers_down(tmp_path):
    bad = _cases(90, seed=2, ai_accuracy=0.1, ai_separation=-2.0)  # AI mostly wrong, probabilities inverted
    reads = simulate_reads(bad, readers=[{"reader": f"x{i}", "level": "expert", "follow_ai": 0.7} for i in range(4)],
                           seed=5)
    summary = run_analysis(reads, bad, tmp_path / "bad", simulated=True)
    assert summary["malignancy_auc_aided"] < summary["malignancy_auc_unaided"]
    acc = {r["modality"]: r["accuracy"] for r in summary["tasks"]["malignancy"]["pooled"]}
    assert acc["aided"] < acc["unaided"]


def test_reads_file_roundtrip_and_one_modality(tmp_path):
    cases = _cases(30, seed=4)
    reads = simulate_reads(cases, readers=2, seed=1)
    f = tmp_path / "reads.csv"
    reads.to_csv(f, index=False)
    back, derived = read_reads_file(f)
    assert list(back.columns) == list(READ_COLUMNS) and len(back) == len(reads)
    assert list(derived.columns) == list(CASE_COLUMNS) and len(derived) == 30
    assert back["ai_melanoma_flag"].dtype == bool
    # a study still in its first phase: no MRMC, no changed-answer table, but a report
    s = run_analysis(back[back["modality"] == "unaided"], None, tmp_path / "one")
    assert "skipped" in s["tasks"]["melanoma"]["mrmc"] and not s["changed_answers"]
    assert "No MRMC analysis" in (tmp_path / "one" / "reader_study.md").read_text()
    assert "SIMULATED" not in (tmp_path / "one" / "reader_study.md").read_text()


def test_long_format_vandyke_through_the_report(tmp_path):
    reads, cases = read_reads_file(VANDYKE)
    assert cases is None and len(reads) == 1140
    s = run_analysis(reads, cases, tmp_path / "vd")
    assert round(s["p_value"], 8) == 0.05166569 and round(s["ddf"], 5) == 15.25967
    assert round(s["difference_1_minus_2"], 8) == -0.04380032
    md = (tmp_path / "vd" / "reader_study.md").read_text()
    assert "difference 1 - 2" in md and "-0.0438" in md and "-0.0880 to 0.0004" in md
    assert (tmp_path / "vd" / "reader_study_auc_pairs.png").exists()


@pytest.mark.parametrize("text, message", [
    ("reader,modality,case,truth,rating\n1,a,1,0,3\n1,a,2,2,4\n", r"row 3: truth must be 0 or 1"),
    ("reader,modality,case,truth,rating\n1,a,1,0,3\n1,a,2,1,high\n", r"row 3: column 'rating' must be a number"),
    ("reader,modality,case,truth,rating\n1,a,1,0,3\n1,a,2,1,\n", r"row 3: column 'rating' must be a number"),
    ("reader,modality,case,truth,rating\n1,a,1,0,3\n1,a,1,0,4\n", r"row 3: reader '1' read case '1' in modality 'a'"),
    ("reader,modality,case,truth,rating\n1,a,1,0,3\n2,a,1,1,4\n", r"row 3: case '1' has a different truth"),
    ("reader,modality,case,truth,rating\n,a,1,0,3\n", r"row 2: column 'reader' is empty"),
    ("reader,case,score\n1,2,3\n", r"lacks column\(s\) modality, truth, rating"),
    ("reader,modality,case,truth,rating\n", r"has no rows"),
])
def test_bad_long_reads_files(tmp_path, text, message):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        read_reads_file(f)
    assert str(f) in str(e.value)


def test_bad_full_reads_files(tmp_path):
    reads = simulate_reads(_cases(10), readers=1, seed=0)
    f = tmp_path / "reads.csv"
    for col, value, message in (("modality", "both", r"row 4: modality 'both' must be one of unaided, aided"),
                                ("management", "biopsy", r"row 4: management 'biopsy' must be one of"),
                                ("seconds", "ten", r"row 4: column 'seconds' must be a number"),
                                ("ai_melanoma_flag", "maybe", r"row 4: ai_melanoma_flag 'maybe'")):
        bad = reads.copy().astype(object)
        bad.loc[2, col] = value
        bad.to_csv(f, index=False)
        with pytest.raises(UserError, match=message):
            read_reads_file(f)
    with pytest.raises(UserError, match="not found"):
        read_reads_file(tmp_path / "missing.csv")
    f.write_bytes(b"\xff\xfe\x00garbage\x00\xff")
    with pytest.raises(UserError):
        read_reads_file(f)


def test_cases_from_study(tmp_path):
    root = tmp_path / "study"
    (root / "predictions").mkdir(parents=True)
    ids = [f"ISIC_{i:07d}" for i in range(12)]
    labels = [CLASSES[i % 7] for i in range(12)]
    onehot = pd.DataFrame(np.eye(7)[[CLASSES.index(c) for c in labels]], columns=list(CLASSES))
    pd.concat([pd.DataFrame({"image": ids}), onehot], axis=1).to_csv(root / "predictions" / "truth_test.csv", index=False)
    rng = np.random.default_rng(0)
    member_probs = {}
    for m in ("a", "b"):
        p = rng.dirichlet(np.ones(7), 12)
        member_probs[m] = p
        pd.concat([pd.DataFrame({"image": ids}), pd.DataFrame(p, columns=list(CLASSES))], axis=1).to_csv(
            root / "predictions" / f"{m}_test.csv", index=False)
        (root / "runs" / m).mkdir(parents=True)
        (root / "runs" / m / "model.json").write_text(json.dumps({"arch": m}))
    (root / "eval" / "ensemble").mkdir(parents=True)
    (root / "eval" / "ensemble" / "metrics.json").write_text(json.dumps(
        {"operating_points": {"MEL": {"at_threshold": {"threshold": 0.2}, "threshold_source": "chosen on validation"}}}))
    # images 0 and 7 are the same lesion: a sample takes at most one of them
    pd.DataFrame({"image_id": ids, "lesion_id": ["L0", *[f"L{i}" for i in range(1, 7)], "L0",
                                                 *[f"L{i}" for i in range(8, 12)]], "split": "test"}).to_csv(
        root / "splits.csv", index=False)
    cases, info = ai_cases_from_study(root)
    assert list(cases.columns) == list(CASE_COLUMNS) and len(cases) == 12
    mean = (member_probs["a"] + member_probs["b"]) / 2  # no trust.json: the uncalibrated mean
    assert np.allclose(cases["ai_mel_prob"], mean[:, 0], atol=1e-6)
    assert np.allclose(cases["ai_malignant_prob"], mean[:, [0, 2, 3]].sum(1), atol=1e-6)
    assert (cases["ai_top"] == [CLASSES[k] for k in mean.argmax(1)]).all() and cases["truth"].tolist() == labels
    assert (cases["ai_melanoma_flag"] == (mean[:, 0] >= 0.2)).all()
    assert info["melanoma_threshold"] == 0.2 and "metrics.json" in info["threshold_source"]
    assert sorted(info["models"]) == ["a", "b"]
    sample, _ = ai_cases_from_study(root, n=7, seed=1)
    assert len(sample) == 7 and not {"ISIC_0000000", "ISIC_0000007"} <= set(sample["case"])
    reads = simulate_reads(sample, readers=2, seed=0)
    assert reads["case"].nunique() == 7
