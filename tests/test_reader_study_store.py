"""Reader-study storage on SQLite and on a real PostgreSQL server started here: migrations, tokens, case order,
washout and crossover, time per case, double submissions, concurrency, export."""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from lesionlab.workflows.reader_study import reading
from lesionlab.workflows.reader_study.create import allocate, create_study, invite_readers, sample_cases
from lesionlab.workflows.reader_study.db import Read, Reader, open_db
from lesionlab.workflows.reader_study.errors import (
    Conflict,
    Forbidden,
    NotFound,
    ReaderStudyError,
    Unauthorized,
)
from lesionlab.workflows.reader_study.export import mrmc_long, study_tables
from lesionlab.workflows.reader_study.schema import CASE_COLUMNS, MRMC_COLUMNS, READ_COLUMNS
from lesionlab.workflows.reader_study.tokens import token_hash

# Debian installs each major version under its own folder; take the newest present
PG_BIN = Path(os.environ.get("LESIONLAB_PG_BIN") or max(
    (str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), key=lambda p: int(Path(p).parent.name)
    if Path(p).parent.name.isdigit() else 0, default="/usr/lib/postgresql/15/bin"))
LABELS = ["MEL", "NV", "BCC", "NV", "BKL", "MEL"]


def require_postgres(bindir: Path, ci: str | None) -> Path:
    """PostgreSQL's server binaries; without them the test skips, except under CI=true, where it fails."""
    if not (bindir / "initdb").exists() or not (bindir / "pg_ctl").exists():
        msg = f"PostgreSQL server binaries not found in {bindir} (apt-get install postgresql)"
        if (ci or "").lower() == "true":
            pytest.fail(f"CI=true: {msg}; reader-study storage must be tested on PostgreSQL in CI", pytrace=False)
        pytest.skip(msg)
    return bindir


