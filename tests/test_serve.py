"""The web service: predictions, explanations, privacy, audit log and every kind of bad input."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lesionlab.clinic.bundle import EnsemblePredictor
from lesionlab.serve.app import create_app


@pytest.fixture(scope="module")
def ens(tiny_bundle):
    return EnsemblePredictor(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def client(ens, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    app = create_app(ens, max_upload_mb=2, max_pixels=4_000_000, audit_log=audit)
    c = TestClient(app)
    c.audit = audit
    return c


def _bytes(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _post(client, data: bytes, name="x.jpg", params=""):
    return client.post(f"/api/predict{params}", files={"image": (name, data, "application/octet-stream")})


def test_health_and_page(client):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and len(h["members"]) == 2 and h["melanoma_threshold"] == 0.15
    page = client.get("/")
    assert page.status_code == 200 and "Decision support, not a diagnosis" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # works offline: no CDN
    assert client.get("/openapi.json").json()["paths"]["/api/predict"]


def test_predict_and_explain(client):
    from helpers import lesion_like

    im = lesion_like(150, 100)
    r = _post(client, _bytes(im))
    assert r.status_code == 200
    body = r.json()
    assert set(body["probabilities"]) == {"MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"}
    assert body["status"] == "ok" and body["calibrated"] is False and body["differential"] is None  # no study
    assert body["melanoma_flag"] == (body["melanoma_probability"] >= body["melanoma_threshold"])
    assert "heatmap" not in body and "not a diagnosis" in body["disclaimer"]
    r = _post(client, _bytes(im), params="?explain=true")
    assert r.json()["heatmap"].startswith("data:image/png;base64,") and r.json()["heatmap_class"] == r.json()["top"]


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("I;16", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG")])
def test_unusual_modes_are_converted(client, mode, fmt):
    im = Image.new(mode, (64, 48))
    assert _post(client, _bytes(im, fmt), name=f"x.{fmt.lower()}").status_code == 200


def test_exif_rotation_is_applied(client):
    exif = Image.Exif()
    exif[0x0112] = 6
    r = _post(client, _bytes(Image.new("RGB", (120, 60), (100, 50, 40)), exif=exif))
    assert r.status_code == 200 and r.json()["image_size"] == [60, 120]


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_bad_inputs_get_4xx_json_and_the_server_keeps_serving(client):
    good = _bytes(Image.fromarray(np.random.default_rng(2).integers(0, 255, (150, 200, 3), dtype=np.uint8)))
    cases = {
        "not an image": (b"hello, this is text", 415),
        "truncated": (good[: len(good) // 2], 400),
        "empty": (b"", 400),
        "enormous dims": (_png_header_only(100_000, 100_000), 413),
        "over pixel limit": (_bytes(Image.new("RGB", (2100, 2000)), "PNG"), 413),
        "over size limit": (np.random.default_rng(0).bytes(3 * 2**20), 413),
    }
    for name, (data, status) in cases.items():
        r = _post(client, data)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"], name
    assert client.post("/api/predict").status_code == 422  # missing field: FastAPI's JSON validation error
    assert client.get("/api/health").json()["status"] == "ok"
    assert _post(client, good).status_code == 200


def test_audit_log_has_hash_and_outputs_but_no_image(client):
    import hashlib

    from helpers import lesion_like

    data = _bytes(lesion_like(seed=5))
    small = _bytes(Image.new("RGB", (64, 48), (10, 200, 30)))
    _post(client, data, name="patient_smith.jpg")
    _post(client, small, name="patient_smith_2.jpg")
    lines = [json.loads(x) for x in client.audit.read_text().splitlines()]
    rec = [x for x in lines if x.get("image_sha256") == hashlib.sha256(data).hexdigest()][-1]
    assert rec["status"] == "ok" and "probabilities" in rec and "bundle_version" in rec and "time" in rec
    rec = [x for x in lines if x.get("image_sha256") == hashlib.sha256(small).hexdigest()][-1]
    assert rec["status"] == "unevaluable" and rec["reasons"] == ["too_small"] and "probabilities" not in rec
    text = client.audit.read_text()
    assert "patient_smith" not in text and len(text) < 100_000
    assert any(x["status"] == "rejected" for x in lines)


def test_uploads_are_not_spooled_to_disk(ens, monkeypatch):
    import starlette.formparsers as fp

    rolled = []

    class Recording(fp.SpooledTemporaryFile):
        def rollover(self):
            rolled.append(True)
            super().rollover()

    monkeypatch.setattr(fp, "SpooledTemporaryFile", Recording)
    client = TestClient(create_app(ens, max_upload_mb=20))
    big = _bytes(Image.fromarray(np.random.default_rng(1).integers(0, 255, (900, 1200, 3), dtype=np.uint8)), "PNG")
    assert len(big) > 2**20  # larger than Starlette's default 1 MB spool threshold
    assert _post(client, big, name="big.png").status_code == 200
    assert not rolled


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_concurrent_predictions_and_explanations_match_serial_ones(tmp_path):
    """8 clients x 4 mixed predict/explain requests at fp32 (where predictions use the very module that
    Grad-CAM hooks) against uvicorn on 127.0.0.1: every heatmap and probability equals the serial one."""
    import threading
    import time

    import httpx
    import uvicorn
    from helpers import make_tiny_checkpoint

    from lesionlab.clinic.bundle import make_bundle

    runs = [make_tiny_checkpoint(tmp_path / "runs" / f"m{i}", seed=i) for i in range(2)]
    make_bundle(runs, tmp_path / "bundle", threshold=0.15, precision="fp32")
    app = create_app(tmp_path / "bundle", device="cpu", precision="fp32")
    ens = app.state.ensemble
    assert ens.precision == "fp32" and not any(m.cpu_bf16 for m in ens.members)
    # A 20 ms pause in every forward pass (sleeping releases the GIL) stands in for a bigger model: passes
    # overlap reliably on any machine, so the old shared-module hooks mixed up 3-6 of 16 heatmaps here.
    for m in ens.members:
        m.model.get_submodule("layer1").register_forward_pre_hook(lambda mod, inp: time.sleep(0.02))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        url = f"http://127.0.0.1:{server.config.port}/api/predict"
        rng = np.random.default_rng(0)
        images = [_bytes(Image.fromarray(rng.integers(0, 255, (150 + 10 * k, 200, 3), dtype=np.uint8)), "PNG")
                  for k in range(4)]

        def post(i: int, explain: bool) -> dict:
            r = httpx.post(url + ("?explain=true" if explain else ""), files={"image": ("x.png", images[i])},
                           timeout=120)
            assert r.status_code == 200, r.text
            return r.json()

        serial = [post(i, True) for i in range(4)]
        results: dict[tuple[int, int], tuple[int, bool, dict]] = {}
        errors: list[BaseException] = []

        def client(k: int) -> None:
            try:
                for r in range(4):
                    i, explain = (k + r) % 4, (k + r) % 2 == 0
                    results[(k, r)] = (i, explain, post(i, explain))
            except BaseException as e:  # surfaced below; a thread's exception would otherwise vanish
                errors.append(e)

        clients = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
    finally:
        server.should_exit = True
        thread.join(30)
    assert not errors, errors
    assert len(results) == 32
    mixed_up = 0
    for i, explain, body in results.values():
        assert body["probabilities"] == serial[i]["probabilities"]
        if explain:
            mixed_up += body["heatmap"] != serial[i]["heatmap"] or body["heatmap_class"] != serial[i]["heatmap_class"]
    assert mixed_up == 0, f"{mixed_up} of 16 concurrent heatmaps differ from the serial ones"


def test_requests_for_other_settings_than_the_bundles_are_refused(client):
    h = client.get("/api/health").json()
    # tiny_bundle: threshold given by hand, no TTA stated, precision not stated
    assert h["inference"]["tta"] is False and h["inference"]["threshold_chosen_with"] == {"tta": False, "precision": None, "engine": "torch"}
    assert "precision was not stated" in h["inference"]["note"]
    im = _bytes(Image.new("RGB", (90, 60), (150, 90, 70)))
    r = _post(client, im, params="?tta=true")
    assert r.status_code == 400 and "TTA off" in r.json()["error"] and "TTA on was asked for" in r.json()["error"]
    r = _post(client, im, params="?tta=false")
    assert r.status_code == 200 and r.json()["inference"]["tta"] is False


def test_service_runs_a_bundle_at_its_recorded_settings(tmp_path):
    import shutil

    from helpers import make_tiny_checkpoint

    from lesionlab.clinic.bundle import make_bundle
    from lesionlab.exceptions import UserError

    runs = [make_tiny_checkpoint(tmp_path / "runs" / "m0", seed=0)]
    make_bundle(runs, tmp_path / "tta", threshold=0.2, tta=True, precision="fp32")
    c = TestClient(create_app(tmp_path / "tta", device="cpu"))
    h = c.get("/api/health").json()["inference"]
    assert h == {"tta": True, "precision": "fp32", "engines": {"timm_resnet10t": "torch"},
                 "precisions": {"timm_resnet10t": "fp32"},
                 "threshold_chosen_with": {"tta": True, "precision": "fp32", "engine": "torch"}, "note": None}
    im = _bytes(Image.new("RGB", (90, 60), (150, 90, 70)))
    assert _post(c, im).json()["inference"]["tta"] is True  # TTA on by default: the bundle's setting
    r = _post(c, im, params="?tta=false")
    assert r.status_code == 400 and "TTA on at fp32" in r.json()["error"]
    with pytest.raises(UserError, match="--precision bf16: .*chosen with TTA on at fp32"):
        create_app(tmp_path / "tta", device="cpu", precision="bf16")
    # a bundle made before the settings were recorded: TTA assumed off, precision unknown, said so
    shutil.copytree(tmp_path / "tta", tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del manifest["inference"]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    c = TestClient(create_app(tmp_path / "old", device="cpu", precision="fp32"))
    h = c.get("/api/health").json()["inference"]
    assert h["threshold_chosen_with"] == {"tta": False, "precision": None, "engine": "torch"}
    assert "before inference settings" in h["note"]
    assert _post(c, im, params="?tta=true").status_code == 400 and _post(c, im).status_code == 200


def test_serve_cli_refuses_another_precision_in_one_line(tmp_path, capsys):
    from helpers import make_tiny_checkpoint

    from lesionlab.cli import main
    from lesionlab.clinic.bundle import make_bundle

    make_bundle([make_tiny_checkpoint(tmp_path / "runs" / "m0", seed=0)], tmp_path / "b", threshold=0.2,
                precision="bf16")
    code = main(["serve", "--bundle", str(tmp_path / "b"), "--precision", "fp32", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "TTA off at bf16" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def trust_client(trust_bundle):
    return TestClient(create_app(EnsemblePredictor(trust_bundle, device="cpu", precision="fp32")))


def _val_image(trust_study) -> bytes:
    import pandas as pd

    sp = pd.read_csv(trust_study / "splits.csv", dtype=str)
    paths = {p.stem: p for p in (trust_study.parent / "data").rglob("*.jpg")}
    return [paths[i].read_bytes() for i in sp.loc[sp["split"] == "val", "image_id"][:8]]


def test_evaluable_answer_has_status_ok_calibrated_probabilities_and_differential(trust_client, trust_study):
    bodies = [_post(trust_client, b).json() for b in _val_image(trust_study)]
    ok = [b for b in bodies if b["status"] == "ok"]
    assert len(ok) >= 6, bodies
    b = ok[0]
    assert b["calibrated"] is True and sum(b["probabilities"].values()) == pytest.approx(1, abs=1e-6)
    assert b["differential_coverage"] == 0.9 and isinstance(b["differential"], list)
    assert b["melanoma_flag"] == (b["melanoma_probability"] >= b["melanoma_threshold"])
    h = trust_client.get("/api/health").json()
    assert h["trust"]["differential_coverage"] == 0.9 and h["trust"]["ood_threshold"] > 0
    assert h["trust"]["quality"]["min_side"] == 100


def test_unevaluable_answer_is_200_with_reasons_and_no_diagnosis(trust_client, trust_study, tmp_path):
    thumb = _bytes(Image.open(io.BytesIO(_val_image(trust_study)[0])).resize((16, 12)))
    r = _post(trust_client, thumb, params="?explain=true")
    assert r.status_code == 200
    b = r.json()
    assert b["status"] == "unevaluable" and b["reason_codes"] == ["too_small"] and "16x12" in b["reasons"][0]
    assert b["advice"] and "not a diagnosis" in b["disclaimer"]
    for key in ("probabilities", "top", "melanoma_flag", "differential", "heatmap", "research"):
        assert key not in b
    blank = _post(trust_client, _bytes(Image.new("RGB", (300, 200), (200, 150, 130)))).json()
    assert blank["status"] == "unevaluable" and blank["reason_codes"] == ["uniform"]
    research = _post(trust_client, thumb, params="?research=true").json()
    assert research["status"] == "unevaluable" and "probabilities" not in research
    assert set(research["research"]["probabilities"]) == {"MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"}
    assert "research" in research["research"]["note"].lower()


def test_health_names_the_label_set_and_its_classes(client):
    h = client.get("/api/health").json()
    assert h["label_set"] == "ham7" and h["flag_class"] == "MEL"
    assert [c["code"] for c in h["classes"]] == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert h["classes"][0]["name"] == "Melanoma"
