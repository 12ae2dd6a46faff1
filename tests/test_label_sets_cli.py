"""Label sets end to end through the command line (issue 18 part 1): a tiny binary study made by `lesionlab study`
-> `lesionlab bundle` -> `lesionlab predict` (answers in the binary classes; a --metadata table of another label set
refused) -> `lesionlab evaluate-external` (binary ground truth evaluated, ham7 ground truth refused in one line);
`validate --labels`, `infer` and `explain` in the models' classes; the image formats the public layouts ship."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from corpus import make_dicom
from helpers import lesion_like

from lesionlab.cli.main import main
from lesionlab.labels import BINARY, CLASSES

# a binary study at its smallest: one tiny architecture, 32 px, one epoch of two steps, no robustness / OOD / gallery
STUDY_SETS = ["synth_images=56", "synth_sources=1", "synth_size=[160,120]", "data.image_size=32", "train.epochs=1",
              "train.max_steps_per_epoch=2", "eval.bootstrap=10", "train.precision=fp32", "data.batch_size=16",
              "data.num_workers=0", "train.archs=[timm:resnet10t]", "explain.gallery=false",
              "robustness.enabled=false", "ood.method=none", "reader_study.simulate=false", "data.labels=binary"]


TORCH = ["--device", "cpu", "--engine", "torch"]  # the auto engine's one-off timing is not under test here


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def binary_cli(tmp_path_factory) -> dict[str, Path]:
    """The study and its bundle, both made through the CLI."""
    root = tmp_path_factory.mktemp("binary_cli")
    study, bundle = root / "study", root / "bundle"
    args = ["study", "--config", "demo", *[x for s in STUDY_SETS for x in ("--set", s)], "--out", str(study)]
    assert main(args) == 0
    assert main(["bundle", "--runs", str(study / "runs"), "--study", str(study), "--out", str(bundle)]) == 0
    return {"root": root, "study": study, "bundle": bundle, "data": study / "data"}


def test_bundle_records_the_binary_label_set_and_carries_its_card(binary_cli):
    manifest = json.loads((binary_cli["bundle"] / "manifest.json").read_text())
    assert manifest["classes"] == ["MALIGNANT", "BENIGN"] and manifest["label_set"]["name"] == "binary"
    assert sorted(manifest["model_card"]) == ["model_card.html", "model_card.json", "model_card.md"]
    card = json.loads((binary_cli["bundle"] / "model_card.json").read_text())
    assert card["model"]["label_set"] == "binary" and card["model"]["classes"] == ["MALIGNANT", "BENIGN"]
    # synthetic images: no third-party licence, so no warning
    assert card["licences"]["warning"] is None and manifest["data_licences"][0]["commercial_use"] == "allowed"


def test_predict_answers_in_the_bundles_classes(binary_cli, capsys):
    images = sorted(binary_cli["data"].rglob("*.jpg"))[:2]
    capsys.readouterr()
    rc = main(["predict", *map(str, images), "--bundle", str(binary_cli["bundle"]), "--format", "json",
               *TORCH, "--research"])
    assert rc in (0, 3)
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2
    for row in rows:
        r = row.get("research", row)  # research mode: the diagnosis even where the gate refuses the image
        assert row["image"] in map(str, images)
        assert r["label_set"] == "binary" and r["classes"] == ["MALIGNANT", "BENIGN"]
        assert set(r["probabilities"]) == {"MALIGNANT", "BENIGN"} and r["flag_class"] == "MALIGNANT"
        assert 0 <= r["flag_probability"] <= 1 and isinstance(r["flagged"], bool)
        assert r["melanoma_probability"] is None  # the flag class is not melanoma


def test_predict_checks_a_metadata_table_against_the_bundles_label_set(binary_cli, tmp_path, capsys):
    image = sorted(binary_cli["data"].rglob("*.jpg"))[0]
    bundle = str(binary_cli["bundle"])
    # HAM10000 metadata: binary maps every ham10000 code, as in training, so it is accepted
    ham = binary_cli["data"] / "HAM10000_metadata.csv"
    assert main(["predict", str(image), "--bundle", bundle, "--metadata", str(ham), *TORCH,
                 "--format", "json"]) in (0, 3)
    capsys.readouterr()
    # ISIC one-hot ground truth in ham7's classes: another label set, refused in one line
    onehot = tmp_path / "truth_ham7.csv"
    pd.DataFrame({"image": [image.stem], **{c: [float(c == "NV")] for c in CLASSES}}).to_csv(onehot, index=False)
    assert main(["predict", str(image), "--bundle", bundle, "--metadata", str(onehot), *TORCH]) == 2
    err = _one_line_error(capsys)
    assert str(onehot) in err and "class columns MEL, NV" in err and "'binary'" in err
    # a HAM10000-layout table labelled with isic2019's classes (SCC): named as such
    odd = tmp_path / "meta.csv"
    odd.write_text(f"lesion_id,image_id,dx\nL1,{image.stem},nv\nL2,x,scc\n")
    assert main(["predict", str(image), "--bundle", bundle, "--metadata", str(odd), *TORCH]) == 2
    err = _one_line_error(capsys)
    assert str(odd) in err and "uses label set 'isic2019'" in err and "trained for 'binary'" in err
    # a code no label set knows: the row is named
    odd.write_text(f"lesion_id,image_id,dx\nL1,{image.stem},nv\nL2,x,xyz\n")
    assert main(["predict", str(image), "--bundle", bundle, "--metadata", str(odd), *TORCH]) == 2
    err = _one_line_error(capsys)
    assert str(odd) in err and "row 3" in err and "'xyz'" in err and "'binary'" in err


def test_metadata_table_of_another_label_set_names_both(binary_cli, tmp_path):
    """A YAML label set that maps only mel/nv: a HAM10000 table with bcc fits ham7, and the refusal says so."""
    from lesionlab.clinic.predict_files import check_metadata_labels
    from lesionlab.exceptions import UserError
    from lesionlab.labels import get_label_set

    class _Bundle:  # what check_metadata_labels needs of an EnsemblePredictor: the label set and its checks
        root = binary_cli["bundle"]
        label_set = get_label_set(str(_yaml(tmp_path)))

        def check_labels(self, labels, what):
            from lesionlab.labels import check_same_label_set

            check_same_label_set(self.label_set, labels, what)

    meta = tmp_path / "HAM10000_metadata.csv"
    meta.write_text("lesion_id,image_id,dx\nL1,a,mel\nL2,b,bcc\n")
    with pytest.raises(UserError, match=r"uses label set 'ham7'.*trained for 'melnev'"):
        check_metadata_labels(_Bundle(), meta)
    meta.write_text("lesion_id,image_id,dx\nL1,a,mel\nL2,b,nv\n")
    check_metadata_labels(_Bundle(), meta)  # every code mapped: accepted


def _yaml(tmp_path: Path) -> Path:
    f = tmp_path / "melnev.yaml"
    f.write_text("classes: [MEL, NEV]\nmap:\n  ham10000: {mel: MEL, nv: NEV}\n")
    return f


def _truth(binary_cli, classes: tuple[str, ...], path: Path) -> Path:
    """Ground truth for the study's test images in `classes` (the binary study's own truth, or one-hot NV)."""
    truth = pd.read_csv(binary_cli["study"] / "predictions" / "truth_test.csv")
    if list(classes) == list(BINARY.classes):
        truth.to_csv(path, index=False)
    else:
        pd.DataFrame({"image": truth["image"], **{c: [float(c == "NV")] * len(truth) for c in classes}}).to_csv(
            path, index=False)
    return path


def test_evaluate_external_in_the_models_label_set(binary_cli, tmp_path, capsys):
    runs, images = str(binary_cli["study"] / "runs"), str(binary_cli["data"])
    truth = _truth(binary_cli, BINARY.classes, tmp_path / "truth_binary.csv")
    sets = ["--set", "eval.bootstrap=5", "--set", "train.device=cpu", "--set", "data.num_workers=0"]
    assert main(["evaluate-external", "--config", "demo", *sets, "--runs", runs, "--images", images,
                 "--truth", str(truth), "--out", str(tmp_path / "ext")]) == 0
    summary = json.loads((tmp_path / "ext" / "summary.json").read_text())
    assert summary["label_set"] == "binary" and summary["classes"] == ["MALIGNANT", "BENIGN"]
    assert summary["flag_class"] == "MALIGNANT" and summary["n"] == len(pd.read_csv(truth))
    pred = next((tmp_path / "ext" / "predictions").glob("*_external.csv"))
    assert list(pd.read_csv(pred).columns) == ["image", "MALIGNANT", "BENIGN"]
    capsys.readouterr()
    ham7 = _truth(binary_cli, CLASSES, tmp_path / "truth_ham7.csv")
    assert main(["evaluate-external", "--config", "demo", *sets, "--runs", runs, "--images", images,
                 "--truth", str(ham7), "--out", str(tmp_path / "ext7")]) == 2
    err = _one_line_error(capsys)
    assert str(ham7) in err and "label set 'ham7'" in err and "trained for label set 'binary'" in err
    assert not (tmp_path / "ext7" / "summary.json").exists()


def test_validate_infer_and_explain_follow_the_label_set(binary_cli, tmp_path, capsys):
    data = str(binary_cli["data"])
    assert main(["validate", "--data", data, "--labels", "binary", "--no-image-check"]) == 0
    assert "label set binary (MALIGNANT, BENIGN)" in capsys.readouterr().out
    assert main(["validate", "--data", data, "--labels", "nine", "--no-image-check"]) == 2
    assert "not a label set" in _one_line_error(capsys)
    # infer reads the data in the models' label set and writes their classes
    run = str(binary_cli["study"] / "runs")
    assert main(["infer", "--data", data, "--run", run, "--out", str(tmp_path / "pred.csv"), *TORCH]) == 0
    assert list(pd.read_csv(tmp_path / "pred.csv").columns) == ["image", "MALIGNANT", "BENIGN"]
    truth = pd.read_csv(tmp_path / "pred_truth.csv")
    assert list(truth.columns) == ["image", "MALIGNANT", "BENIGN"] and np.allclose(truth.iloc[:, 1:].sum(axis=1), 1)
    # explain: --class is one of the members' classes, in any case
    image = str(sorted(binary_cli["data"].rglob("*.jpg"))[0])
    capsys.readouterr()
    assert main(["explain", image, "--run", run, "--class", "malignant", "--out", str(tmp_path / "cam"),
                 "--device", "cpu"]) == 0
    assert "MALIGNANT" in capsys.readouterr().out and any((tmp_path / "cam").iterdir())
    assert main(["explain", image, "--run", run, "--class", "MEL", "--out", str(tmp_path / "cam2"),
                 "--device", "cpu"]) == 2
    assert "MALIGNANT, BENIGN" in _one_line_error(capsys)


def test_split_and_train_take_the_label_set_from_the_config(capsys):
    for cmd in ("split", "train", "study"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "data.labels" in capsys.readouterr().out
    for cmd in ("infer", "evaluate-external"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "label set the models were trained for" in " ".join(capsys.readouterr().out.split())


def test_split_tables_are_read_in_the_label_set_train_infer_and_robustness_use(binary_cli):
    """`train`, `infer --split` and `robustness` read the dataset through `load_split_tables` in their label set."""
    from lesionlab.data.subsets import load_split_tables

    study = binary_cli["study"]
    table, sp, _ = load_split_tables(study / "data", None, study / "splits.csv", labels="binary")
    assert set(table.df["label"]) == {"MALIGNANT", "BENIGN"} and len(sp) == len(table.df)
    ham7, _, _ = load_split_tables(study / "data", None, study / "splits.csv")
    assert set(ham7.df["label"]) <= set(CLASSES)


def test_public_layout_image_formats_are_found_and_decoded(tmp_path):
    """PH2 ships BMP, ISIC 2020 DICOM; TIFF and WebP are common exports: each is found by its id and decoded."""
    from lesionlab.data.images import IMAGE_SUFFIXES, decode_input, find_images

    assert {".bmp", ".tif", ".tiff", ".webp", ".dcm", ".jpg", ".jpeg", ".png"} <= set(IMAGE_SUFFIXES)
    img = lesion_like(96, 72, seed=1)
    for suffix, fmt in ((".bmp", "BMP"), (".tif", "TIFF"), (".tiff", "TIFF"), (".webp", "WEBP"), (".png", "PNG")):
        img.save(tmp_path / f"im_{suffix[1:]}{suffix}", format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    (tmp_path / "im_dcm.dcm").write_bytes(make_dicom(pixels=np.asarray(img)))
    (tmp_path / "IM_UPPER.BMP").write_bytes((tmp_path / "im_bmp.bmp").read_bytes())
    found = find_images(tmp_path)
    assert set(found) == {"im_bmp", "im_tif", "im_tiff", "im_webp", "im_png", "im_dcm", "IM_UPPER"}
    for key, path in found.items():
        d = decode_input(io.BytesIO(path.read_bytes()), name=str(path))
        assert d.image.size == (96, 72) and d.image.mode == "RGB", key
        if key != "im_dcm":  # DICOM's pixels pass through a colour transform; the lossless formats are exact
            assert np.array_equal(np.asarray(d.image), np.asarray(img)), key


def test_layout_licences_come_from_the_one_licence_table():
    from lesionlab.data.licences import LICENCES
    from lesionlab.data.sources import LAYOUTS

    for name, lay in LAYOUTS.items():
        assert lay.licence == LICENCES[name].licence, name
    assert LAYOUTS["ham10000"].licence == "CC BY-NC 4.0"
