"""Run the app on uvicorn: TLS or a trusted proxy, and a graceful shutdown that drains admitted requests.

On SIGTERM/SIGINT uvicorn stops accepting connections and waits for requests in flight, the queued ones included
(they are requests in flight as far as uvicorn knows), for at most `drain_s`; /readyz answers 503 from the
first signal on, so a load balancer stops sending work while the queue drains.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from pathlib import Path

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas before the request threads start.

    Each thread that allocates gets its own arena (up to 8 per core), and a freed 150-MB decode in one arena is
    not reused by the next request on another thread: under load the service's resident memory grew far past
    what the requests in flight hold. `benchmarks/bench_service.py` measured the same load side by side: peak RSS
    5870 MB with glibc's default and 3986 MB with 2 arenas (docs/benchmarks.md). Same as MALLOC_ARENA_MAX=2;
    a no-op (False) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_ARENA_MAX, n))
    except (OSError, AttributeError, TypeError):
        return False


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig, frame):
        self._app.state.ready = False
        super().handle_exit(sig, frame)


def run(app: FastAPI, *, host: str, port: int, ssl_certfile: Path | None = None, ssl_keyfile: Path | None = None,
        behind_proxy: bool = False, forwarded_allow_ips: str = "127.0.0.1", drain_s: float = 120.0,
        limit_concurrency: int | None = None) -> None:
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info",
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None, ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
        # Only a proxy we were told about may set the client address (X-Forwarded-For) and scheme.
        proxy_headers=behind_proxy, forwarded_allow_ips=forwarded_allow_ips if behind_proxy else None,
        # Connections beyond this are answered 503 by uvicorn itself before any body is read.
        limit_concurrency=limit_concurrency,
        timeout_graceful_shutdown=drain_s,
    )
    _DrainingServer(config, app).run()
