"""The reader-study service meets the network standard of the clinician service, through the same code: bounded
bodies (413 JSON), Host and Origin checks, an audit log without tokens or answers, admin-only /metrics, probes,
request ids, and the `reader-study serve` options that feed them. A two-case unaided study on SQLite, no model."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from lesionlab.cli.main import main
from lesionlab.serve.reader_app import create_reader_app
from lesionlab.workflows.reader_study.create import create_study
from lesionlab.workflows.reader_study.db import open_db

ADMIN = "admin-token-for-hardening-tests-0123456789-abc"
FORGED = "forged-token-0123456789-0123456789-0123456789"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A study database made once (two tiny cases, readers ann and bob); each test reads a copy of it."""
    from helpers import lesion_like

    d = tmp_path_factory.mktemp("rs_template")
    rows = []
    for k, label in enumerate(["MEL", "NV"]):
        p = d / f"ISIC_{k:07d}.jpg"
        lesion_like(64, 48, seed=k).save(p)
        rows.append({"image_id": p.stem, "label": label, "path": str(p)})
    db = open_db(d / "study.sqlite")
    made = create_study(db, name="pilot", cases=pd.DataFrame(rows), bundle=None, washout_days=0,
                        readers=["ann", "bob"], admin_token=ADMIN)
    db.close()
    return d / "study.sqlite", made.invitations


@pytest.fixture
def study(template, tmp_path):
    src, tokens = template
    dst = tmp_path / "db" / "study.sqlite"
    dst.parent.mkdir()
    shutil.copy(src, dst)
    return dst, tokens