def test_missing_postgres_fails_under_ci(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_postgres(tmp_path, "true")
    with pytest.raises(pytest.skip.Exception):
        require_postgres(tmp_path, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_server():
    """A throw-away PostgreSQL cluster on a free loopback port (initdb as the postgres user when run as root,
    since the server refuses to run as root); stopped and deleted after the module. Yields its base URL."""
    bindir = require_postgres(PG_BIN, os.environ.get("CI"))
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="lesionlab-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr or e.stdout}", pytrace=False)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty database: a SQLite file, or a new database on the test's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "reads.sqlite")
    import psycopg

    base = request.getfixturevalue("postgres_server")
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(base.replace("postgresql://", "postgresql://", 1) + "/postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return f"{base}/{name}"


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> pd.DataFrame:
    from helpers import lesion_like

    d = tmp_path_factory.mktemp("rs_cases")
    rows = []
    for k, label in enumerate(LABELS):
        p = d / f"ISIC_{k:07d}.jpg"
        lesion_like(200, 150, seed=k).save(p)  # large enough to pass the quality checks
        rows.append({"image_id": p.stem, "label": label, "path": str(p)})
    return pd.DataFrame(rows)


class CachedEnsemble:
    """The real bundle, its answers memoised per image (the same images make several studies here: the answers
    are computed once, by the real pipeline)."""

    def __init__(self, ens):
        self._ens, self._predict, self._explain = ens, {}, {}

    def __getattr__(self, name):
        return getattr(self._ens, name)

    def predict(self, images, **kw):
        key = images[0].tobytes()
        if key not in self._predict:
            self._predict[key] = self._ens.predict(images, **kw)
        return [dict(a) for a in self._predict[key]]

    def explain(self, image, answer):
        key = image.tobytes()
        if key not in self._explain:
            self._explain[key] = self._ens.explain(image, answer)
        return self._explain[key]


@pytest.fixture(scope="module")
def ens(tiny_bundle):
    from lesionlab.clinic.bundle import EnsemblePredictor

    return CachedEnsemble(EnsemblePredictor(tiny_bundle, device="cpu"))


def _study(db, cases, ens=None, **kw):
    kw.setdefault("washout_days", 0)
    kw.setdefault("readers", ["ann", "bob"])
    return create_study(db, name=kw.pop("name", "s1"), cases=cases, bundle=ens, **kw)


def _answer(s, reader, key, modality, dx="NV", rating=3, mgmt="follow-up", now=None):
    return reading.submit(s, reader, key, {"modality": modality, "diagnosis": dx, "rating": rating, "management": mgmt},
                          now=now)


def _reader(db, token):
    with db.read() as s:
        return reading.reader_for_token(s, token)


def _profile(db, token):
    with db.write() as s:
        reading.set_profile(s, reading.reader_for_token(s, token), "resident", 2)


def _read_all(db, token, phase_modality, now=None, dx="NV"):
    """Open and answer every case of the reader's current phase; returns the keys in the order shown."""
    keys = []
    while True:
        with db.write() as s:
            st = reading.open_current(s, reading.reader_for_token(s, token), now=now)
        if st["case"] is None or st["modality"] != phase_modality:
            return keys
        keys.append(st["case"]["key"])
        with db.write() as s:
            created, _ = _answer(s, reading.reader_for_token(s, token), st["case"]["key"], phase_modality, dx=dx, now=now)
        assert created


def test_migrations_build_the_models_schema(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from lesionlab.workflows.reader_study.db import VERSION_TABLE, Base, current_revision

    db = open_db(db_url)
    assert current_revision(db.engine) == "0001"
    with db.engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c, opts={"version_table": VERSION_TABLE}), Base.metadata)
    assert diff == []
    open_db(db_url).close()  # a second open upgrades nothing and keeps the tables
    assert current_revision(db.engine) == "0001"
    db.close()


def test_unmigrated_database_is_refused(tmp_path):
    from lesionlab.exceptions import UserError

    with pytest.raises(UserError, match="not a reader-study database"):
        open_db(tmp_path / "empty.sqlite", migrate=False)
    with pytest.raises(UserError, match="does not exist"):
        open_db(tmp_path / "no" / "such.sqlite")


def test_tokens_are_stored_hashed_and_checked(db_url, cases):
    db = open_db(db_url)
    made = _study(db, cases)
    with db.read() as s:
        stored = s.scalars(sa.select(Reader.token_hash)).all()
        dumped = "\n".join(str(r) for t in ("reader_readers", "reader_admins") for r in s.execute(sa.text(f"SELECT * FROM {t}")))
    assert sorted(stored) == sorted(token_hash(t) for t in made.invitations.values())
    for tok in [*made.invitations.values(), made.admin_token]:
        assert tok not in dumped
    with db.read() as s:
        with pytest.raises(Unauthorized):
            reading.reader_for_token(s, None)
        with pytest.raises(Unauthorized):
            reading.reader_for_token(s, made.invitations["ann"][:-1] + "x")
        with pytest.raises(Forbidden):
            reading.reader_for_token(s, made.admin_token)
        with pytest.raises(Forbidden):
            reading.check_admin(s, made.invitations["ann"])
        with pytest.raises(Unauthorized):
            reading.check_admin(s, "not-a-token")
        reading.check_admin(s, made.admin_token)
    with pytest.raises(Unauthorized):  # a second study in the same database needs the admin token
        _study(db, cases, name="s2")
    _study(db, cases, name="s2", admin_token=made.admin_token, readers=[])
    with pytest.raises(ReaderStudyError, match="already invited"):
        invite_readers(db, "s1", ["ann"], admin_token=made.admin_token)
    db.close()


def test_order_washout_crossover_and_time(db_url, cases, ens):
    db = open_db(db_url)
    made = _study(db, cases, ens, washout_days=2, crossover=True, readers=["ann", "bob", "cid"])
    ann, bob = made.invitations["ann"], made.invitations["bob"]
    with db.read() as s:
        assert [r.first_modality for r in s.scalars(sa.select(Reader).order_by(Reader.id))] == ["unaided", "aided", "unaided"]
        with pytest.raises(ReaderStudyError, match="experience"):  # profile first
            reading.open_current(s, reading.reader_for_token(s, ann))
    for tok in made.invitations.values():
        _profile(db, tok)
    t0 = dt.datetime(2030, 1, 1, 9, 0, 0)
    ann_1 = _read_all(db, ann, "unaided", now=t0)
    bob_1 = _read_all(db, bob, "aided", now=t0)
    assert sorted(ann_1) == sorted(bob_1) and len(ann_1) == len(cases) and ann_1 != bob_1  # each reader's own order
    with db.read() as s:
        st = reading.reader_state(s, reading.reader_for_token(s, ann), now=t0 + dt.timedelta(days=1))
    assert st["case"] is None and st["washout_until"] == "2030-01-03T09:00:00Z" and not st["finished"]
    with db.write() as s, pytest.raises(Conflict, match="washout"):
        _answer(s, reading.reader_for_token(s, ann), ann_1[0], "aided", now=t0 + dt.timedelta(days=1))
    later = t0 + dt.timedelta(days=2, seconds=1)
    # time per case is the server's: from the last opening to the submission; a re-opened case counts twice
    with db.write() as s:
        key = reading.open_current(s, reading.reader_for_token(s, ann), now=later)["case"]["key"]
    with db.write() as s:
        assert reading.open_current(s, reading.reader_for_token(s, ann), now=later + dt.timedelta(seconds=30))["case"]["key"] == key
    with db.write() as s:
        assert _answer(s, reading.reader_for_token(s, ann), key, "aided", now=later + dt.timedelta(seconds=42))[1]["seconds"] == 12
    ann_2 = [key, *_read_all(db, ann, "aided", now=later)]
    assert sorted(ann_2) == sorted(ann_1) and ann_2 != ann_1
    with db.read() as s:
        assert reading.reader_state(s, reading.reader_for_token(s, ann), now=later)["finished"]
        r = s.scalar(sa.select(Read).join(Reader).where(Reader.name == "ann", Read.modality == "aided"))
    reads, _ = study_tables(db, "s1", admin_token=made.admin_token)
    ann_aided = reads[(reads["reader"] == "ann") & (reads["modality"] == "aided")].set_index("case")
    assert ann_aided.loc[key, "seconds"] == 12 and r.phase == 2 and (ann_aided["phase"] == 2).all()
    # the order shown is the seeded one: a function of the study seed, the reader's seed and the phase
    from lesionlab.workflows.reader_study.db import Case, Study

    with db.read() as s:
        study = s.scalar(sa.select(Study).where(Study.name == "s1"))
        reader = s.scalar(sa.select(Reader).where(Reader.name == "ann"))
        ids = list(s.scalars(sa.select(Case.id).where(Case.study_id == study.id).order_by(Case.position)))
        key_of = {c.id: c.key for c in s.scalars(sa.select(Case).where(Case.study_id == study.id))}
        assert [key_of[i] for i in reading.case_order(study, reader, 1, ids)] == ann_1
        assert [key_of[i] for i in reading.case_order(study, reader, 2, ids)] == ann_2
    db.close()


def test_double_submission_other_study_and_bad_answers(db_url, cases, ens):
    db = open_db(db_url)
    made = _study(db, cases, ens)
    other = _study(db, cases, name="other", admin_token=made.admin_token, readers=["zed"])
    tok = made.invitations["ann"]
    _profile(db, tok)
    with db.write() as s:
        key = reading.open_current(s, reading.reader_for_token(s, tok))["case"]["key"]
    with db.read() as s:
        other_keys = s.scalars(sa.text("SELECT key FROM reader_cases c JOIN reader_studies st ON st.id = c.study_id "
                                       "WHERE st.name = 'other'")).all()
    assert key not in other_keys and len(other_keys) == len(cases)
    with db.write() as s:
        with pytest.raises(NotFound):
            _answer(s, reading.reader_for_token(s, tok), other_keys[0], "unaided")
        with pytest.raises(NotFound):
            reading.case_image(s, reading.reader_for_token(s, tok), other_keys[0])
        for bad, msg in [({"rating": 7}, "from 1 to 6"), ({"rating": 2.5}, "whole number"), ({"dx": "XYZ"}, "diagnosis"),
                         ({"mgmt": "wait"}, "management")]:
            with pytest.raises(ReaderStudyError, match=msg):
                _answer(s, reading.reader_for_token(s, tok), key, "unaided", **bad)
        with pytest.raises(ReaderStudyError, match="modality"):
            _answer(s, reading.reader_for_token(s, tok), key, "telepathic")
    with db.write() as s:
        assert _answer(s, reading.reader_for_token(s, tok), key, "unaided", dx="MEL", rating=6)[0] is True
    with db.write() as s:  # the same answer again: idempotent
        assert _answer(s, reading.reader_for_token(s, tok), key, "unaided", dx="MEL", rating=6)[0] is False
    with db.write() as s, pytest.raises(Conflict, match="already answered"):
        _answer(s, reading.reader_for_token(s, tok), key, "unaided", dx="NV", rating=6)
    with db.write() as s:  # not yet opened: refused, nothing stored
        nxt = reading.reader_state(s, reading.reader_for_token(s, tok))["case"]
        with pytest.raises(Conflict, match="not opened"):
            _answer(s, reading.reader_for_token(s, tok), nxt, "unaided")
    # the database itself refuses a second row for the same reader, case and modality
    with db.read() as s:
        row = s.scalar(sa.select(Read))
        fields = {c.name: getattr(row, c.name) for c in Read.__table__.columns if c.name != "id"}
    with pytest.raises(sa.exc.IntegrityError), db.write() as s:
        s.add(Read(**fields))
    with db.read() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Read)) == 1
    assert other.invitations["zed"]
    db.close()


