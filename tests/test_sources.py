"""Loaders for the public layouts (fixtures generated in each), leaky columns, several sources, skin tone."""

import numpy as np
import pandas as pd
import pytest
from layout_fixtures import BUILDERS
from PIL import Image

from lesionlab.data.metadata import MetadataEncoding
from lesionlab.data.multi import cross_source_duplicates, hamming, read_sources
from lesionlab.data.split import check_split, make_split
from lesionlab.data.tables import read_table
from lesionlab.data.validation import validate
from lesionlab.evaluation.subgroups import subgroup_columns
from lesionlab.exceptions import UserError


@pytest.mark.parametrize("layout", sorted(BUILDERS))
def test_each_layout_is_detected_and_read(layout, tmp_path):
    root = BUILDERS[layout](tmp_path / layout)
    labels = "ham7" if layout not in ("fitzpatrick17k", "ddi") else "binary"
    t = read_table(root, labels=labels)
    assert t.layout == layout
    df = t.df
    assert {"image_id", "lesion_id", "dx", "label", "image_type", "source", "path"} <= set(df.columns)
    assert (df["path"] != "").all(), df[["image_id", "path"]]
    rep = validate(t, progress=False)
    assert rep.ok, rep.summary()
    assert t.leaky  # every layout names the columns that give its label away


def test_layout_specifics(tmp_path):
    # ISIC 2019: one-hot decoded; SCC kept under isic2019, left out (excluded) under ham7; lesion ids group
    r = BUILDERS["isic2019"](tmp_path / "i19")
    t = read_table(r, labels="isic2019")
    assert t.df.set_index("image_id")["label"].to_dict()["ISIC_0000003"] == "SCC"
    h = read_table(r, labels="ham7")
    assert h.df["excluded"].sum() == 2  # SCC and UNK
    assert "leaves out 2 images" in " ".join(validate(h, progress=False).notes)
    assert t.df["lesion_id"].iloc[1] == t.df["lesion_id"].iloc[2] and t.df["group_by"].iloc[5] == "image"
    # ISIC 2020: patient id is the strongest id; benign_malignant and diagnosis leak the label
    t = read_table(BUILDERS["isic2020"](tmp_path / "i20"), labels="binary")
    assert set(t.df["group_by"]) == {"patient"} and {"benign_malignant", "diagnosis", "target"} <= set(t.leaky)
    assert t.df["label"].tolist() == ["MALIGNANT", "BENIGN", "BENIGN", "BENIGN"]
    # PH2: clinical diagnosis codes 0/1/2, BMP images
    t = read_table(BUILDERS["ph2"](tmp_path / "ph2"))
    assert t.df["label"].tolist() == ["NV", "NV", "MEL"] and t.df["path"].str.endswith(".bmp").all()
    # Derm7pt: a clinical and a dermoscopic image per case, one lesion; its published split kept
    t = read_table(BUILDERS["derm7pt"](tmp_path / "d7"))
    assert sorted(t.df["image_type"].unique()) == ["clinical", "dermoscopic"]
    assert t.df.groupby("lesion_id").size().tolist() == [2, 2, 2]
    assert t.df["published_split"].tolist()[:2] == ["train", "train"] and "management" in t.leaky
    # PAD-UFES-20: biopsed leaks the label; Fitzpatrick type found; clinical photos
    t = read_table(BUILDERS["pad_ufes_20"](tmp_path / "pad"), labels="isic2019")
    assert "biopsed" in t.leaky and t.skin_tone == "fitspatrick" and set(t.df["image_type"]) == {"clinical"}
    assert set(t.df["label"]) == {"AK", "BCC", "MEL", "NV", "SCC", "BKL"}
    # Fitzpatrick17k: -1 is no type; non-neoplastic left out under binary
    t = read_table(BUILDERS["fitzpatrick17k"](tmp_path / "f17"), labels="binary")
    assert t.df["fitzpatrick_scale"].tolist()[2] == "" and t.df["excluded"].tolist() == [False, False, True, False]
    # DDI under ham7: a named problem, not a crash
    t = read_table(BUILDERS["ddi"](tmp_path / "ddi"))
    rep = validate(t, progress=False)
    assert rep.counts() == {"unknown dx code": 4} and "not in label set 'ham7'" in rep.summary()


def test_a_model_never_sees_a_leaky_column(tmp_path):
    t = read_table(BUILDERS["pad_ufes_20"](tmp_path / "pad"))
    MetadataEncoding.fit(t.df, ["age", "region"])
    for col in ("biopsed", "diagnostic", "dx", "benign_malignant", "lesion_id"):
        with pytest.raises(UserError, match="gives the label away"):
            MetadataEncoding.fit(t.df, [col])