def _h(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(study, **settings) -> TestClient:
    return TestClient(create_reader_app(study[0], **settings))


def _audit(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _read_one(c: TestClient, token: str, **answer) -> tuple[str, dict]:
    """Profile, open the current case and answer it; (case key, answer)."""
    assert c.post("/api/reader/profile", headers=_h(token), json={"level": "resident", "years": 2}).status_code == 200
    key = c.post("/api/reader/open", headers=_h(token)).json()["case"]["key"]
    body = {"modality": "unaided", "diagnosis": "MEL", "rating": 5, "management": "excise", **answer}
    r = c.post(f"/api/reader/cases/{key}/read", headers=_h(token), json=body)
    assert r.status_code == 201, r.text
    return key, body


def test_oversized_bodies_get_413_json_declared_or_streamed(study, tmp_path):
    audit = tmp_path / "audit.jsonl"
    c = _client(study, audit_log=audit)
    ann = study[1]["ann"]
    big = json.dumps({"names": ["x" * 100] * 700}).encode()  # ~70 KiB of reader names
    r = c.post("/api/admin/studies/pilot/readers", headers={**_h(ADMIN), "Content-Type": "application/json"},
               content=big)
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "request body larger than the limit of 64 KiB"}

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        for _ in range(8):
            yield b" " * 10_000

    r = c.post("/api/reader/profile", headers={**_h(ann), "Content-Type": "application/json"}, content=chunks())
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 413 and "64 KiB" in r.json()["error"]
    # a body under the limit is answered by the route as before
    assert c.post("/api/reader/profile", headers=_h(ann), json={"level": "resident", "years": 2}).status_code == 200
    assert c.get("/api/health").json()["max_body_kib"] == 64
    rec = [x for x in _audit(audit) if x["http_status"] == 413]
    assert [x["outcome"] for x in rec] == ["too_large", "too_large"]
    assert {x["endpoint"] for x in rec} == {"/api/admin/studies/{name}/readers", "/api/reader/profile"}


def test_bad_host_is_refused_and_a_listed_host_answered(study):
    c = _client(study, allowed_hosts=("testserver", "readers.example.org"))
    ann = study[1]["ann"]
    r = c.get("/api/reader/state", headers={**_h(ann), "Host": "evil.example"})  # DNS rebinding
    assert r.status_code == 400
    assert c.get("/api/reader/state", headers={**_h(ann), "Host": "readers.example.org"}).status_code == 200
    assert c.get("/api/reader/state", headers=_h(ann)).status_code == 200


def test_cross_site_post_is_refused_unless_its_origin_is_allowed(study, tmp_path):
    audit = tmp_path / "audit.jsonl"
    c = _client(study, allowed_origins=("https://portal.example.org",), audit_log=audit)
    ann = study[1]["ann"]
    body = {"level": "expert", "years": 9}
    r = c.post("/api/reader/profile", headers={**_h(ann), "Origin": "https://evil.example"}, json=body)
    assert r.status_code == 403 and "cross-site" in r.json()["error"]
    assert c.get("/api/reader/state", headers=_h(ann)).json()["profile"]["level"] is None  # nothing was saved
    r = c.post("/api/reader/profile", headers={**_h(ann), "Origin": "https://portal.example.org"}, json=body)
    assert r.status_code == 200
    r = c.post("/api/reader/profile", headers={**_h(ann), "Origin": "http://testserver"}, json=body)  # same site
    assert r.status_code == 200
    refused = [x for x in _audit(audit) if x["http_status"] == 403]
    assert len(refused) == 1 and refused[0]["outcome"] == "forbidden"  # the refusal is logged too


def test_audit_log_has_reads_conflicts_and_unknown_tokens_but_no_secrets_or_answers(study, tmp_path):
    audit = tmp_path / "audit.jsonl"
    c = _client(study, audit_log=audit)
    ann, bob = study[1]["ann"], study[1]["bob"]
    key, answer = _read_one(c, ann, management="excise", diagnosis="MEL", rating=5)
    again = c.post(f"/api/reader/cases/{key}/read", headers=_h(ann), json=answer)
    assert again.status_code == 200  # the same answer again: idempotent
    r = c.post(f"/api/reader/cases/{key}/read", headers=_h(ann), json={**answer, "rating": 2})
    assert r.status_code == 409
    assert c.get("/api/reader/state", headers=_h(FORGED)).status_code == 401
    assert c.get("/api/reader/state", headers=_h(ann)).status_code == 200  # a read-only success: not logged
    assert c.get("/api/admin/studies/pilot/progress", headers=_h(bob)).status_code == 403
    assert c.get("/api/admin/studies/pilot/reads.csv", headers=_h(ADMIN)).status_code == 200
    assert c.get("/api/reader/cases/cdeadbeef00/image", headers=_h(ann)).status_code == 404

    recs = _audit(audit)
    by = [(x["endpoint"], x["http_status"], x["outcome"], x["role"]) for x in recs]
    assert by == [
        ("/api/reader/profile", 200, "ok", "ann"),
        ("/api/reader/open", 200, "ok", "ann"),
        ("/api/reader/cases/{key}/read", 201, "recorded", "ann"),
        ("/api/reader/cases/{key}/read", 200, "already_recorded", "ann"),
        ("/api/reader/cases/{key}/read", 409, "conflict", "ann"),
        ("/api/reader/state", 401, "unauthorized", None),
        ("/api/admin/studies/{name}/progress", 403, "forbidden", "bob"),
        ("/api/admin/studies/{name}/{table}.csv", 200, "ok", "admin"),
        ("/api/reader/cases/{key}/image", 404, "not_found", "ann"),
    ]
    assert all(recs[k]["case"] == key for k in (1, 2, 3, 4)) and recs[8]["case"] == "cdeadbeef00"
    assert recs[2]["study"] == "pilot" and recs[7]["table"] == "reads"
    for x in recs:
        assert x["request_id"] and x["client"] and x["method"] in ("GET", "POST") and x["time"]
        assert not {"diagnosis", "rating", "management", "modality", "answer", "token"} & set(x)
    text = audit.read_text()
    for secret in (ann, bob, ADMIN, FORGED):
        assert secret not in text
    assert "excise" not in text and "Bearer" not in text


def test_metrics_need_the_admin_token_and_count_reads(study):
    c = _client(study)
    ann, bob = study[1]["ann"], study[1]["bob"]
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers=_h(FORGED)).status_code == 401
    assert c.get("/metrics", headers=_h(ann)).status_code == 403
    key, answer = _read_one(c, ann)
    assert c.post(f"/api/reader/cases/{key}/read", headers=_h(ann), json=answer).status_code == 200  # not a new read
    c.get("/api/reader/state", headers=_h(bob))
    r = c.get("/metrics", headers=_h(ADMIN))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    reads = {s.labels["modality"]: s.value for s in fams["lesionlab_reader_reads"].samples if s.name.endswith("_total")}
    assert reads == {"unaided": 1.0}
    assert next(iter(fams["lesionlab_reader_readers_active"].samples)).value == 2  # ann and bob
    req = {(s.labels["endpoint"], s.labels["outcome"]): s.value for s in fams["lesionlab_reader_requests"].samples
           if s.name.endswith("_total")}
    assert req[("/api/reader/cases/{key}/read", "recorded")] == 1
    assert req[("/api/reader/cases/{key}/read", "already_recorded")] == 1
    assert req[("/metrics", "unauthorized")] == 2 and req[("/metrics", "forbidden")] == 1
    lat = {s.labels["endpoint"]: s.value for s in fams["lesionlab_reader_request_duration_seconds"].samples
           if s.name.endswith("_count")}
    assert lat["/api/reader/open"] == 1
    for secret in (ann, bob, ADMIN, key, "ann", "bob"):
        assert secret not in r.text  # no names, tokens or case keys in labels


