"""The one screening pipeline (lesionlab.clinic.screening) and the sealed bundle (issue 16, items 1-6)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from helpers import lesion_like, make_tiny_checkpoint, write_study
from PIL import Image, ImageFilter

from lesionlab.clinic.bundle import EnsemblePredictor, make_bundle, verify_bundle
from lesionlab.clinic.screening import refusal_row, screen_table
from lesionlab.exceptions import UserError
from lesionlab.inference.predictor import Predictor
from lesionlab.labels import CLASSES
from lesionlab.study_folder import StudyFolder


def _study_images(trust_study, n=4):
    val = StudyFolder(trust_study).frames(splits=("val",))["val"]
    return [Path(p) for p in val["path"][:n]]


@pytest.fixture(scope="module")
def trust_ens(trust_bundle):
    return EnsemblePredictor(trust_bundle, device="cpu")


@pytest.fixture
def mixed_files(trust_study, tmp_path):
    """Lesion images that pass, and images each refused for another reason, saved losslessly."""
    out = []
    for p in _study_images(trust_study):
        q = tmp_path / f"{p.stem}.png"
        Image.open(p).convert("RGB").save(q)
        out.append(q)
    lesion = Image.open(out[0])
    for name, im in {"blank": Image.new("RGB", (200, 150), (90, 90, 90)),
                     "thumb": lesion.resize((40, 30)),
                     "blurred": lesion.filter(ImageFilter.GaussianBlur(12))}.items():
        im.save(tmp_path / f"{name}.png")
        out.append(tmp_path / f"{name}.png")
    return out


def test_predict_service_and_study_report_give_identical_answers(trust_ens, mixed_files, capsys):
    """Item 1: one pipeline. `lesionlab predict`, the service and the study's refusal table (screen_table, what
    workflows.refusal and benchmarks/bench_ood.py run) answer the same images identically."""
    from lesionlab.cli import main
    from lesionlab.serve.app import create_app

    capsys.readouterr()
    code = main(["predict", *map(str, mixed_files), "--bundle", str(trust_ens.root), "--format", "json",
                 "--device", "cpu", "--engine", "torch",  # the engine the fixture's bundle runs on
                 "--batch-size", "1"])  # as the service: batched convolutions differ in the last bits
    predicted = json.loads(capsys.readouterr().out)
    assert code == 3 and [r["image"] for r in predicted] == [str(p) for p in mixed_files]
    client = TestClient(create_app(trust_ens))
    served = [client.post("/api/predict", files={"image": (p.name, p.read_bytes(), "image/png")}).json()
              for p in mixed_files]
    for p, s in zip(predicted, served, strict=True):
        assert {k: v for k, v in p.items() if k != "image"} == s  # the same answer, field for field
    refusals = screen_table(trust_ens.screener, paths=mixed_files, batch_size=1, research=False, progress=False)
    pd.testing.assert_frame_equal(refusals, pd.DataFrame([refusal_row(a) for a in served]))
    codes = {p.stem: a.get("reason_codes") for p, a in zip(mixed_files, served, strict=True)}
    assert codes["blank"] == ["uniform"] and codes["thumb"] == ["too_small"] and "blurred" in codes["blurred"]
    # the study's refusal report runs the same pipeline: fed the bundle's screener, it refuses what predict refused
    from lesionlab.workflows.refusal import refusal_report

    summary = refusal_report(trust_ens.screener, pd.DataFrame({"path": [str(p) for p in mixed_files]}),
                             mixed_files[0].parent / "ood", n_degraded=2, batch_size=1, progress=False)
    assert summary["test_refused"] == pytest.approx(np.mean([a["status"] != "ok" for a in predicted]))
    # research mode computes OOD scores of refused images but refuses exactly the same ones
    research = screen_table(trust_ens.screener, paths=mixed_files, research=True, progress=False)
    assert list(research["refused"]) == list(refusals["refused"]) and research["ood_score"].notna().all()


def test_a_blank_image_runs_no_model(trust_ens, monkeypatch):
    """Item 2: quality comes first; an image that fails it costs no forward pass."""
    calls = []
    real = Predictor.outputs_batch

    def counting(self, x, **kw):
        calls.append(len(x))
        return real(self, x, **kw)

    monkeypatch.setattr(Predictor, "outputs_batch", counting)
    r = trust_ens.predict([Image.new("RGB", (200, 150), (90, 90, 90))])[0]
    assert r["status"] == "unevaluable" and r["reason_codes"] == ["uniform"] and r["ood_score"] is None
    assert calls == []
    r = trust_ens.predict([Image.new("RGB", (200, 150), (90, 90, 90)), lesion_like(seed=1)])
    assert calls == [1] * len(trust_ens.members)  # only the evaluable image, once per member
    assert r[0]["status"] == "unevaluable"
    r = trust_ens.predict([Image.new("RGB", (200, 150), (90, 90, 90))], research=True)[0]
    assert len(calls) == 2 * len(trust_ens.members) and set(r["research"]["probabilities"]) == set(CLASSES)


def test_the_heatmap_explains_the_class_the_answer_shows(tmp_path, monkeypatch):
    """Item 3: with a TTA bundle the TTA-averaged top class can differ from the plain forward pass's; the service
    and predict explain the class the answer shows, never a class of their own."""
    import lesionlab.explain.gradcam as gradcam
    from lesionlab.serve.app import create_app

    run = make_tiny_checkpoint(tmp_path / "runs" / "a", seed=0)
    make_bundle([run], tmp_path / "tta", threshold=0.3, tta=True, precision="fp32")
    ens = EnsemblePredictor(tmp_path / "tta", device="cpu")
    asked = []
    real = gradcam.explain_image

    def spy(members, image, *, cls=None):
        asked.append(cls)
        return real(members, image, cls=cls)

    monkeypatch.setattr(gradcam, "explain_image", spy)
    im = lesion_like(seed=2)
    buf = tmp_path / "x.png"
    im.save(buf)
    body = TestClient(create_app(ens)).post("/api/predict?explain=true",
                                             files={"image": ("x.png", buf.read_bytes(), "image/png")}).json()
    assert asked == [body["top"]] and body["heatmap_class"] == body["top"]
    from lesionlab.clinic.predict_files import predict_files

    rows = predict_files(ens, [buf], batch_size=1, tta=True, explain_dir=tmp_path / "heat").rows
    assert asked[-1] == rows[0]["top"] and (tmp_path / "heat" / f"x_gradcam_{rows[0]['top']}.png").exists()


def _two_member_study(tmp_path):
    study = tmp_path / "study"
    cks = {n: make_tiny_checkpoint(study / "runs" / n, seed=i) for i, n in enumerate(["a", "b"])}
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    names = {"timm_resnet10t": cks["a"], "timm_resnet10t-2": cks["b"]}
    probs = {n: rng.dirichlet(np.ones(7), size=10) for n in names}
    write_study(study, names, y, probs)
    write_study(study, names, y, {n: rng.dirichlet(np.ones(7), size=10) for n in names}, split="test")
    return study, cks


def test_bundles_carry_the_ensembles_test_metrics_for_any_number_of_members(tmp_path):
    """Item 4: a two-member bundle used to ship `ensemble_test_metrics: null`."""
    study, cks = _two_member_study(tmp_path)
    m = make_bundle([study / "runs"], tmp_path / "b", study=study, ood=False)
    e = m["ensemble_test_metrics"]
    assert e is not None and set(e) >= {"macro", "balanced_accuracy", "MEL"} and 0 <= e["balanced_accuracy"] <= 1
    sf = StudyFolder(study)
    y, probs, _ = sf.probabilities(["timm_resnet10t", "timm_resnet10t-2"], "test")
    from lesionlab.evaluation.metrics import summarize

    assert e["balanced_accuracy"] == pytest.approx(summarize(y, np.mean(list(probs.values()), axis=0))["balanced_accuracy"])


def test_a_member_whose_weights_differ_from_the_studys_is_refused(tmp_path):
    """Item 5: a run retrained or resumed after the study's infer step would ship numbers of other weights."""
    study, cks = _two_member_study(tmp_path)
    make_tiny_checkpoint(cks["b"], seed=7)  # retrained after the study ran inference
    with pytest.raises(UserError, match=r"runs/b/model.safetensors is not the model the study validated"):
        make_bundle([study / "runs"], tmp_path / "b", study=study, ood=False)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.partial-*"))
    # another study's folder: the same refusal
    other, _ = _two_member_study(tmp_path / "o")
    with pytest.raises(UserError, match="is not the model the study validated"):
        make_bundle([other / "runs" / "a", study / "runs" / "b"], tmp_path / "c", study=other, ood=False)