def test_concurrent_readers_lose_nothing(db_url, cases):
    """Eight readers answer every case at the same time (each request in its own transaction), and four threads
    send one reader's same answer at once: every read is stored exactly once."""
    db = open_db(db_url)
    names = [f"r{k}" for k in range(8)]
    made = _study(db, cases, readers=names)
    for tok in made.invitations.values():
        _profile(db, tok)

    def read_all(tok: str) -> int:
        return len(_read_all(db, tok, "unaided"))

    with cf.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(read_all, made.invitations.values())) == [len(cases)] * 8
    reads, cases_t = study_tables(db, "s1", admin_token=made.admin_token)
    assert len(reads) == 8 * len(cases) and not reads.duplicated(["reader", "case", "modality"]).any()
    # a double click sent four times at once
    more = invite_readers(db, "s1", ["dup"], admin_token=made.admin_token)["dup"]
    _profile(db, more)
    with db.write() as s:
        key = reading.open_current(s, reading.reader_for_token(s, more))["case"]["key"]

    def send(_):
        with db.write() as s:
            return _answer(s, reading.reader_for_token(s, more), key, "unaided")[0]

    with cf.ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(send, range(4))) == [False, False, False, True]
    with db.read() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Read).join(Reader).where(Reader.name == "dup")) == 1
    db.close()