def test_request_id_is_echoed_and_probes_stay_open(study, tmp_path):
    audit = tmp_path / "audit.jsonl"
    c = _client(study, audit_log=audit)
    ann = study[1]["ann"]
    r = c.post("/api/reader/profile", headers={**_h(ann), "X-Request-ID": "rs-7.a_b"},
               json={"level": "resident", "years": 1})
    assert r.headers["x-request-id"] == "rs-7.a_b"
    assert _audit(audit)[-1]["request_id"] == "rs-7.a_b"
    r = c.get("/api/reader/state", headers={**_h(ann), "X-Request-ID": "bad id\twith tab"})
    assert r.headers["x-request-id"] != "bad id\twith tab" and len(r.headers["x-request-id"]) == 32  # a fresh one
    assert c.get("/api/reader/state").headers["x-request-id"]  # refused answers carry one too
    assert c.get("/livez").json() == {"status": "alive"} and c.get("/readyz").json() == {"ready": True}
    c.app.state.ready = False  # what the runner sets on SIGTERM
    assert c.get("/readyz").status_code == 503


def test_cli_serve_wires_host_origin_and_audit_options(study, monkeypatch, capsys):
    """`reader-study serve` builds the guarded app from the same transport options as `serve` (the server run
    itself is replaced: what it is given is checked)."""
    import lesionlab.serve.runner as runner

    served = {}
    monkeypatch.setattr(runner, "run", lambda app, **kw: served.update(app=app, **kw))
    db = study[0]
    assert main(["reader-study", "serve", "--db", str(db), "--allow-host", "readers.example.org",
                 "--allow-origin", "https://portal.example.org"]) == 0
    settings = served["app"].state.settings
    assert settings.audit_log == db.parent / "reader-audit.jsonl" and "audit log:" in capsys.readouterr().out
    assert {"readers.example.org", "127.0.0.1", "localhost"} <= set(settings.allowed_hosts)
    assert settings.allowed_origins == ("https://portal.example.org",) and served["port"] == 8001
    c = TestClient(served["app"])
    ann = study[1]["ann"]
    assert c.get("/api/reader/state", headers={**_h(ann), "Host": "evil.example"}).status_code == 400
    assert c.get("/api/reader/state", headers={**_h(FORGED), "Host": "readers.example.org"}).status_code == 401
    assert _audit(db.parent / "reader-audit.jsonl")[-1]["outcome"] == "unauthorized"

    assert main(["reader-study", "serve", "--db", str(db), "--no-audit-log"]) == 0
    assert served["app"].state.settings.audit_log is None
    custom = db.parent / "logs" / "a.jsonl"
    assert main(["reader-study", "serve", "--db", str(db), "--audit-log", str(custom)]) == 0
    assert served["app"].state.settings.audit_log == custom and custom.exists()