def test_a_bundle_is_built_aside_and_renamed_into_place(tmp_path, monkeypatch):
    """Item 6: a killed `bundle` run leaves no half bundle at --out."""
    import lesionlab.clinic.bundle.build as build

    run = make_tiny_checkpoint(tmp_path / "r", seed=0)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        make_bundle([run], tmp_path / "out", threshold=0.3)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    monkeypatch.undo()
    make_bundle([run], tmp_path / "out", threshold=0.3)
    assert (tmp_path / "out" / "manifest.json").exists()


def test_files_the_manifest_does_not_list_are_never_loaded(tiny_bundle, tmp_path, monkeypatch):
    """Item 6: a stale model.onnx (e.g. from a killed `bundle --onnx`) in a member folder passed verification and
    was run by --engine onnxruntime; now only listed files load and the engine is reported everywhere."""
    pytest.importorskip("onnxruntime")
    from lesionlab.inference import engines
    from lesionlab.serve.app import create_app

    monkeypatch.setenv("LESIONLAB_CACHE", str(tmp_path / "cache"))
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = verify_bundle(b)
    stale = b / m["members"][0]["dir"] / engines.ONNX_FILE
    engines.export_body_onnx(make_tiny_checkpoint_model(seed=99), 64, stale)  # another network's body
    verify_bundle(b)  # hashes of the listed files still match
    ens = EnsemblePredictor(b, device="cpu", precision="fp32", engine="onnxruntime")
    ref = EnsemblePredictor(b, device="cpu", precision="fp32", engine="torch")
    im = lesion_like()
    got, want = ens.predict([im])[0], ref.predict([im])[0]
    np.testing.assert_allclose([got["probabilities"][c] for c in CLASSES], [want["probabilities"][c] for c in CLASSES],
                               atol=1e-4)
    assert got["inference"]["engines"] == {n: "onnxruntime" for n in ens.engines}
    assert want["inference"]["engines"] == {n: "torch" for n in ref.engines}
    assert got["inference"]["threshold_chosen_with"]["engine"] == "torch"
    audit = tmp_path / "audit.jsonl"
    client = TestClient(create_app(ens, audit_log=audit))
    assert client.get("/api/health").json()["inference"]["engines"] == ens.engines
    buf = tmp_path / "x.png"
    im.save(buf)
    client.post("/api/predict", files={"image": ("x.png", buf.read_bytes(), "image/png")})
    assert json.loads(audit.read_text().splitlines()[-1])["engines"] == ens.engines


