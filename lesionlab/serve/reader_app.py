"""The reader-study service: the reading page and its API, and the admin's invite/progress/export endpoints.

A separate FastAPI app from the clinician page (`serve/app.py`): it loads no model (the AI's answers were computed
when the study was created and are read from the database), so it starts in a second and serves many readers.
Every request carries a token as `Authorization: Bearer <token>`; the reading page takes it from the invitation
link's fragment (`/#token=...`, which browsers never send to the server, so tokens stay out of access logs).
"""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from lesionlab import __version__
from lesionlab.exceptions import UserError
from lesionlab.workflows.reader_study import reading
from lesionlab.workflows.reader_study.db import ReaderDB, open_db
from lesionlab.workflows.reader_study.errors import NotFound, ReaderStudyError, Unauthorized

STATIC = {"reader.js": "text/javascript", "reader.css": "text/css", "answer.js": "text/javascript", "answer.css": "text/css"}


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    kind, _, token = authorization.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be `Bearer <token>`")
    return token.strip()


def create_reader_app(db: str | Path | ReaderDB) -> FastAPI:
    """The reader service over a reader-study database (a path/URL, opened and migrated here, or an open one)."""
    rdb = db if isinstance(db, ReaderDB) else open_db(db)
    app = FastAPI(title="LesionLab reader study", version=__version__,
                  description="Reader studies: clinicians read cases unaided and with the AI's answer.")
    app.state.db = rdb

    @app.middleware("http")
    async def _no_store(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"  # answers and images stay out of shared caches
        return response

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

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "lesionlab_version": __version__, "database": rdb.dialect}

    # ------------------------------------------------------------------ readers
    @app.get("/api/reader/state")
    def state(authorization: str | None = Header(None)) -> dict[str, Any]:
        """Where the reader stands (profile, phase, progress, current case key); no side effects."""
        with rdb.read() as s:
            return reading.reader_state(s, reading.reader_for_token(s, _bearer(authorization)))

    @app.post("/api/reader/profile")
    def profile(level: str = Body(...), years: float = Body(...), authorization: str | None = Header(None)) -> dict:
        with rdb.write() as s:
            reader = reading.reader_for_token(s, _bearer(authorization))
            reading.set_profile(s, reader, level, years)
        return {"status": "saved", "level": level, "years": years}

    @app.post("/api/reader/open")
    def open_case(authorization: str | None = Header(None)) -> dict[str, Any]:
        """The current case, opened now (time per case runs from here); the AI's answer only when aided."""
        with rdb.write() as s:
            return reading.open_current(s, reading.reader_for_token(s, _bearer(authorization)))

    @app.get("/api/reader/cases/{key}/image")
    def image(key: str, authorization: str | None = Header(None)) -> Response:
        with rdb.read() as s:
            data, kind = reading.case_image(s, reading.reader_for_token(s, _bearer(authorization)), key)
        return Response(data, media_type=kind)

    @app.post("/api/reader/cases/{key}/read")
    def read(key: str, answer: dict[str, Any] = Body(...), authorization: str | None = Header(None)) -> JSONResponse:
        """Record an answer: 201 recorded, 200 the same answer again (idempotent), 409 another answer, 404 a case
        of another study."""
        with rdb.write() as s:
            created, body = reading.submit(s, reading.reader_for_token(s, _bearer(authorization)), key, answer)
        return JSONResponse(body, status_code=201 if created else 200)

    # ------------------------------------------------------------------ admin
    @app.get("/api/admin/studies/{name}/progress")
    def admin_progress(name: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        with rdb.read() as s:
            reading.check_admin(s, _bearer(authorization))
            study = reading.study_named(s, name)
            return {"study": name, "readers": reading.progress(s, study)}

    @app.post("/api/admin/studies/{name}/readers")
    def admin_invite(name: str, names: list[str] = Body(..., embed=True),
                     authorization: str | None = Header(None)) -> dict[str, Any]:
        from lesionlab.workflows.reader_study.create import invite_readers

        return {"study": name, "tokens": invite_readers(rdb, name, names, admin_token=_bearer(authorization))}

    @app.get("/api/admin/studies/{name}/{table}.csv")
    def admin_export(name: str, table: str, task: str = Query("melanoma", description="melanoma or malignancy (mrmc)"),
                     authorization: str | None = Header(None)) -> Response:
        from lesionlab.workflows.reader_study.export import mrmc_long, study_tables
        from lesionlab.workflows.reader_study.schema import TASKS

        if table not in ("reads", "cases", "mrmc"):
            raise NotFound(f"no table {table!r}: use reads.csv, cases.csv or mrmc.csv?task=melanoma|malignancy")
        if table == "mrmc" and task not in TASKS:
            raise ReaderStudyError(f"task {task!r} must be one of {', '.join(TASKS)}")
        reads, cases = study_tables(rdb, name, admin_token=_bearer(authorization))
        frame = {"reads": reads, "cases": cases}.get(table)
        frame = mrmc_long(reads, task) if frame is None else frame
        buf = io.StringIO()
        frame.to_csv(buf, index=False)
        return Response(buf.getvalue(), media_type="text/csv")

    return app
