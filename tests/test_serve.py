"""The web service: predictions, explanations, privacy, audit log and every kind of bad input."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lesionlab.inference.bundle import EnsemblePredictor
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
    im = Image.new("RGB", (150, 100), (160, 100, 80))
    r = _post(client, _bytes(im))
    assert r.status_code == 200
    body = r.json()
    assert set(body["probabilities"]) == {"MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"}
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
    data = _bytes(Image.new("RGB", (64, 48), (10, 200, 30)))
    _post(client, data, name="patient_smith.jpg")
    lines = [json.loads(x) for x in client.audit.read_text().splitlines()]
    import hashlib

    rec = [x for x in lines if x.get("image_sha256") == hashlib.sha256(data).hexdigest()][-1]
    assert rec["status"] == "ok" and "probabilities" in rec and "bundle_version" in rec and "time" in rec
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