def test_export_tables(db_url, cases, ens):
    db = open_db(db_url)
    made = _study(db, cases, ens, readers=["ann"])
    tok = made.invitations["ann"]
    with db.write() as s:
        reading.set_profile(s, reading.reader_for_token(s, tok), "expert", 12.5)
    _read_all(db, tok, "unaided", dx="MEL")
    _read_all(db, tok, "aided", dx="BCC")
    reads, cases_t = study_tables(db, "s1", admin_token=made.admin_token)
    assert tuple(reads.columns) == READ_COLUMNS and tuple(cases_t.columns) == CASE_COLUMNS
    assert len(reads) == 2 * len(cases) and set(reads["modality"]) == {"unaided", "aided"}
    assert (reads.loc[reads["modality"] == "unaided", "diagnosis"] == "MEL").all()
    assert (reads["reader_level"] == "expert").all() and (reads["reader_years"] == 12.5).all()
    merged = reads.merge(cases_t, on="case", suffixes=("", "_c"))
    assert (merged["truth"] == merged["truth_c"]).all() and (merged["ai_top"] == merged["ai_top_c"]).all()
    assert sorted(cases_t["truth"]) == sorted(LABELS) and set(cases_t["image_id"]) == set(cases["image_id"])
    ok = cases_t["ai_top"] != ""
    assert ok.any() and cases_t.loc[ok, "ai_mel_prob"].between(0, 1).all()
    assert (cases_t.loc[ok, "ai_malignant_prob"] >= cases_t.loc[ok, "ai_mel_prob"] - 1e-9).all()
    long = mrmc_long(reads, "malignancy")
    assert tuple(long.columns) == MRMC_COLUMNS
    truth = dict(zip(cases_t["case"], cases_t["truth"], strict=True))
    assert (long["truth"] == long["case"].map(lambda c: int(truth[c] in ("MEL", "BCC", "AKIEC")))).all()
    assert (mrmc_long(reads, "melanoma")["truth"] == long["case"].map(lambda c: int(truth[c] == "MEL"))).all()
    with pytest.raises(Unauthorized):
        study_tables(db, "s1", admin_token=None)
    with pytest.raises(NotFound, match="no reader study named"):
        study_tables(db, "nope", admin_token=made.admin_token)
    db.close()


