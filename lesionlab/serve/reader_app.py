"""The reader-study service: the reading page and its API, and the admin's invite/progress/export endpoints.

A separate FastAPI app from the clinician page (`serve/app.py`): it loads no model (the AI's answers were computed
when the study was created and are read from the database), so it starts in a second and serves many readers.
Every request carries a token as `Authorization: Bearer <token>`; the reading page takes it from the invitation
link's fragment (`/#token=...`, which browsers never send to the server, so tokens stay out of access logs).

Reachable from a network, so guarded like the clinician service and by the same code (`security`, `gate`,
`audit`, `metrics`): Host and Origin checks, a small body limit (every body is a short JSON document; answers
have no free text: diagnosis, rating, management and modality are checked against the study's choices), a
request id on every API answer, an append-only audit log (who, which endpoint and case, status and outcome;
never a token, never an answer), Prometheus `/metrics` behind the admin token, and `/livez` / `/readyz`.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import Body, FastAPI, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from lesionlab import __version__
from lesionlab.exceptions import UserError
from lesionlab.serve.audit import AuditLog
from lesionlab.serve.gate import OUTCOMES, Gate
from lesionlab.serve.metrics import ReaderMetrics
from lesionlab.serve.probes import add_probes
from lesionlab.serve.security import BodySizeLimit, guard
from lesionlab.workflows.reader_study import reading
from lesionlab.workflows.reader_study.db import Reader, ReaderDB, Study, open_db
from lesionlab.workflows.reader_study.errors import Forbidden, NotFound, ReaderStudyError, Unauthorized

STATIC = {"reader.js": "text/javascript", "reader.css": "text/css", "answer.js": "text/javascript", "answer.css": "text/css"}
AUDIT_LOG_NAME = "reader-audit.jsonl"

# Endpoint labels (metrics and audit): the route templates, so a label never carries a case key or study name.
_ENDPOINTS = [(re.compile(rx), label) for rx, label in (
    (r"/api/health", "/api/health"),
    (r"/api/reader/state", "/api/reader/state"),
    (r"/api/reader/profile", "/api/reader/profile"),
    (r"/api/reader/open", "/api/reader/open"),
    (r"/api/reader/cases/[^/]+/image", "/api/reader/cases/{key}/image"),
    (r"/api/reader/cases/[^/]+/read", "/api/reader/cases/{key}/read"),
    (r"/api/admin/studies/[^/]+/progress", "/api/admin/studies/{name}/progress"),
    (r"/api/admin/studies/[^/]+/readers", "/api/admin/studies/{name}/readers"),
    (r"/api/admin/studies/[^/]+/[^/]+\.csv", "/api/admin/studies/{name}/{table}.csv"),
    (r"/metrics", "/metrics"),
)]
# What changes the study or takes data out of it: audited whatever the answer.
STATE_CHANGING = frozenset({"/api/reader/profile", "/api/reader/open", "/api/reader/cases/{key}/read",
                            "/api/admin/studies/{name}/readers", "/api/admin/studies/{name}/{table}.csv"})
OUTCOMES_READER = {**OUTCOMES, 404: "not_found", 409: "conflict"}
REFUSED = frozenset({"unauthorized", "forbidden", "not_found", "conflict", "too_large", "error"})
_KEY_CHARS = 64  # a case key is 11 characters; what a client sends instead is cut before it reaches the log


def endpoint_of(path: str) -> str | None:
    """The reader service's metrics/audit label of a path; None for the page, static files and probes."""
    if not (path.startswith("/api/") or path == "/metrics"):
        return None
    return next((label for rx, label in _ENDPOINTS if rx.fullmatch(path)), "other")


def audited(endpoint: str, method: str, outcome: str) -> bool:
    """One record per state-changing request (and export), and per refused or failed request."""
    return endpoint in STATE_CHANGING or outcome in REFUSED


def default_audit_log(db: ReaderDB) -> Path:
    """`reader-audit.jsonl` beside a SQLite database; in the working directory for a database server."""
    if db.dialect == "sqlite" and db.engine.url.database:
        return Path(db.engine.url.database).parent / AUDIT_LOG_NAME
    return Path(AUDIT_LOG_NAME)


