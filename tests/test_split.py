import numpy as np
import pandas as pd
import pytest

from lesionlab.config import SplitConfig
from lesionlab.data.split import (
    SPLITS,
    check_split,
    find_duplicate_leaks,
    find_leaks,
    make_split,
    merge_duplicate_groups,
    read_duplicates,
    read_split,
    split_and_check,
    split_file_problems,
    summary_table,
    write_split,
)
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASSES, DX_TO_CLASS


def _table():
    """Hand-made: one lesion with 6 images, a class (DF) with exactly 3 lesions, 40 single-image NV lesions."""
    rows = [("L_big", f"big{i}", "mel") for i in range(6)]
    rows += [(f"L_df{i}", f"df{i}", "df") for i in range(3)]
    rows += [(f"L_nv{i}", f"nv{i}", "nv") for i in range(40)]
    rows += [(f"L_mel{i}", f"mel{i}", "mel") for i in range(14)]
    df = pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx"])
    df["label"] = df["dx"].map(DX_TO_CLASS)
    return df


def test_lesion_groups_stay_together_and_each_part_gets_its_share():
    df = _table()
    sp = make_split(df, fractions=(0.6, 0.2, 0.2), seed=3)
    assert find_leaks(sp, "lesion_id") == {}
    assert sp[sp["lesion_id"] == "L_big"]["split"].nunique() == 1
    # the 3 DF lesions go to three different parts (one each) since each part's DF target is >= 0.6
    assert sorted(sp[sp["label"] == "DF"]["split"]) == ["test", "train", "val"]
    counts = sp["split"].value_counts()
    assert abs(counts["train"] - 0.6 * len(df)) <= 6 and counts["val"] >= 8 and counts["test"] >= 8


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    df = _table()
    a = make_split(df, fractions=(0.6, 0.2, 0.2), seed=1)
    b = make_split(df, fractions=(0.6, 0.2, 0.2), seed=1)
    c = make_split(df, fractions=(0.6, 0.2, 0.2), seed=2)
    write_split(a, tmp_path / "a.csv")
    write_split(b, tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert not a["split"].equals(c["split"])


def test_duplicates_merge_groups_before_splitting():
    df = _table()
    dups = pd.DataFrame({"from_img": ["nv0", "nv5"], "to_img": ["nv1", "nv1"]})  # chains nv0-nv1-nv5
    g = merge_duplicate_groups(df, dups)
    assert g[df["image_id"] == "nv0"].iloc[0] == "L_nv0+L_nv1+L_nv5"
    for seed in range(10):
        sp = make_split(df, fractions=(0.5, 0.25, 0.25), seed=seed, duplicates=dups)
        assert sp.loc[sp["image_id"].isin(["nv0", "nv1", "nv5"]), "split"].nunique() == 1
        assert check_split(sp, dups) == []


def test_leakage_check_reports_crossing_lesions_and_pairs():
    sp = pd.DataFrame({"image_id": ["a", "b", "c"], "lesion_id": ["L1", "L1", "L2"], "split": ["train", "test", "val"]})
    sp["group_id"] = sp["lesion_id"]
    msgs = check_split(sp, pd.DataFrame({"from_img": ["a"], "to_img": ["c"]}))
    assert "lesion L1 is in test and train" in msgs and "known duplicates a and c are in different splits" in msgs


def test_split_file_problems_name_leaks_and_unknown_images(tmp_path):
    df = _table()
    sp = split_and_check(df, fractions=(0.5, 0.25, 0.25), seed=0)
    write_split(sp, tmp_path / "ok.csv")
    assert split_file_problems(tmp_path / "ok.csv", set(df["image_id"])) == []
    bad = sp.copy()
    big = bad["lesion_id"] == "L_big"
    bad.loc[big, "split"] = ["train"] * 5 + ["test"]  # one lesion in two splits
    write_split(bad, tmp_path / "bad.csv")
    problems = split_file_problems(tmp_path / "bad.csv", set(df["image_id"]) - {"nv3"})
    assert len(problems) == 2 and "1 leaks across splits (first: lesion L_big" in problems[0]
    assert "1 images not in the dataset (first: nv3)" in problems[1]


def test_bad_fractions_and_files(tmp_path):
    with pytest.raises(UserError, match="sum to 1"):
        make_split(_table(), fractions=(0.5, 0.5, 0.5), seed=0)
    with pytest.raises(UserError, match="does not exist"):
        read_split(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("image_id,lesion_id,split\na,L,holdout\n")
    with pytest.raises(UserError, match="row 2 has split 'holdout'"):
        read_split(tmp_path / "bad.csv")


def test_real_metadata_split_acceptance(shared_ham, tmp_path):
    """Acceptance on the real HAM10000 metadata with its known duplicates."""
    meta = pd.read_csv(shared_ham / "HAM10000_metadata.csv", dtype=str)
    meta["label"] = meta["dx"].map(DX_TO_CLASS)
    dups = read_duplicates(shared_ham / "known_duplicates.csv")
    c = SplitConfig()
    sp = make_split(meta, fractions=(c.train, c.val, c.test), seed=c.seed, duplicates=dups)
    counts = sp["split"].value_counts()
    for name, target in zip(SPLITS, (8123, 886, 1006), strict=True):
        assert abs(counts[name] - target) <= 0.01 * target, (name, counts[name])
    overall = sp["label"].value_counts(normalize=True)
    for name in SPLITS:
        share = sp[sp["split"] == name]["label"].value_counts(normalize=True)
        for cls in CLASSES:
            assert abs(share.get(cls, 0) - overall[cls]) <= 0.01, (name, cls)
    assert find_leaks(sp, "lesion_id") == {}
    assert find_duplicate_leaks(sp, dups) == [] and len(dups) == 18
    write_split(sp, tmp_path / "a.csv")
    write_split(make_split(meta, fractions=(c.train, c.val, c.test), seed=c.seed, duplicates=dups), tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert np.isfinite(summary_table(sp).drop(columns="class").to_numpy()).all()
