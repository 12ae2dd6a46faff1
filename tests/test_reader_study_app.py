"""A reader study made with the CLI from a study folder's test split and a trust bundle, read through the reader
service's API (tokens, phases, the AI's answer, bad input), exported and analysed with the CLI."""

from __future__ import annotations

import io
import json
import stat

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lesionlab.cli.main import main

ADMIN = "admin-token-for-tests-0123456789-abcdefghijkl"


@pytest.fixture(scope="module")
def made(trust_study, trust_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("rs_app")
    db = d / "pilot.sqlite"
    rc = main(["reader-study", "create", "--study", str(trust_study), "--bundle", str(trust_bundle), "--device", "cpu",
               "--name", "pilot", "--cases", "4", "--seed", "1", "--washout-days", "0", "--reader", "ann",
               "--reader", "bob", "--db", str(db), "--admin-token", ADMIN, "--url", "http://reader.example"])
    assert rc == 0
    inv = pd.read_csv(d / "invitations_pilot.csv", dtype=str)
    return {"db": db, "dir": d, "inv": inv, "tokens": dict(zip(inv["reader"], inv["token"], strict=True))}


@pytest.fixture(scope="module")
def client(made):
    from lesionlab.serve.reader_app import create_reader_app

    return TestClient(create_reader_app(made["db"]))


def _h(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_created_from_the_test_split_with_invitation_links(made, trust_study):
    from lesionlab.study_folder import StudyFolder
    from lesionlab.workflows.reader_study.db import open_db
    from lesionlab.workflows.reader_study.export import study_tables

    inv = made["inv"]
    assert list(inv["reader"]) == ["ann", "bob"]
    assert all(link == f"http://reader.example/#token={t}" for link, t in zip(inv["link"], inv["token"], strict=True))
    assert stat.S_IMODE((made["dir"] / "invitations_pilot.csv").stat().st_mode) == 0o600
    _, cases = study_tables(open_db(made["db"]), "pilot", admin_token=ADMIN)
    sf = StudyFolder(trust_study)
    split = sf.split().set_index("image_id")
    assert len(cases) == 4 and (split.loc[cases["image_id"], "split"] == "test").all()
    assert split.loc[cases["image_id"], "group_id"].is_unique  # one image per lesion
    assert not any(c in cid for cid in cases["case"] for c in cases["image_id"])  # case ids do not leak image ids


def test_aided_answer_is_what_the_clinician_page_shows(made, trust_bundle, trust_study):
    """The stored AI answer equals /api/predict?explain=true of the clinician service on the same image file."""
    from lesionlab.serve.app import create_app
    from lesionlab.workflows.reader_study.db import Case, open_db

    clinic = TestClient(create_app(trust_bundle, device="cpu"))
    paths = {p.stem: p for p in (trust_study.parent / "data").rglob("*.jpg")}
    with open_db(made["db"]).read() as s:
        cases = [(c.image_id, c.ai) for c in s.query(Case).all()]
    assert any(ai["status"] == "ok" for _, ai in cases)
    for image_id, ai in cases:
        page = clinic.post("/api/predict?explain=true", files={"image": ("x.jpg", paths[image_id].read_bytes())}).json()
        assert ai["status"] == page["status"]
        if page["status"] != "ok":
            assert ai["reasons"] == page["reasons"]
            continue
        assert ai["probabilities"] == pytest.approx(page["probabilities"], abs=1e-6)
        for k in ("top", "differential", "differential_coverage", "melanoma_flag", "melanoma_threshold", "calibrated",
                  "heatmap_class", "agreement", "bundle_version"):
            assert ai[k] == page[k], k
        assert ai["calibrated"] is True and ai["differential"] is not None  # a trust bundle: what its page shows
        assert ai["heatmap"].startswith("data:image/png;base64,") and ai["heatmap_crop"] == page["heatmap_crop"]


def test_reader_api_tokens_phases_and_bad_input(client, made):
    ann, bob = made["tokens"]["ann"], made["tokens"]["bob"]
    assert client.get("/api/reader/state").status_code == 401
    r = client.get("/api/reader/state", headers=_h("forged-token"))
    assert r.status_code == 401 and "unknown reader token" in r.json()["error"]
    assert client.get("/api/reader/state", headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.get("/api/reader/state", headers=_h(ADMIN)).status_code == 403
    assert client.get("/api/admin/studies/pilot/progress", headers=_h(ann)).status_code == 403
    assert client.get("/api/admin/studies/pilot/reads.csv", headers=_h("x" * 43)).status_code == 401
    assert client.post("/api/reader/open", headers=_h(ann)).status_code == 409  # profile first
    assert client.post("/api/reader/profile", headers=_h(ann), json={"level": "guru", "years": 3}).status_code == 400
    assert client.post("/api/reader/profile", headers=_h(ann), json={"level": "resident", "years": 3}).status_code == 200
    answers = {}
    for phase, modality in ((1, "unaided"), (2, "aided")):
        for k in range(4):
            st = client.post("/api/reader/open", headers=_h(ann)).json()
            assert (st["phase"], st["modality"], st["phases"][phase - 1]["done"]) == (phase, modality, k)
            text = json.dumps(st)
            assert "truth" not in text and "image_id" not in text and "ISIC" not in text
            key = st["case"]["key"]
            assert (st["case"]["ai"] is None) == (modality == "unaided")
            img = client.get(f"/api/reader/cases/{key}/image", headers=_h(ann))
            assert img.headers["content-type"] == "image/jpeg" and img.headers["cache-control"] == "no-store"
            assert not Image.open(io.BytesIO(img.content)).getexif()  # no metadata reaches readers
            if k == 1:  # the browser crashes mid-case: the same case comes back
                again = client.post("/api/reader/open", headers=_h(ann)).json()
                assert again["case"]["key"] == key
            answer = {"modality": modality, "diagnosis": "MEL" if k % 2 else "NV", "rating": k + 2,
                      "management": "excise" if k % 2 else "reassure"}
            r = client.post(f"/api/reader/cases/{key}/read", headers=_h(ann), json=answer)
            assert r.status_code == 201, r.text
            answers[(modality, key)] = answer
            if k == 0:
                assert client.post(f"/api/reader/cases/{key}/read", headers=_h(ann), json=answer).status_code == 200
                r = client.post(f"/api/reader/cases/{key}/read", headers=_h(ann), json={**answer, "rating": 6})
                assert r.status_code == 409 and "already answered" in r.json()["error"]
                r = client.post("/api/reader/cases/cdeadbeef00/read", headers=_h(ann), json=answer)
                assert r.status_code == 404 and "not a case of study" in r.json()["error"]
                assert client.get("/api/reader/cases/cdeadbeef00/image", headers=_h(ann)).status_code == 404
                r = client.post(f"/api/reader/cases/{key}/read", headers=_h(ann), json={**answer, "rating": "high"})
                assert r.status_code == 400 and "rating 'high'" in r.json()["error"]
    st = client.get("/api/reader/state", headers=_h(ann)).json()
    assert st["finished"] and st["done"] == st["total"] == 8
    # bob has read nothing; the admin sees progress and the reads, exactly ann's answers
    prog = client.get("/api/admin/studies/pilot/progress", headers=_h(ADMIN)).json()["readers"]
    assert [(p["reader"], p["unaided"], p["aided"], p["finished"]) for p in prog] == [("ann", 4, 4, True), ("bob", 0, 0, False)]
    reads = pd.read_csv(io.StringIO(client.get("/api/admin/studies/pilot/reads.csv", headers=_h(ADMIN)).text))
    got = {(r.modality, r.case): {"modality": r.modality, "diagnosis": r.diagnosis, "rating": int(r.rating),
                                  "management": r.management} for r in reads.itertuples()}
    assert got == answers and (reads["reader"] == "ann").all() and (reads["seconds"] >= 0).all()
    mrmc = client.get("/api/admin/studies/pilot/mrmc.csv?task=malignancy", headers=_h(ADMIN))
    assert mrmc.text.splitlines()[0] == "reader,modality,case,truth,rating"
    assert client.get("/api/admin/studies/nope/reads.csv", headers=_h(ADMIN)).status_code == 404
    r = client.post("/api/admin/studies/pilot/readers", headers=_h(ADMIN), json={"names": ["cid"]})
    assert r.status_code == 200 and client.get("/api/reader/state", headers=_h(r.json()["tokens"]["cid"])).status_code == 200
    assert client.post("/api/admin/studies/pilot/readers", headers=_h(ADMIN), json={"names": ["cid"]}).status_code == 409
    assert bob  # invited, untouched


def test_cli_export_analyse_and_errors(made, tmp_path, capsys):
    db = str(made["db"])
    assert main(["reader-study", "export", "--db", db, "--name", "pilot", "--out", str(tmp_path / "x"),
                 "--admin-token", ADMIN]) == 0
    for f in ("reads.csv", "cases.csv", "mrmc_melanoma.csv", "mrmc_malignancy.csv"):
        assert (tmp_path / "x" / f).exists()
    assert main(["reader-study", "progress", "--db", db, "--name", "pilot", "--admin-token", ADMIN]) == 0
    capsys.readouterr()
    rc = main(["reader-study", "export", "--db", db, "--name", "pilot", "--out", str(tmp_path / "y"),
               "--admin-token", "wrong"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unknown admin token" in err
    rc = main(["reader-study", "export", "--db", db, "--name", "nope", "--out", str(tmp_path / "y"), "--admin-token", ADMIN])
    assert rc == 2 and "no reader study named 'nope'" in capsys.readouterr().err
    rc = main(["reader-study", "export", "--db", str(tmp_path / "none.sqlite"), "--name", "pilot", "--out", str(tmp_path)])
    assert rc == 2 and "not a reader-study database" in capsys.readouterr().err
    rc = main(["reader-study", "create", "--name", "x", "--db", db])
    assert rc == 2 and "give either --study" in capsys.readouterr().err
    assert main(["reader-study", "analyse", "--db", db, "--name", "pilot", "--out", str(tmp_path / "rep"),
                 "--admin-token", ADMIN]) == 0
    assert (tmp_path / "rep" / "summary.json").exists()
    assert main(["reader-study", "analyse", "--reads", str(tmp_path / "x" / "reads.csv"),
                 "--out", str(tmp_path / "rep2")]) == 0
    from_db, from_csv = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("rep", "rep2"))
    for where in ("report", "files"):  # paths of the two report folders
        from_db.pop(where), from_csv.pop(where)
    assert from_db == from_csv and from_db["reads"] == 8  # the export holds everything the analysis needs
