"""The one door every API request passes: request id, authentication, admission, metrics and the audit log.

An ASGI middleware (not a FastAPI dependency) so that requests refused before any route runs (no token, queue
full, upload too large) are counted and logged exactly like answered ones, in one place. Every LesionLab web app
passes through it: the clinician service with its defaults (token file, inference admission, `/api/predict`
audited), the reader study with its own endpoint labels and audit rule (its tokens live in its database, so its
routes authenticate and tell the gate who called through `request.state.token_name`).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

from lesionlab.serve.audit import AuditLog
from lesionlab.serve.metrics import RequestMetrics
from lesionlab.serve.security import bearer
from lesionlab.serve.tokens import TokenStore
from lesionlab.serve.work import WorkLimiter

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PREDICT = "/api/predict"
OUTCOMES: Mapping[int, str] = {401: "unauthorized", 403: "forbidden", 413: "too_large", 503: "busy"}
REFUSED = ("unauthorized", "forbidden", "error")  # outcomes the clinician service audits on any endpoint


def endpoint_of(path: str) -> str | None:
    """The metrics/audit label of a path, or None for what is not an API call (page, docs, probes)."""
    if path.startswith("/api/") or path == "/metrics":
        return path if path in (PREDICT, "/api/health", "/metrics") else "other"
    return None


def outcome_of(status: int, names: Mapping[int, str] = OUTCOMES) -> str:
    """The outcome label of an HTTP status: "ok" below 400, a name from `names`, else "error" (5xx) or
    "rejected" (4xx)."""
    if status < 400:
        return "ok"
    return names.get(status, "error" if status >= 500 else "rejected")


def clinic_audited(endpoint: str, method: str, outcome: str) -> bool:
    """The clinician service's audit rule: every prediction, and every refused or failed call."""
    return endpoint == PREDICT or outcome in REFUSED


class Gate:
    """The ASGI middleware; the keyword arguments after `identity` default to the clinician service's policy.

    Args:
        app: the ASGI app it wraps.
        limiter: admission for the `admitted` (method, endpoint) pairs (None: nothing is admitted or queued).
        metrics: where requests are counted.
        audit: the audit log (None: off).
        tokens: a token file every API call must match (None: the routes authenticate, if anything does).
        identity: fields added to every audit record (the bundle served).
        endpoint_of: path -> endpoint label, or None for a path the gate lets through untouched.
        outcomes: HTTP status -> outcome label (for statuses a route did not label itself).
        audited: (endpoint, method, outcome) -> whether the request gets an audit record.
        admitted: the (method, endpoint) pairs that take a place in `limiter`.
        who_field: the audit record's field for who called (the token's name, or what a route set in
            `request.state.token_name`; never a token).
    """

    def __init__(self, app, *, limiter: WorkLimiter | None = None, metrics: RequestMetrics,
                 audit: AuditLog | None, tokens: TokenStore | None = None,
                 identity: Callable[[], dict[str, Any]] = dict,
                 endpoint_of: Callable[[str], str | None] = endpoint_of,
                 outcomes: Mapping[int, str] = OUTCOMES,
                 audited: Callable[[str, str, str], bool] = clinic_audited,
                 admitted: Collection[tuple[str, str]] = (("POST", PREDICT),),
                 who_field: str = "token_name"):
        self.app = app
        self.limiter, self.metrics, self.audit, self.tokens, self.identity = limiter, metrics, audit, tokens, identity
        self.endpoint_of, self.outcomes, self.audited = endpoint_of, outcomes, audited
        self.admitted, self.who_field = frozenset(admitted), who_field

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (endpoint := self.endpoint_of(scope["path"])) is None:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state.update(request_id=rid, audit={}, token_name=None)
        status = [500]
        started = [False]

        async def send_with_id(msg):
            if msg["type"] == "http.response.start":
                status[0], started[0] = msg["status"], True
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)

        t0 = time.monotonic()
        try:
            if self.tokens is not None:
                state["token_name"] = self.tokens.verify(bearer(headers))
                if state["token_name"] is None:
                    return await self._refuse(send_with_id, 401, "missing or unknown API token: send "
                                              "`Authorization: Bearer TOKEN` (tokens come from `lesionlab tokens add`)",
                                              [(b"www-authenticate", b'Bearer realm="lesionlab"')])
            if self.limiter is not None and (scope["method"], endpoint) in self.admitted:
                deadline = self.limiter.try_admit()
                if deadline is None:
                    wait = self.limiter.retry_after()
                    return await self._refuse(send_with_id, 503, "the service is at capacity; try again later",
                                              [(b"retry-after", str(wait).encode())])
                state["deadline"] = deadline
                try:
                    return await self.app(scope, receive, send_with_id)
                finally:
                    self.limiter.release()
            return await self.app(scope, receive, send_with_id)
        except Exception:
            # A bug, not the user's input: the traceback goes to the server log under the request id, and the
            # client gets one JSON line with that id (never a reset connection or an HTML page).
            log.exception("request %s (%s %s) failed", rid, scope["method"], scope["path"])
            if not started[0]:
                await self._refuse(send_with_id, 500, f"internal error (request id {rid}); the service's "
                                   "administrator finds the details in its log under that id", [])
        finally:
            self._record(scope, endpoint, status[0], time.monotonic() - t0, headers)

    async def _refuse(self, send, status: int, message: str, extra: list[tuple[bytes, bytes]]):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra]})
        await send({"type": "http.response.body", "body": json.dumps({"error": message}).encode()})

    def _record(self, scope, endpoint: str, status: int, seconds: float, headers: dict[str, str]) -> None:
        state = scope["state"]
        detail: dict[str, Any] = state.get("audit") or {}
        outcome = detail.pop("outcome", None) or outcome_of(status, self.outcomes)
        self.metrics.observe(endpoint, outcome, seconds, detail.get("reasons"))
        if self.audit is None or not self.audited(endpoint, scope["method"], outcome):
            return
        client = scope.get("client")
        self.audit.write({
            "request_id": state["request_id"], "endpoint": endpoint, "method": scope["method"],
            "client": client[0] if client else None, self.who_field: state.get("token_name"),
            "http_status": status, "outcome": outcome, "seconds": round(seconds, 4),
            **self.identity(), **detail,
        })
