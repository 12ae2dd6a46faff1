"""`lesionlab reader-study`: create, invite, serve, progress, export, analyse (argument parsing only)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lesionlab.cli.registry import command
from lesionlab.cli.service import check_transport, transport_args
from lesionlab.exceptions import UserError

ADMIN_ENV = "LESIONLAB_ADMIN_TOKEN"


def _db_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--db", required=required, help="the study database: a SQLite file, or "
                   "postgresql://user:password@host:port/dbname for a multi-site study")


def _admin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-token", default=None,
                   help=f"the database's admin token (default: ${ADMIN_ENV}; a new database makes one)")


def _admin(a: argparse.Namespace) -> str | None:
    return a.admin_token or os.environ.get(ADMIN_ENV) or None


def _study_db(a: argparse.Namespace) -> str:
    """--db, or the default SQLite file beside the study folder / truth CSV."""
    from lesionlab.workflows.reader_study.db import DEFAULT_SQLITE_NAME

    if a.db:
        return a.db
    beside = Path(a.study) if a.study else Path(a.truth).parent
    return str(beside / DEFAULT_SQLITE_NAME)


def _write_invitations(path: Path, base_url: str, tokens: dict[str, str]) -> None:
    """Invitation links (secrets) to a CSV only its owner can read, written atomically."""
    import pandas as pd

    from lesionlab.io import atomic_write

    df = pd.DataFrame({"reader": list(tokens), "token": list(tokens.values()),
                       "link": [f"{base_url.rstrip('/')}/#token={t}" for t in tokens.values()]})

    def write(tmp: Path) -> None:
        os.chmod(tmp, 0o600)
        df.to_csv(tmp, index=False)

    if path.exists():  # more readers invited later: keep the earlier links
        old = pd.read_csv(path, dtype=str)
        df = pd.concat([old[~old["reader"].isin(df["reader"])], df], ignore_index=True)
    atomic_write(path, write)


def _readers(a: argparse.Namespace) -> list[str]:
    names = list(a.reader or [])
    if getattr(a, "readers", None):
        names += [f"reader{k + 1:02d}" for k in range(a.readers)]
    return names


def _add_create(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("cases (one of)")
    src.add_argument("--study", type=Path, help="study folder: sample its test split (one image per lesion, by class)")
    src.add_argument("--images", type=Path, help="image folder (with --truth)")
    src.add_argument("--truth", type=Path, help="ISIC ground-truth CSV of --images")
    p.add_argument("--data", type=Path, help="the study's images, when not where the study read them")
    p.add_argument("--cases", type=int, help="number of cases (default: 50 from --study; all of --images)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sample, the case ids and every reader's order")
    p.add_argument("--bundle", type=Path, help="bundle for the AI-assisted phase (without it: unaided only)")
    p.add_argument("--device", default="auto", help="device to compute the AI's answers on (auto, cpu, cuda)")
    p.add_argument("--name", required=True, help="study name (unique in the database)")
    p.add_argument("--scale", choices=["1-6", "0-100"], default="1-6", help="malignancy confidence scale")
    p.add_argument("--washout-days", type=float, default=14.0, help="minimum days between a reader's two phases")
    p.add_argument("--crossover", action="store_true", help="every second reader reads with the AI first")
    p.add_argument("--reader", action="append", help="invite a reader by name (repeatable)")
    p.add_argument("--readers", type=int, help="invite N readers named reader01..readerNN")
    p.add_argument("--url", default="http://127.0.0.1:8001", help="address readers will open (for the links)")
    p.add_argument("--invitations", type=Path, help="CSV of invitation links (default: beside the database)")
    _db_arg(p, required=False)
    _admin_arg(p)


def _create(a: argparse.Namespace) -> int:
    from lesionlab.workflows.reader_study.create import cases_from_files, cases_from_study, create_study
    from lesionlab.workflows.reader_study.db import open_db

    if bool(a.study) == bool(a.images or a.truth) or (a.images is None) != (a.truth is None):
        raise UserError("give either --study STUDY, or --images DIR with --truth CSV")
    if a.study:
        cases = cases_from_study(a.study, n=a.cases or 50, seed=a.seed, data=a.data)
        source = f"study {a.study.resolve()} test split, {len(cases)} cases, seed {a.seed}"
    else:
        cases = cases_from_files(a.images, a.truth, n=a.cases, seed=a.seed)
        source = f"images {a.images.resolve()} with truth {a.truth.resolve()}"
    bundle = None
    if a.bundle:
        from lesionlab.clinic.bundle import EnsemblePredictor

        bundle = EnsemblePredictor(a.bundle, device=a.device)
    db = open_db(_study_db(a))
    made = create_study(db, name=a.name, cases=cases, bundle=bundle, scale=a.scale, washout_days=a.washout_days,
                        crossover=a.crossover, seed=a.seed, readers=_readers(a), admin_token=_admin(a), source=source)
    print(f"reader study {made.name!r}: {made.cases} cases, {'aided and unaided' if bundle else 'unaided only'}, "
          f"{len(made.invitations)} readers invited, database {db!r}")
    if made.admin_token:
        print(f"admin token (shown once; keep it secret, e.g. export {ADMIN_ENV}=...): {made.admin_token}")
    if made.invitations:
        out = a.invitations or _default_invitations(db, made.name)
        _write_invitations(out, a.url, made.invitations)
        print(f"invitation links: {out} (readable by you only; send each reader their own link)")
    return 0


def _default_invitations(db, name: str) -> Path:
    if db.dialect == "sqlite":
        return Path(db.engine.url.database).parent / f"invitations_{name}.csv"
    return Path(f"invitations_{name}.csv")


def _add_invite(p: argparse.ArgumentParser) -> None:
    _db_arg(p)
    p.add_argument("--name", required=True, help="study name")
    p.add_argument("--reader", action="append", help="reader name (repeatable)")
    p.add_argument("--readers", type=int, help="invite N more readers named reader01..")
    p.add_argument("--url", default="http://127.0.0.1:8001", help="address readers will open (for the links)")
    p.add_argument("--invitations", type=Path, help="CSV of invitation links (default: beside the database)")
    _admin_arg(p)


def _invite(a: argparse.Namespace) -> int:
    from lesionlab.workflows.reader_study.create import invite_readers
    from lesionlab.workflows.reader_study.db import open_db

    names = list(a.reader or [])
    db = open_db(a.db, migrate=False)
    if a.readers:
        from lesionlab.workflows.reader_study import reading

        with db.read() as s:
            reading.check_admin(s, _admin(a))
            have = len(reading.progress(s, reading.study_named(s, a.name)))
        names += [f"reader{have + k + 1:02d}" for k in range(a.readers)]
    if not names:
        raise UserError("name the readers to invite: --reader NAME (repeatable) or --readers N")
    tokens = invite_readers(db, a.name, names, admin_token=_admin(a))
    out = a.invitations or _default_invitations(db, a.name)
    _write_invitations(out, a.url, tokens)
    print(f"{len(tokens)} readers invited to {a.name!r}; invitation links: {out}")
    return 0


def _add_serve(p: argparse.ArgumentParser) -> None:
    _db_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback needs TLS "
                   "(--ssl-certfile/--ssl-keyfile) or --behind-proxy (readers always need their tokens)")
    p.add_argument("--port", type=int, default=8001)
    transport_args(p)
    p.add_argument("--audit-log", type=Path, default=None,
                   help="JSON lines, one per state-changing or refused request (default: reader-audit.jsonl "
                        "beside a SQLite --db, else in the working directory; never tokens or answers)")
    p.add_argument("--no-audit-log", action="store_true", help="do not write the audit log")


def _serve(a: argparse.Namespace) -> int:
    from lesionlab.serve.reader_app import ReaderServiceSettings, create_reader_app, default_audit_log
    from lesionlab.serve.runner import run as run_server
    from lesionlab.serve.security import allowed_hosts
    from lesionlab.workflows.reader_study.db import open_db

    tls = check_transport(a, tokens=True)  # every reader and admin call needs its token
    db = open_db(a.db, migrate=False)
    settings = ReaderServiceSettings(
        audit_log=None if a.no_audit_log else (a.audit_log or default_audit_log(db)),
        allowed_hosts=tuple(allowed_hosts(a.host, a.port, a.allow_host)), allowed_origins=tuple(a.allow_origin))
    app = create_reader_app(db, settings)
    print(f"reader study service on {'https' if tls else 'http'}://{a.host}:{a.port}/ "
          f"(readers open their invitation links; audit log: {settings.audit_log or 'off'}; "
          "metrics at /metrics with the admin token)")
    run_server(app, host=a.host, port=a.port, ssl_certfile=a.ssl_certfile, ssl_keyfile=a.ssl_keyfile,
               behind_proxy=a.behind_proxy, forwarded_allow_ips=a.proxy_ip, drain_s=30)
    return 0


def _add_progress(p: argparse.ArgumentParser) -> None:
    _db_arg(p)
    p.add_argument("--name", required=True, help="study name")
    _admin_arg(p)


def _progress(a: argparse.Namespace) -> int:
    import pandas as pd

    from lesionlab.workflows.reader_study import reading
    from lesionlab.workflows.reader_study.db import open_db

    db = open_db(a.db, migrate=False)
    with db.read() as s:
        reading.check_admin(s, _admin(a))
        rows = reading.progress(s, reading.study_named(s, a.name))
    print(pd.DataFrame(rows).to_string(index=False) if rows else f"study {a.name!r} has no readers yet")
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    _db_arg(p)
    p.add_argument("--name", required=True, help="study name")
    p.add_argument("--out", type=Path, required=True, help="folder for reads.csv, cases.csv, mrmc_<task>.csv")
    _admin_arg(p)


def _export(a: argparse.Namespace) -> int:
    from lesionlab.workflows.reader_study.db import open_db
    from lesionlab.workflows.reader_study.export import export_study

    files = export_study(open_db(a.db, migrate=False), a.name, a.out, admin_token=_admin(a))
    for f in files.values():
        print(f)
    return 0


def _add_analyse(p: argparse.ArgumentParser) -> None:
    _db_arg(p, required=False)
    p.add_argument("--name", help="study name (with --db)")
    p.add_argument("--reads", type=Path, help="a reads CSV: the full reads table or the long MRMC format "
                   "(reader,modality,case,truth,rating), e.g. published reader data")
    p.add_argument("--out", type=Path, required=True, help="folder for the analysis report")
    _admin_arg(p)


def _analyse(a: argparse.Namespace) -> int:
    from lesionlab.workflows.reader_study.analyse import read_reads_file, run_analysis

    if bool(a.db) == bool(a.reads) or (a.db and not a.name):
        raise UserError("give either --db DB with --name STUDY, or --reads FILE")
    if a.reads:
        reads, cases = read_reads_file(a.reads)
    else:
        from lesionlab.workflows.reader_study.db import open_db
        from lesionlab.workflows.reader_study.export import study_tables

        reads, cases = study_tables(open_db(a.db, migrate=False), a.name, admin_token=_admin(a))
        if reads.empty:
            raise UserError(f"study {a.name!r} has no reads yet; nothing to analyse")
    summary = run_analysis(reads, cases, a.out)
    print(f"reader-study analysis written to {a.out}")
    for k, v in (summary or {}).items():
        if isinstance(v, str | int | float):
            print(f"  {k}: {v}")
    return 0


SUBCOMMANDS = {
    "create": (_add_create, _create, "create a study: cases, the AI's answers, readers' invitation links"),
    "invite": (_add_invite, _invite, "invite more readers to a study"),
    "serve": (_add_serve, _serve, "run the reading web service"),
    "progress": (_add_progress, _progress, "show each reader's progress"),
    "export": (_add_export, _export, "write the reads (and the long MRMC tables) as CSV"),
    "analyse": (_add_analyse, _analyse, "analyse a study's reads or a reads CSV (MRMC, ROC, by experience)"),
}


@command("reader-study", "reader studies: clinicians unaided and with the AI, from creation to MRMC analysis")
def _reader_study(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="reader_study_command", metavar="STEP")
    runners = {}
    for name, (add, run, help_) in SUBCOMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
        runners[name] = run

    def run(a: argparse.Namespace) -> int:
        if not a.reader_study_command:
            p.print_help(sys.stderr)
            return 2
        return runners[a.reader_study_command](a)

    return run
