"""Label sets end to end: a binary and an isic2019 study on tiny synthetic data -> bundle -> predict."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionlab import labels
from lesionlab.config import load_config
from lesionlab.exceptions import UserError
from lesionlab.workflows import study

TINY = ["synth_images=56", "synth_sources=1", "synth_size=[160,120]", "data.image_size=32", "train.epochs=1",
        "train.max_steps_per_epoch=2", "eval.bootstrap=10", "train.precision=fp32", "data.batch_size=16",
        "data.num_workers=0", "train.archs=[timm:resnet10t,timm:resnet14t]", "explain.gallery=false",
        "robustness.perturbations=[brightness]", "robustness.max_levels=1", "robustness.max_images=8",
        "ood.fit_per_class=4"]


def test_builtin_label_sets_and_their_caveats():
    assert labels.get_label_set(None) is labels.HAM7 and labels.HAM7.classes == labels.CLASSES
    assert labels.ISIC2019.classes == ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    assert labels.BINARY.classes == ("MALIGNANT", "BENIGN")
    # HAM10000's akiec (actinic keratoses and Bowen's disease) maps to AK under isic2019, with the caveat said
    assert labels.ISIC2019.class_of("ham10000", "akiec") == "AK"
    assert any("Bowen" in c and c.startswith("ham10000") for c in labels.ISIC2019.caveats)
    assert labels.HAM7.class_of("isic2019", "SCC") is None  # excluded: ham7 has no invasive SCC class
    assert labels.BINARY.class_of("pad_ufes_20", "ACK") == "MALIGNANT"
    with pytest.raises(KeyError, match="not in label set"):
        labels.HAM7.class_of("ddi", "malignant")
    with pytest.raises(UserError, match="not a label set"):
        labels.get_label_set("nine")


def test_yaml_label_set(tmp_path):
    f = tmp_path / "melnev.yaml"
    f.write_text("classes: [MEL, NEV]\nmap:\n  ham10000: {mel: MEL, nv: NEV, bcc: null}\n"
                 "caveats: ['ham10000: only mel and nv are kept.']\n")
    s = labels.get_label_set(str(f))
    assert s.name == "melnev" and s.flag == "MEL" and s.class_of("ham10000", "NV") == "NEV"
    assert s.class_of("ham10000", "bcc") is None
    assert labels.LabelSet.from_dict(s.to_dict()) == s
    f.write_text("classes: [NEV, MEL]\nflag: MEL\n")
    with pytest.raises(UserError, match="must be the first class"):
        labels.get_label_set(str(f))
    with pytest.raises(UserError, match="trained for 'binary'"):
        labels.check_same_label_set(labels.BINARY, labels.HAM7, "metadata.csv")


def test_old_records_read_as_ham7():
    assert labels.label_set_of({"classes": list(labels.CLASSES)}) is labels.HAM7
    assert labels.label_set_of({"label_set": labels.BINARY.to_dict()}).classes == ("MALIGNANT", "BENIGN")
    with pytest.raises(UserError):
        labels.label_set_of({"classes": ["A", "B"]})


@pytest.fixture(scope="module")
def binary_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("binary") / "study"
    study.run_study(load_config("demo", [*TINY, "data.labels=binary"]), out, progress=False)
    return out


def test_binary_study_bundle_predict(binary_study, tmp_path):
    from lesionlab.clinic.bundle import EnsemblePredictor, make_bundle
    from lesionlab.study_folder import StudyFolder

    sf = StudyFolder(binary_study)
    truth = pd.read_csv(sf.truth_file("test"))
    assert list(truth.columns) == ["image", "MALIGNANT", "BENIGN"]
    m = sf.metrics("ensemble")
    assert m["classes"] == ["MALIGNANT", "BENIGN"] and set(m["per_class"]) == {"MALIGNANT", "BENIGN"}
    meta = sf.model_meta("timm:resnet10t")
    assert meta["classes"] == ["MALIGNANT", "BENIGN"] and meta["label_set"]["name"] == "binary"
    assert json.loads(sf.dataset_file.read_text())["label_set"] == "binary"
    assert "MALIGNANT" in (binary_study / "report.html").read_text()
    assert (binary_study / "robustness").is_dir() and (binary_study / "ood").is_dir()
    runs = [sf.run_dir(a) for a in ("timm:resnet10t", "timm:resnet14t")]
    manifest = make_bundle(runs, tmp_path / "bundle", threshold=0.4, ood=False)
    assert manifest["classes"] == ["MALIGNANT", "BENIGN"] and manifest["label_set"]["name"] == "binary"
    ens = EnsemblePredictor(tmp_path / "bundle", device="cpu")
    img = Image.open(sorted((binary_study / "data").rglob("*.jpg"))[0]).convert("RGB")
    r = ens.predict([img], research=True)[0]
    r = r.get("research", r)  # research mode shows the diagnosis even where the gate refuses the image
    assert set(r["probabilities"]) == {"MALIGNANT", "BENIGN"} and r["label_set"] == "binary"
    assert r["flag_class"] == "MALIGNANT" and r["melanoma_probability"] is None
    assert r["top_name"] in ("Malignant or pre-malignant", "Benign")
    ens.check_labels("binary", "data")
    with pytest.raises(UserError, match="trained for 'binary'"):
        ens.check_labels("ham7", "metadata.csv")
    with pytest.raises(UserError, match="class columns"):
        ens.check_truth_columns(["image", *labels.CLASSES], "truth.csv")

    # ... and through the service: health names the set, the answer (JSON and FHIR) is in its classes
    import io

    from fastapi.testclient import TestClient

    from lesionlab.serve.app import create_app

    c = TestClient(create_app(ens, audit_log=None))
    h = c.get("/api/health").json()
    assert h["label_set"] == "binary" and h["flag_class"] == "MALIGNANT"
    assert [k["code"] for k in h["classes"]] == ["MALIGNANT", "BENIGN"]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    a = c.post("/api/predict?research=true", files={"image": ("x.png", buf.getvalue(), "image/png")})
    assert a.status_code == 200, a.text
    body = a.json().get("research", a.json())
    assert set(body["probabilities"]) == {"MALIGNANT", "BENIGN"} and body["label_set"] == "binary"
    fhir = c.post("/api/predict?format=fhir", files={"image": ("x.png", buf.getvalue(), "image/png")})
    assert fhir.status_code == 200 and fhir.json()["resourceType"] == "Bundle"


def test_isic2019_study_classes(tmp_path):
    out = tmp_path / "study"
    cfg = load_config("demo", [*TINY, "data.labels=isic2019", "train.archs=[timm:resnet10t]",
                               "robustness.enabled=false", "ood.method=none", "synth_size=[64,48]"])
    study.run_study(cfg, out, progress=False)
    truth = pd.read_csv(out / "predictions" / "truth_test.csv")
    assert list(truth.columns) == ["image", *labels.ISIC2019.classes]
    assert truth["SCC"].sum() == 0 and np.allclose(truth.iloc[:, 1:].sum(axis=1), 1)
    summary = pd.read_csv(out / "split_summary.csv")
    assert "AK" in set(summary["class"]) and "AKIEC" not in set(summary["class"])