def test_allocate_matches_scikit_learn():
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(0)
    for n, counts in [(50, {"MEL": 40, "NV": 300, "BCC": 17, "AKIEC": 13, "BKL": 44, "DF": 5, "VASC": 6}),
                      (30, {"MEL": 11, "NV": 61, "BKL": 23}), (6, {"MEL": 4, "NV": 5, "BCC": 3})]:
        y = np.concatenate([[c] * k for c, k in counts.items()])
        ours = allocate(counts, n)
        assert sum(ours.values()) == n
        exact = {c: n * k / len(y) for c, k in counts.items()}
        taken, _ = train_test_split(y, train_size=n, stratify=y, random_state=int(rng.integers(1000)))
        theirs = pd.Series(taken).value_counts().to_dict()
        # equal wherever the largest-remainder rule has no tie (scikit-learn breaks ties at random)
        fracs = sorted({round(v - int(v), 9) for v in exact.values()})
        if len(fracs) == len(exact):
            assert ours == {c: theirs.get(c, 0) for c in counts}
        assert all(abs(ours[c] - exact[c]) < 1 for c in counts)


def test_sample_is_lesion_unique_and_stratified():
    frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(60)],
                          "label": ["NV"] * 40 + ["MEL"] * 12 + ["BCC"] * 8, "path": "x"})
    lesion = {f"i{k}": f"L{k // 2}" for k in range(60)}  # two images per lesion
    a = sample_cases(frame, 10, seed=3, lesion_of=lesion)
    assert len(a) == 10 and a["image_id"].map(lesion).is_unique
    assert a["label"].value_counts().to_dict() == {"NV": 7, "MEL": 2, "BCC": 1}
    assert a.equals(sample_cases(frame, 10, seed=3, lesion_of=lesion))
    assert not a.equals(sample_cases(frame, 10, seed=4, lesion_of=lesion))
    from lesionlab.exceptions import UserError

    with pytest.raises(UserError, match="only 30 distinct lesions"):
        sample_cases(frame, 31, seed=0, lesion_of=lesion)