@dataclass(frozen=True)
class ReaderServiceSettings:
    """What bounds and guards the reader service (`reader-study serve` options map onto it)."""

    max_body_kib: int = 64       # every request body (answers, profile, invitations) is small JSON
    audit_log: Path | None = None
    allowed_hosts: tuple[str, ...] | None = None   # Host header values answered (None: any, for library use)
    allowed_origins: tuple[str, ...] = ()
    active_window_s: float = 900.0                 # a reader counts as active this long after a request


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    kind, _, token = authorization.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be `Bearer <token>`")
    return token.strip()


def _kib_message(max_bytes: int) -> str:
    return f"request body larger than the limit of {max_bytes // 1024} KiB"


def create_reader_app(db: str | Path | ReaderDB, settings: ReaderServiceSettings | None = None,
                      **overrides: Any) -> FastAPI:
    """The reader service over a reader-study database (a path/URL, opened and migrated here, or an open one).

    Guarded like the clinician service and by the same code: `security.guard` (Host, Origin),
    `security.BodySizeLimit`, and `gate.Gate` (request id, metrics, audit log), here with the reader service's
    endpoint labels and audit rule. Tokens live in the database, so the routes authenticate and tell the gate
    who called (`request.state.token_name`: the reader's name or `admin`, never a token).
    `overrides` replace single `ReaderServiceSettings` fields (e.g. `audit_log=path`).
    """
    s = replace(settings or ReaderServiceSettings(), **overrides)
    rdb = db if isinstance(db, ReaderDB) else open_db(db)
    metrics = ReaderMetrics(s.active_window_s)
    audit = AuditLog(s.audit_log) if s.audit_log else None
    app = FastAPI(title="LesionLab reader study", version=__version__,
                  description="Reader studies: clinicians read cases unaided and with the AI's answer.")
    app.state.db, app.state.settings, app.state.metrics, app.state.ready = rdb, s, metrics, True

    @app.middleware("http")
    async def _no_store(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"  # answers and images stay out of shared caches
        return response

    # Outermost first: the gate (request id, metrics, audit), so that requests the Host and Origin checks
    # refuse are counted and logged too; then Host, Origin, and the body limit right around the routes.
    app.add_middleware(BodySizeLimit, max_bytes=s.max_body_kib * 1024, message=_kib_message)
    guard(app, allowed_hosts=s.allowed_hosts, allowed_origins=s.allowed_origins)
    app.add_middleware(Gate, metrics=metrics, audit=audit, endpoint_of=endpoint_of, outcomes=OUTCOMES_READER,
                       audited=audited, admitted=(), who_field="role")

    def as_reader(request: Request, session: sa.orm.Session, authorization: str | None) -> Reader:
        """The calling reader (401/403 otherwise), named to the gate's audit record and metrics."""
        try:
            reader = reading.reader_for_token(session, _bearer(authorization))
        except Forbidden:
            request.state.token_name = "admin"  # an admin token on a reader's endpoint
            raise
        request.state.token_name = reader.name
        request.state.audit["study"] = session.get(Study, reader.study_id).name
        metrics.seen(reader.id)
        return reader

    def as_admin(request: Request, authorization: str | None, name: str | None = None) -> str | None:
        """Check the admin token (401/403 otherwise); returns the token for the workflow functions."""
        token = _bearer(authorization)
        if name is not None:
            request.state.audit["study"] = name[:200]
        with rdb.read() as session:
            try:
                reading.check_admin(session, token)
            except Forbidden:
                with contextlib.suppress(ReaderStudyError):  # a reader's token: say which reader tried
                    request.state.token_name = reading.reader_for_token(session, token).name
                raise
        request.state.token_name = "admin"
        return token

    def note_case(request: Request, key: str) -> None:
        request.state.audit["case"] = key[:_KEY_CHARS]

    @app.exception_handler(ReaderStudyError)
    async def _study_error(request: Request, exc: ReaderStudyError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    def _static(name: str) -> str:
        return resources.files("lesionlab.serve").joinpath(f"static/{name}").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return _static("reader.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        return Response(_static(name), media_type=STATIC[name])

    def database_answers() -> bool:
        try:
            with rdb.read() as session:
                session.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError:
            return False
        return True

    add_probes(app, database_answers)  # ready while not shutting down and while the database answers

    @app.get("/metrics", include_in_schema=False)
    def prometheus(request: Request, authorization: str | None = Header(None)) -> Response:
        """Prometheus metrics; the admin token is needed (scrape with `authorization: credentials: ...`)."""
        as_admin(request, authorization)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "lesionlab_version": __version__, "database": rdb.dialect,
                "max_body_kib": s.max_body_kib}

    # ------------------------------------------------------------------ readers
    @app.get("/api/reader/state")
    def state(request: Request, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Where the reader stands (profile, phase, progress, current case key); no side effects."""
        with rdb.read() as session:
            return reading.reader_state(session, as_reader(request, session, authorization))

    @app.post("/api/reader/profile")
    def profile(request: Request, level: str = Body(...), years: float = Body(...),
                authorization: str | None = Header(None)) -> dict:
        with rdb.write() as session:
            reading.set_profile(session, as_reader(request, session, authorization), level, years)
        return {"status": "saved", "level": level, "years": years}

    @app.post("/api/reader/open")
    def open_case(request: Request, authorization: str | None = Header(None)) -> dict[str, Any]:
        """The current case, opened now (time per case runs from here); the AI's answer only when aided."""
        with rdb.write() as session:
            out = reading.open_current(session, as_reader(request, session, authorization))
        if isinstance(out.get("case"), dict):
            note_case(request, out["case"]["key"])
        return out

    @app.get("/api/reader/cases/{key}/image")
    def image(request: Request, key: str, authorization: str | None = Header(None)) -> Response:
        note_case(request, key)
        with rdb.read() as session:
            data, kind = reading.case_image(session, as_reader(request, session, authorization), key)
        return Response(data, media_type=kind)

    @app.post("/api/reader/cases/{key}/read")
    def read(request: Request, key: str, answer: dict[str, Any] = Body(...),
             authorization: str | None = Header(None)) -> JSONResponse:
        """Record an answer: 201 recorded, 200 the same answer again (idempotent), 409 another answer, 404 a case
        of another study. The audit record names the case, never the answer."""
        note_case(request, key)
        with rdb.write() as session:
            created, body = reading.submit(session, as_reader(request, session, authorization), key, answer)
        request.state.audit["outcome"] = "recorded" if created else "already_recorded"
        if created:
            metrics.read_recorded(body["modality"])
        return JSONResponse(body, status_code=201 if created else 200)

    # ------------------------------------------------------------------ admin
    @app.get("/api/admin/studies/{name}/progress")
    def admin_progress(request: Request, name: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        as_admin(request, authorization, name)
        with rdb.read() as session:
            study = reading.study_named(session, name)
            return {"study": name, "readers": reading.progress(session, study)}

    @app.post("/api/admin/studies/{name}/readers")
    def admin_invite(request: Request, name: str, names: list[str] = Body(..., embed=True),
                     authorization: str | None = Header(None)) -> dict[str, Any]:
        from lesionlab.workflows.reader_study.create import invite_readers

        token = as_admin(request, authorization, name)
        tokens = invite_readers(rdb, name, names, admin_token=token)
        request.state.audit["invited"] = list(tokens)  # names only: the tokens go to the admin, nowhere else
        return {"study": name, "tokens": tokens}

    @app.get("/api/admin/studies/{name}/{table}.csv")
    def admin_export(request: Request, name: str, table: str,
                     task: str = Query("melanoma", description="melanoma or malignancy (mrmc)"),
                     authorization: str | None = Header(None)) -> Response:
        from lesionlab.workflows.reader_study.export import mrmc_long, study_tables
        from lesionlab.workflows.reader_study.schema import TASKS

        token = as_admin(request, authorization, name)
        if table not in ("reads", "cases", "mrmc"):
            raise NotFound(f"no table {table!r}: use reads.csv, cases.csv or mrmc.csv?task=melanoma|malignancy")
        if table == "mrmc" and task not in TASKS:
            raise ReaderStudyError(f"task {task!r} must be one of {', '.join(TASKS)}")
        request.state.audit.update(table=table, **({"task": task} if table == "mrmc" else {}))
        reads, cases = study_tables(rdb, name, admin_token=token)
        frame = {"reads": reads, "cases": cases}.get(table)
        frame = mrmc_long(reads, task) if frame is None else frame
        buf = io.StringIO()
        frame.to_csv(buf, index=False)
        return Response(buf.getvalue(), media_type="text/csv")

    return app
