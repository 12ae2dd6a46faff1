"""The service on a clinic network: tokens, bind policy, Host/Origin, bounded work, metrics, audit, docs, TLS,
graceful shutdown and a small load test on a real server on loopback."""

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from lesionlab.clinic.bundle import EnsemblePredictor
from lesionlab.exceptions import UserError
from lesionlab.serve.app import create_app
from lesionlab.serve.security import check_bind
from lesionlab.serve.tokens import TokenStore
from lesionlab.serve.work import Busy, WorkLimiter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_service  # noqa: E402


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lesionlab.cli", *args], capture_output=True, text=True)


def _jpeg(w=200, h=150, seed=0) -> bytes:
    from helpers import lesion_like

    buf = io.BytesIO()
    lesion_like(w, h, seed=seed).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ens(tiny_bundle):
    return EnsemblePredictor(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("tokens") / "tokens.json"
    store, token = TokenStore.load(f, create=True).add("room-3")
    store.save()
    return f, token


@pytest.fixture(scope="module")
def secured(ens, token_file, tmp_path_factory):
    f, token = token_file
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    app = create_app(ens, tokens=f, audit_log=audit, allowed_hosts=("testserver", "lesionlab.clinic.local"),
                     explain_max_px=96)
    c = TestClient(app)
    c.audit, c.token = audit, token
    return c


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_tokens_cli_prints_once_and_stores_only_a_hash(tmp_path):
    f = tmp_path / "t.json"
    r = _cli("tokens", "add", "dr.meyer", "--file", str(f))
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("llab_") and len(token) > 40 and r.stdout.strip() == token  # alone on its line
    assert token not in f.read_text() and "dr.meyer" in f.read_text()
    assert TokenStore.load(f).verify(token) == "dr.meyer" and TokenStore.load(f).verify(token + "x") is None
    assert (f.stat().st_mode & 0o777) == 0o600
    again = _cli("tokens", "add", "dr.meyer", "--file", str(f))
    assert again.returncode != 0 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert "dr.meyer" in _cli("tokens", "list", "--file", str(f)).stdout
    assert _cli("tokens", "revoke", "dr.meyer", "--file", str(f)).returncode == 0
    assert TokenStore.load(f).verify(token) is None
    f.write_text("{not json")
    bad = _cli("tokens", "list", "--file", str(f))
    assert bad.returncode != 0 and str(f) in bad.stderr and "Traceback" not in bad.stderr


def test_bind_policy():
    check_bind("127.0.0.1", tokens=False, tls=False, behind_proxy=False)
    check_bind("::1", tokens=False, tls=False, behind_proxy=False)
    with pytest.raises(UserError, match="--tokens"):
        check_bind("0.0.0.0", tokens=False, tls=True, behind_proxy=False)
    with pytest.raises(UserError, match="clear text"):
        check_bind("10.0.0.5", tokens=True, tls=False, behind_proxy=False)
    check_bind("0.0.0.0", tokens=True, tls=True, behind_proxy=False)
    check_bind("0.0.0.0", tokens=True, tls=False, behind_proxy=True)


def test_serve_refuses_an_open_network_bind_before_loading_anything(tmp_path):
    r = _cli("serve", "--bundle", str(tmp_path / "nowhere"), "--host", "0.0.0.0")
    assert r.returncode == 2 and "--tokens" in r.stderr and "Traceback" not in r.stderr


def test_api_needs_a_token_and_probes_stay_open(secured):
    c = secured
    assert c.get("/livez").status_code == 200 and c.get("/readyz").json() == {"ready": True}
    r = c.get("/api/health")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer") and r.json()["error"]
    assert c.get("/api/health", headers=_auth("llab_wrong")).status_code == 401
    assert c.post("/api/predict", files={"image": ("x.jpg", _jpeg(), "image/jpeg")}).status_code == 401
    assert c.get("/metrics").status_code == 401
    assert c.get("/api/health", headers=_auth(c.token)).json()["status"] == "ok"
    assert c.get("/", ).status_code == 200  # the page is static; it asks for the token itself
    lines = [json.loads(x) for x in c.audit.read_text().splitlines()]
    assert any(x["outcome"] == "unauthorized" and x["token_name"] is None for x in lines)


def test_host_and_origin_checks(secured):
    c, h = secured, _auth(secured.token)
    assert c.get("/api/health", headers={**h, "Host": "evil.example"}).status_code == 400  # DNS rebinding
    assert c.get("/api/health", headers={**h, "Host": "lesionlab.clinic.local"}).status_code == 200
    cross = c.post("/api/predict", headers={**h, "Origin": "https://evil.example"},
                   files={"image": ("x.jpg", _jpeg(), "image/jpeg")})
    assert cross.status_code == 403 and "cross-site" in cross.json()["error"]
    same = c.post("/api/predict", headers={**h, "Origin": "http://testserver"},
                  files={"image": ("x.jpg", _jpeg(), "image/jpeg")})
    assert same.status_code == 200


def test_explanations_are_capped_and_the_audit_log_has_the_request(secured, ens):
    c = secured
    r = c.post("/api/predict?explain=true", headers={**_auth(c.token), "X-Request-ID": "req-42"},
               files={"image": ("patient_x.jpg", _jpeg(seed=3), "image/jpeg")})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42" and "request_id" not in r.json()
    assert r.json()["status"] == "ok", r.json().get("reasons")
    import base64

    png = Image.open(io.BytesIO(base64.b64decode(r.json()["heatmap"].split(",", 1)[1])))
    assert max(png.size) <= 96
    rec = [json.loads(x) for x in c.audit.read_text().splitlines() if '"req-42"' in x][-1]
    assert rec["token_name"] == "room-3" and rec["outcome"] == "ok" and rec["endpoint"] == "/api/predict"
    assert rec["bundle_sha256"] and len(rec["bundle_sha256"]) == 64 and rec["engines"] and rec["precision"]
    assert isinstance(rec["ood_score"], float | type(None)) and rec["image_sha256"] and rec["client"]
    assert "patient_x" not in c.audit.read_text()


def test_metrics_count_requests_refusals_and_describe_the_model(secured):
    c, h = secured, _auth(secured.token)
    c.get("/api/health")  # no token
    c.post("/api/predict", headers=h, files={"image": ("s.jpg", _jpeg(40, 30), "image/jpeg")})  # too small
    c.post("/api/predict", headers=h, files={"image": ("t.txt", b"hello", "text/plain")})
    text = c.get("/metrics", headers=h).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    req = {(s.labels.get("endpoint"), s.labels.get("outcome")): s.value for s in fams["lesionlab_requests"].samples
           if s.name == "lesionlab_requests_total"}
    assert req[("/api/predict", "unevaluable")] >= 1 and req[("/api/predict", "rejected")] >= 1
    assert req[("/api/health", "unauthorized")] >= 1
    refusals = {s.labels["reason"]: s.value for s in fams["lesionlab_refusals"].samples if s.name.endswith("_total")}
    assert refusals.get("too_small", 0) >= 1
    assert "lesionlab_queue_depth" in fams and "lesionlab_request_duration_seconds" in fams
    info = next(s for s in fams["lesionlab_model_info"].samples)
    assert info.labels["bundle_version"] and info.labels["members"]


def test_api_docs_work_offline(secured):
    html = secured.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in html and "cdn" not in html.lower()
    assert "https://" not in html.replace("https://fastapi.tiangolo.com", "")
    assert secured.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_work_limiter_bounds_admission_and_waiting():
    lim = WorkLimiter(workers=1, queue=1, deadline_s=0.3)
    d1, d2 = lim.try_admit(), lim.try_admit()
    assert d1 and d2 and lim.try_admit() is None and lim.retry_after() >= 1
    with lim.worker(d1):
        with pytest.raises(Busy):
            with lim.worker(d2):
                pass
    lim.release()
    lim.release()
    assert lim.admitted == 0 and lim.try_admit() is not None


def test_full_queue_answers_503_with_retry_after(ens, monkeypatch):
    app = create_app(ens, workers=1, queue=0, deadline_s=30)
    gate = threading.Event()
    real = ens.predict

    def slow(*a, **k):
        gate.wait(20)
        return real(*a, **k)

    monkeypatch.setattr(ens, "predict", slow)
    c = TestClient(app)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("first", c.post(
        "/api/predict", files={"image": ("a.jpg", _jpeg(), "image/jpeg")})))
    t.start()
    while app.state.limiter.running == 0:
        time.sleep(0.02)
    r = c.post("/api/predict", files={"image": ("b.jpg", _jpeg(), "image/jpeg")})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "capacity" in r.json()["error"]
    gate.set()
    t.join()
    assert out["first"].status_code == 200


