"""`serve` (the clinic service) and `tokens` (who may call it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lesionlab.cli.commands import _engine, _engine_arg
from lesionlab.cli.registry import command
from lesionlab.exceptions import UserError

DEFAULT_AUDIT_LOG = Path("lesionlab-audit.jsonl")


def transport_args(p: argparse.ArgumentParser) -> None:
    """TLS, reverse proxy and Host/Origin options of every LesionLab web service."""
    p.add_argument("--ssl-certfile", type=Path, help="TLS certificate (PEM) for HTTPS")
    p.add_argument("--ssl-keyfile", type=Path, help="TLS private key (PEM)")
    p.add_argument("--behind-proxy", action="store_true",
                   help="a reverse proxy on --proxy-ip terminates TLS and sets X-Forwarded-For/-Proto")
    p.add_argument("--proxy-ip", default="127.0.0.1", help="address(es) of the trusted reverse proxy (comma-separated)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name clients use to reach the service (Host header), e.g. lesionlab.clinic.local "
                        "(repeatable; loopback names and --host are always allowed)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="another web origin allowed to call the API from a browser (repeatable)")


def check_transport(a: argparse.Namespace, *, tokens: bool) -> bool:
    """The bind policy (`serve.security.check_bind`) for parsed `transport_args`; whether TLS is on."""
    from lesionlab.serve.security import check_bind

    if (a.ssl_certfile is None) != (a.ssl_keyfile is None):
        raise UserError("give both --ssl-certfile and --ssl-keyfile for HTTPS")
    tls = a.ssl_certfile is not None
    check_bind(a.host, tokens=tokens, tls=tls, behind_proxy=a.behind_proxy)
    return tls


@command("serve", "web service + clinician page for a bundle (FastAPI on uvicorn)")
def _serve(p: argparse.ArgumentParser):
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address; anything but loopback needs --tokens and TLS (or --behind-proxy)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tokens", type=Path, help="token file (`lesionlab tokens add`): every API call then needs "
                   "`Authorization: Bearer TOKEN`")
    transport_args(p)
    p.add_argument("--max-upload-mb", type=float, default=20.0)
    p.add_argument("--max-pixels", type=int, default=50_000_000, help="largest decoded image (pixels)")
    p.add_argument("--workers", type=int, default=2, help="inference workers (requests processed at once)")
    p.add_argument("--queue", type=int, default=8, help="requests that may wait for a worker; beyond: 503")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds a request may take, queue included")
    p.add_argument("--explain-max-px", type=int, default=1024, help="long side of explanations (pixels)")
    p.add_argument("--audit-log", type=Path, default=DEFAULT_AUDIT_LOG,
                   help=f"JSON lines, one per API request (default {DEFAULT_AUDIT_LOG}; never image bytes)")
    p.add_argument("--no-audit-log", action="store_true", help="do not write the audit log")
    p.add_argument("--drain", type=float, default=120.0, help="seconds to finish admitted requests on shutdown")
    p.add_argument("--device", default="auto")
    _engine_arg(p)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = the precision the bundle's threshold was chosen at; another is refused")

    def run(a: argparse.Namespace) -> int:
        from lesionlab.serve.app import ServiceSettings, create_app
        from lesionlab.serve.runner import limit_malloc_arenas
        from lesionlab.serve.runner import run as run_server
        from lesionlab.serve.security import allowed_hosts

        limit_malloc_arenas()  # before any request thread exists

        for name in ("workers", "queue", "explain_max_px"):
            if getattr(a, name) < (0 if name == "queue" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'queue' else '>= 1'}")
        if a.deadline <= 0:
            raise UserError("--deadline must be a positive number of seconds")
        tls = check_transport(a, tokens=a.tokens is not None)
        settings = ServiceSettings(
            max_upload_mb=a.max_upload_mb, max_pixels=a.max_pixels, workers=a.workers, queue=a.queue,
            deadline_s=a.deadline, explain_max_px=a.explain_max_px,
            audit_log=None if a.no_audit_log else a.audit_log, tokens=a.tokens,
            allowed_hosts=tuple(allowed_hosts(a.host, a.port, a.allow_host)), allowed_origins=tuple(a.allow_origin))
        app = create_app(a.bundle, settings, device=a.device, precision=a.precision, engine=_engine(a.engine))
        scheme = "https" if tls else "http"
        print(f"LesionLab serving {a.bundle} on {scheme}://{a.host}:{a.port}/ (API docs at /docs; "
              f"{'tokens required' if a.tokens else 'no tokens: loopback only'}; audit log: "
              f"{settings.audit_log or 'off'})")
        run_server(app, host=a.host, port=a.port, ssl_certfile=a.ssl_certfile, ssl_keyfile=a.ssl_keyfile,
                   behind_proxy=a.behind_proxy, forwarded_allow_ips=a.proxy_ip, drain_s=a.drain,
                   limit_concurrency=max(64, 4 * (a.workers + a.queue)))
        return 0

    return run


@command("tokens", "API tokens for `serve --tokens`: add (printed once, only its hash stored), list, revoke")
def _tokens(p: argparse.ArgumentParser):
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("name", nargs="?", help="who or what the token is for, e.g. room-3-dermatoscope or dr.meyer")
    p.add_argument("--file", type=Path, required=True, help="the token file (created if absent)")

    def run(a: argparse.Namespace) -> int:
        from lesionlab.serve.tokens import TokenStore

        if a.action != "list" and not a.name:
            raise UserError(f"tokens {a.action}: give the token's NAME")
        store = TokenStore.load(a.file, create=a.action == "add")
        if a.action == "list":
            for e in store.entries:
                print(f"{e['name']}\tcreated {e.get('created', '?')}")
            return 0
        if a.action == "revoke":
            store.revoke(a.name).save()
            print(f"revoked {a.name}; restart `lesionlab serve` to apply", file=sys.stderr)
            return 0
        new, token = store.add(a.name)
        new.save()
        print(f"token for {a.name} stored (as a hash) in {a.file}; it is shown only now, copy it:", file=sys.stderr)
        print(token)
        return 0

    return run
