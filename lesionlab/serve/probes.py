"""The liveness and readiness probes both services answer, open (no token) for an orchestrator or load balancer."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse


def add_probes(app: FastAPI, healthy: Callable[[], bool] | None = None) -> None:
    """`/livez` (the process answers) and `/readyz`: 200 while `app.state.ready` (false once SIGTERM arrives, see
    `runner`) and `healthy()` (e.g. the database answers), else 503."""

    @app.get("/livez", include_in_schema=False)
    def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        ready = bool(app.state.ready) and (healthy is None or healthy())
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)