def test_deadline_passes_while_queued(ens, monkeypatch):
    app = create_app(ens, workers=1, queue=1, deadline_s=0.5)
    gate = threading.Event()
    real = ens.predict
    monkeypatch.setattr(ens, "predict", lambda *a, **k: (gate.wait(20), real(*a, **k))[1])
    c = TestClient(app)
    t = threading.Thread(target=lambda: c.post("/api/predict", files={"image": ("a.jpg", _jpeg(), "image/jpeg")}))
    t.start()
    while app.state.limiter.running == 0:
        time.sleep(0.02)
    r = c.post("/api/predict", files={"image": ("b.jpg", _jpeg(), "image/jpeg")})
    gate.set()
    t.join()
    assert r.status_code == 503 and "deadline" in r.json()["error"] and r.headers["retry-after"]


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return tmp / "cert.pem", tmp / "key.pem"


@pytest.mark.slow
def test_real_server_tls_tokens_413_load_and_graceful_drain(tiny_bundle, tmp_path):
    """A real `lesionlab serve` on loopback over HTTPS: a streamed over-limit upload gets 413, a small load test
    (6 clients, mixed sizes, explain on) gets no 5xx but 503, and SIGTERM drains admitted requests."""
    cert, key = _self_signed(tmp_path)
    token = bench_service.make_token(tmp_path / "tokens.json")
    server = bench_service.Server(tiny_bundle, token_file=tmp_path / "tokens.json", audit_log=tmp_path / "a.jsonl",
                                  https=(cert, key),
                                  extra=["--workers", "1", "--queue", "2", "--max-upload-mb", "1", "--drain", "60"])
    try:
        server.wait_ready()
        h = _auth(token)
        assert httpx.get(server.base + "/api/health", verify=str(cert), headers=h).status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port does not work
            httpx.get(server.base.replace("https", "http") + "/api/health", timeout=5)

        def chunks():  # streamed (chunked, no Content-Length) and over the 1 MB limit
            head = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
                    b"Content-Type: image/jpeg\r\n\r\n")
            yield head
            for _ in range(40):
                yield b"\xff" * 65536
            yield b"\r\n--b--\r\n"

        r = httpx.post(server.base + "/api/predict", verify=str(cert), content=chunks(),
                       headers={**h, "Content-Type": "multipart/form-data; boundary=b"}, timeout=60)
        assert r.status_code == 413, r.text

        payloads = {"small": bench_service.jpeg(600, 450, 1), "big": bench_service.jpeg(2400, 1800, 2)}
        res = bench_service.run_load(server.base, token, payloads, clients=6, seconds=6, verify=str(cert))
        assert res.requests > 0 and res.bad_5xx() == 0 and res.transport_errors == 0, res.statuses
        assert set(res.statuses) <= {200, 503}

        # graceful shutdown: requests admitted before SIGTERM are all answered
        answers = []

        def one():
            answers.append(httpx.post(server.base + "/api/predict?explain=true", verify=str(cert), headers=h,
                                      files={"image": ("x.jpg", payloads["small"], "image/jpeg")}, timeout=120))

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        code = server.stop()
        for t in threads:
            t.join()
        # uvicorn drains, then re-raises the signal it caught: -SIGTERM is its clean exit
        assert code in (0, -15) and "Finished server process" in server.output(), server.output()
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    finally:
        server.stop()
    audit = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert any(x["outcome"] == "too_large" for x in audit) and all(x["token_name"] == "load-test" for x in audit)


