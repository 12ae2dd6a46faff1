"""Who may reach the service and from where: the bind policy, Bearer tokens, Host and Origin checks.

- A non-loopback bind needs tokens and either TLS or a TLS-terminating reverse proxy (`--behind-proxy`).
- Every API call needs `Authorization: Bearer TOKEN` when tokens are configured (`/livez` and `/readyz` stay open,
  like Kubernetes probes; the page itself is static and asks for the token in the browser).
- Host: only the names the service was told it is reached by (DNS rebinding defence; Starlette's
  TrustedHostMiddleware does the check).
- Origin: a request that carries an Origin header from another site is refused (a web page in a clinician's
  browser can POST a multipart form cross-site without a CORS preflight).
- Body size: a request body over the app's limit is answered 413 before the route reads it (`BodySizeLimit`).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from lesionlab.exceptions import UserError


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, tokens: bool, tls: bool, behind_proxy: bool) -> None:
    """Refuse to listen beyond this machine without authentication and an encrypted channel."""
    if is_loopback(host):
        return
    if not tokens:
        raise UserError(f"--host {host} is reachable from the network: require tokens with --tokens FILE "
                        "(create them with `lesionlab tokens add NAME --file FILE`)")
    if not (tls or behind_proxy):
        raise UserError(f"--host {host} would send lesion photos in clear text: give --ssl-certfile and "
                        "--ssl-keyfile, or --behind-proxy when a reverse proxy terminates TLS (README: clinic setup)")


def allowed_hosts(host: str, port: int, extra: Iterable[str] = ()) -> list[str]:
    """Host header values the service answers to: the bind address, loopback names, and any given."""
    names = {"localhost", "127.0.0.1", "::1", "[::1]", *extra}
    if host not in ("0.0.0.0", "::"):
        names.add(host)
    return sorted(names)


def bearer(headers) -> str | None:
    value = headers.get("authorization") or ""
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class OriginCheck:
    """ASGI middleware: refuse (403) a request whose Origin header names another site than the Host it asked."""

    def __init__(self, app, allowed_origins: Iterable[str] = ()):
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        origin = headers.get("origin")
        if origin and not self._same_site(origin, headers.get("host", "")):
            body = json.dumps({"error": f"cross-site request from {origin} refused; open the LesionLab page "
                                        "itself, or list that origin with --allow-origin"}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        return await self.app(scope, receive, send)

    def _same_site(self, origin: str, host: str) -> bool:
        if origin.rstrip("/").lower() in self.allowed:
            return True
        if origin == "null":
            return False
        return (urlsplit(origin).netloc or "").lower() == host.lower()


class _TooLarge(Exception):
    pass


def _mb_message(max_bytes: int) -> str:
    return f"upload larger than the limit of {max_bytes / 2**20:.0f} MB"


class BodySizeLimit:
    """ASGI middleware: answer 413 as soon as a request body exceeds `max_bytes` (declared or streamed).

    Args:
        app: the ASGI app it wraps.
        max_bytes: the largest body accepted.
        message: the 413's JSON `error` for a limit (default: the clinician service's "upload larger than the
            limit of N MB").
    """

    def __init__(self, app, max_bytes: int, message: Callable[[int], str] = _mb_message):
        self.app = app
        self.max_bytes = max_bytes
        self.message = message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0
        started = False
        replaced = False

        async def counting_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return msg

        async def tracking_send(msg):
            # FastAPI turns an error raised while it reads the body into its own 400 ("error parsing the
            # body"); a streamed body over the limit is answered 413 whatever the framework made of it.
            nonlocal started, replaced
            if msg["type"] == "http.response.start" and seen > self.max_bytes:
                replaced = True
                return await self._reject(send)
            if replaced:
                return None
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started and not replaced:
                await self._reject(send)

    async def _reject(self, send):
        body = json.dumps({"error": self.message(self.max_bytes)}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def guard(app, *, allowed_hosts: Iterable[str] | None, allowed_origins: Iterable[str] = ()) -> None:
    """Add the Origin check and (when `allowed_hosts` is given) the Host check to a FastAPI app; every
    LesionLab web app (the clinician service, the reader study) is guarded by this one function."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app.add_middleware(OriginCheck, allowed_origins=tuple(allowed_origins))
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