def test_several_sources_split_and_duplicates(tmp_path):
    a = BUILDERS["isic2019"](tmp_path / "a")
    b = BUILDERS["isic2020"](tmp_path / "b")
    # one image of b is a re-encoded, resized copy of one of a (another name): found by perceptual hash
    Image.open(a / "ISIC_2019_Training_Input" / "ISIC_0000001.jpg").resize((80, 60)).save(
        b / "jpeg" / "train" / "ISIC_9001.jpg", quality=90)
    # and one has the same file id in both sources
    c = tmp_path / "c"
    (c / "imgs").mkdir(parents=True)
    Image.open(a / "ISIC_2019_Training_Input" / "ISIC_0000000.jpg").save(c / "imgs" / "ISIC_0000000.jpg")
    pd.DataFrame({"lesion_id": ["L1"], "image_id": ["ISIC_0000000"], "dx": ["mel"]}).to_csv(
        c / "HAM10000_metadata.csv", index=False)
    t = read_sources([{"data": a}, {"data": b}, {"data": c, "name": "ham"}], labels="binary")
    assert t.layout == "multi" and [s["name"] for s in t.sources] == ["a", "b", "ham"]
    assert t.sources[2]["duplicate_ids"] == 1 and "ISIC_0000000" in set(t.df["image_id"])
    assert t.df["lesion_id"].str.startswith(("a/", "b/")).all()
    df = t.df[t.df["label"] != ""].reset_index(drop=True)
    pairs = cross_source_duplicates(df)
    assert ("ISIC_0000001", "ISIC_9001") in set(zip(pairs["from_img"], pairs["to_img"], strict=True))
    sp = make_split(df, fractions=(0.5, 0.25, 0.25), seed=0, duplicates=pairs)
    where = dict(zip(sp["image_id"], sp["split"], strict=True))
    assert where["ISIC_0000001"] == where["ISIC_9001"] and not check_split(sp, pairs)
    # read_table with a list of folders is the same union (`--data` given twice)
    assert len(read_table([a, b], labels="binary").df) == len(read_sources([{"data": a}, {"data": b}],
                                                                            labels="binary").df)


def test_hamming_against_python_popcount():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, 20, dtype=np.int64).astype(np.uint64)
    b = rng.integers(0, 2**63, 15, dtype=np.int64).astype(np.uint64)
    want = np.array([[bin(int(x) ^ int(y)).count("1") for y in b] for x in a])
    np.testing.assert_array_equal(hamming(a, b), want)


def test_skin_tone_is_a_default_subgroup(tmp_path):
    for layout, col in (("pad_ufes_20", "fitspatrick"), ("fitzpatrick17k", "fitzpatrick_scale"), ("ddi", "skin_tone")):
        t = read_table(BUILDERS[layout](tmp_path / layout), labels="binary")
        assert col in subgroup_columns(t.df), layout
    t = read_table(BUILDERS["derm7pt"](tmp_path / "d7"))
    cols = subgroup_columns(t.df)
    assert "image_type" in cols and "source" not in cols  # one source: no source subgroup


def test_two_source_study_reports_the_duplicates(tmp_path):
    """Two HAM-layout sources in one study (config `sources`): one image of B is A's, renamed; the study finds it by
    perceptual hash, keeps the pair in one split and says so in the report's leakage section."""
    import json
    import shutil

    from lesionlab.config import load_config
    from lesionlab.data.synth import make_synthetic
    from lesionlab.workflows import study

    a, b = tmp_path / "A", tmp_path / "B"
    make_synthetic(a, n_images=28, seed=1, size=(48, 36), progress=False)
    make_synthetic(b, n_images=28, seed=2, size=(48, 36), progress=False)
    meta = pd.read_csv(b / "HAM10000_metadata.csv", dtype=str)
    for f in b.rglob("ISIC_*.jpg"):  # B's own file ids, so only the copy below is shared
        f.rename(f.with_name(f.name.replace("ISIC_", "B_")))
    meta["image_id"] = meta["image_id"].str.replace("ISIC_", "B_")
    meta["lesion_id"] = meta["lesion_id"].str.replace("HAM_", "BL_")
    src = next(a.rglob("ISIC_*.jpg"))
    a_meta = pd.read_csv(a / "HAM10000_metadata.csv", dtype=str).set_index("image_id")
    shutil.copy(src, next(b.rglob("B_*.jpg")).parent / "B_copy.jpg")
    meta = pd.concat([meta, pd.DataFrame([{**a_meta.loc[src.stem].to_dict(), "image_id": "B_copy",
                                           "lesion_id": "BL_copy"}])], ignore_index=True)
    meta.to_csv(b / "HAM10000_metadata.csv", index=False)
    out = tmp_path / "study"
    cfg = load_config("demo", ["data.image_size=32", "train.epochs=1", "train.max_steps_per_epoch=1",
                               "eval.bootstrap=5", "train.precision=fp32", "data.num_workers=0",
                               "train.archs=[timm:resnet10t]", "explain.gallery=false", "robustness.enabled=false",
                               "ood.method=none", "data.labels=binary", "cross_site.enabled=false",
                               f"sources=[{{name: A, data: {a}}}, {{name: B, data: {b}}}]"])
    study.run_study(cfg, out, progress=False)
    pairs = pd.read_csv(out / "cross_source_duplicates.csv", dtype=str)
    assert (src.stem, "B_copy") in set(zip(pairs["from_img"], pairs["to_img"], strict=True))
    sp = pd.read_csv(out / "splits.csv", dtype=str).set_index("image_id")["split"]
    assert sp[src.stem] == sp["B_copy"]
    assert set(pd.read_csv(out / "splits.csv", dtype=str)["lesion_id"].str[:2]) == {"A/", "B/"}
    assert [s["name"] for s in json.loads((out / "dataset.json").read_text())["sources"]] == ["A", "B"]
    html = (out / "report.html").read_text()
    assert "images in two sources" in html and "perceptual hash" in html