def test_bad_input_corpus_through_the_service_is_4xx_or_a_correct_answer(secured):
    from corpus import corpus

    status_for = {"too_large": 413, "truncated": 400, "unreadable": 415}
    for item in corpus():
        r = secured.post("/api/predict", headers=_auth(secured.token),
                         files={"image": (item.name, item.data, "application/octet-stream")})
        if item.expect == "ok":
            assert r.status_code == 200, (item.name, r.text)
        else:
            if not item.data:
                assert r.status_code == 400, item.name  # an empty upload
            elif item.kind is None:  # any refusal will do
                assert 400 <= r.status_code < 500, (item.name, r.status_code, r.text)
            else:
                assert r.status_code == status_for[item.kind], (item.name, r.status_code, r.text)
            assert r.json()["error"] and "\n" not in r.json()["error"], item.name
    assert secured.get("/livez").status_code == 200


def test_dicom_in_fhir_and_sr_out(secured, monkeypatch):
    import pydicom
    from corpus import make_dicom
    from fhir.resources.R4B.bundle import Bundle

    h = _auth(secured.token)
    dcm = make_dicom(jpeg=True)
    src = pydicom.dcmread(io.BytesIO(dcm))
    files = {"image": ("lesion.dcm", dcm, "application/dicom")}
    r = secured.post("/api/predict", headers=h, files=files)
    assert r.status_code == 200 and r.json()["dicom"]["sop_instance_uid"] == src.SOPInstanceUID
    assert r.json()["dicom"]["acquisition"]  # polarisation, device ... kept for subgroups

    fhir = secured.post("/api/predict?format=fhir&patient=Patient/p1", headers=h, files=files)
    assert fhir.status_code == 200 and fhir.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate(fhir.json())  # round-trips through fhir.resources
    kinds = [e.resource.get_resource_type() for e in bundle.entry]
    assert kinds.count("DiagnosticReport") == 1 and kinds.count("Observation") >= 7
    assert src.SOPInstanceUID in fhir.text and "Patient/p1" in fhir.text

    sr = secured.post("/api/predict?format=dicom-sr", headers=h, files=files)
    assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(sr.content))
    assert ds.StudyInstanceUID == src.StudyInstanceUID and src.SOPInstanceUID in str(ds)
    bad = secured.post("/api/predict?format=dicom-sr", headers=h, files={"image": ("x.jpg", _jpeg(), "image/jpeg")})
    assert bad.status_code == 400 and "DICOM" in bad.json()["error"]

    # a fusion bundle reads the header's age/sex/site; a form field wins over the header's
    import lesionlab.serve.app as app_module

    seen = []
    ens = secured.app.state.ensemble
    real = ens.predict
    monkeypatch.setattr(app_module, "uses_metadata", lambda _ens: True)
    monkeypatch.setattr(ens, "predict", lambda ims, **k: (seen.append(k["metadata"]), real(ims, tta=k["tta"],
                                                          research=k["research"]))[1])
    secured.post("/api/predict", headers=h, files=files, data={"sex": "male"})
    assert seen[-1][0]["age"] == 45 and seen[-1][0]["sex"] == "male" and seen[-1][0].get("localization")