def make_tiny_checkpoint_model(seed: int):
    import torch

    from lesionlab import models

    torch.manual_seed(seed)
    return models.create_model("timm:resnet10t", pretrained="none")[0].eval()


def test_int8_is_refused_where_it_changes_the_melanoma_flag(tmp_path, monkeypatch):
    """Item 6: an int8 body that keeps top-1 but moves melanoma probabilities across the bundle's threshold is
    not shipped (the old rule looked at top-1 only)."""
    pytest.importorskip("onnxruntime")
    import lesionlab.clinic.bundle.build as build
    from lesionlab.inference import engines

    dest = tmp_path / "bundle" / "members" / "m"
    shutil.copytree(make_tiny_checkpoint(tmp_path / "ck", seed=0), dest)
    engines.export_body_onnx(make_tiny_checkpoint_model(seed=0), 64, dest / engines.ONNX_FILE)
    images = [lesion_like(seed=s) for s in range(8)], [lesion_like(seed=s) for s in range(8, 40)]
    real = build._int8_probs

    def shifted(pr, body, ims, tta):  # same top-1 (MEL stays below the top class), MEL pushed over 0.1
        p = real(pr, body, ims, tta)
        top = p.max(axis=1)
        p[:, 0] = np.where(p.argmax(axis=1) != 0, np.minimum(top * 0.99, 0.5), p[:, 0])
        return p / p.sum(axis=1, keepdims=True)

    monkeypatch.setattr(build, "_int8_probs", shifted)
    ref = Predictor(dest, device="cpu", precision="fp32").predict_images(images[1])
    thr = float(np.median(ref[:, 0]) + 1e-6)
    rec, files = build.int8_members(tmp_path / "bundle", ["m"], images, {"precision": "fp32", "tta": False}, thr, None,
                                    progress=False)["m"]
    assert rec["top1_agreement"] >= 0.99 and rec["melanoma_flag_agreement"] < 0.99
    assert not rec["accepted"] and files == [engines.INT8_RECORD] and not (dest / engines.INT8_FILE).exists()