def test_reader_study_service_has_the_same_bind_policy(tmp_path):
    r = _cli("reader-study", "serve", "--db", str(tmp_path / "x.sqlite"), "--host", "0.0.0.0")
    assert r.returncode == 2 and "clear text" in r.stderr and "Traceback" not in r.stderr


def test_a_bug_is_a_json_500_with_the_request_id_and_is_logged(ens, monkeypatch, tmp_path):
    audit = tmp_path / "audit.jsonl"
    c = TestClient(create_app(ens, audit_log=audit), raise_server_exceptions=False)

    def boom(*a, **k):
        raise ValueError("a bug")

    monkeypatch.setattr(ens, "explain", boom)
    r = c.post("/api/predict?explain=true", files={"image": ("x.jpg", _jpeg(), "image/jpeg")})
    rid = r.headers["x-request-id"]
    assert r.status_code == 500 and rid in r.json()["error"] and "a bug" not in r.text
    rec = json.loads(audit.read_text().splitlines()[-1])
    assert rec["request_id"] == rid and rec["outcome"] == "error"
    assert c.get("/livez").status_code == 200


def test_malloc_arena_cap_applies_on_glibc():
    import platform

    from lesionlab.serve.runner import limit_malloc_arenas

    if platform.libc_ver()[0] == "glibc":
        assert limit_malloc_arenas(8) is True  # 8: leaves this test process as it is in practice
    else:
        assert limit_malloc_arenas(8) is False
