"""The reader-study database: SQLAlchemy 2 tables, opened through alembic migrations (SQLite or PostgreSQL).

One database may hold several studies. Tables (all prefixed `reader_` so they can live in a shared PostgreSQL
database next to other applications):

- `reader_admins`: SHA-256 of the admin tokens (create studies, invite readers, export).
- `reader_studies`: one row per study: rating scale, washout rule, crossover, seed, label set, the bundle used.
- `reader_cases`: the cases of a study: opaque case key, image id, truth, the image (JPEG bytes, so the database
  alone serves a study, also to readers of another site) and the AI's answer exactly as the clinician page gets it.
- `reader_readers`: invited readers: SHA-256 of their token, level and years (entered by the reader), the modality
  they start with (crossover), their order seed, when they finished phase 1.
- `reader_openings`: when a reader opened a case (server time; for time per case and for resuming).
- `reader_reads`: one row per reader x case x modality, under a unique constraint (a double submission can never
  make a second row).

`open_db(url)` upgrades the schema to the newest alembic revision (migrations/versions) before anything else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from lesionlab.exceptions import UserError

log = logging.getLogger(__name__)

DEFAULT_SQLITE_NAME = "reader_study.sqlite"
VERSION_TABLE = "reader_alembic_version"


def utcnow() -> dt.datetime:
    """Naive UTC now: SQLite keeps no time zone, so every time is stored as naive UTC on both backends."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Admin(Base):
    __tablename__ = "reader_admins"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime())


class Study(Base):
    __tablename__ = "reader_studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime())
    scale: Mapped[str] = mapped_column(sa.String(16))            # "1-6" or "0-100"
    washout_days: Mapped[float] = mapped_column(sa.Float())
    crossover: Mapped[bool] = mapped_column(sa.Boolean())
    seed: Mapped[int] = mapped_column(sa.Integer())
    classes: Mapped[list] = mapped_column(sa.JSON())             # the label set's class names, in order
    aided: Mapped[bool] = mapped_column(sa.Boolean())            # False: an unaided-only study (no bundle)
    bundle: Mapped[dict | None] = mapped_column(sa.JSON(), nullable=True)  # version, members, threshold
    source: Mapped[str] = mapped_column(sa.Text())               # where the cases came from


class Case(Base):
    __tablename__ = "reader_cases"
    __table_args__ = (sa.UniqueConstraint("study_id", "key", name="uq_reader_cases_key"),
                      sa.UniqueConstraint("study_id", "image_id", name="uq_reader_cases_image"))
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("reader_studies.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(sa.String(32))              # opaque case id shown to readers
    image_id: Mapped[str] = mapped_column(sa.String(200))
    truth: Mapped[str] = mapped_column(sa.String(32))
    position: Mapped[int] = mapped_column(sa.Integer())
    image: Mapped[bytes] = mapped_column(sa.LargeBinary())
    image_type: Mapped[str] = mapped_column(sa.String(32))
    ai: Mapped[dict | None] = mapped_column(sa.JSON(), nullable=True)  # the clinician page's answer
    ai_top: Mapped[str] = mapped_column(sa.String(32))           # "" when refused / no AI
    ai_mel_prob: Mapped[float | None] = mapped_column(sa.Float(), nullable=True)
    ai_malignant_prob: Mapped[float | None] = mapped_column(sa.Float(), nullable=True)
    ai_melanoma_flag: Mapped[bool] = mapped_column(sa.Boolean())


class Reader(Base):
    __tablename__ = "reader_readers"
    __table_args__ = (sa.UniqueConstraint("study_id", "name", name="uq_reader_readers_name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("reader_studies.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    level: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    years: Mapped[float | None] = mapped_column(sa.Float(), nullable=True)
    first_modality: Mapped[str] = mapped_column(sa.String(16))
    seed: Mapped[int] = mapped_column(sa.Integer())
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime())
    phase1_done_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(), nullable=True)


class Opening(Base):
    __tablename__ = "reader_openings"
    __table_args__ = (sa.UniqueConstraint("reader_id", "case_id", "modality", name="uq_reader_openings"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    reader_id: Mapped[int] = mapped_column(sa.ForeignKey("reader_readers.id", ondelete="CASCADE"), index=True)
    case_id: Mapped[int] = mapped_column(sa.ForeignKey("reader_cases.id", ondelete="CASCADE"))
    modality: Mapped[str] = mapped_column(sa.String(16))
    first_at: Mapped[dt.datetime] = mapped_column(sa.DateTime())
    last_at: Mapped[dt.datetime] = mapped_column(sa.DateTime())
    count: Mapped[int] = mapped_column(sa.Integer())


class Read(Base):
    __tablename__ = "reader_reads"
    __table_args__ = (sa.UniqueConstraint("reader_id", "case_id", "modality", name="uq_reader_reads"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    reader_id: Mapped[int] = mapped_column(sa.ForeignKey("reader_readers.id", ondelete="CASCADE"), index=True)
    case_id: Mapped[int] = mapped_column(sa.ForeignKey("reader_cases.id", ondelete="CASCADE"))
    modality: Mapped[str] = mapped_column(sa.String(16))
    phase: Mapped[int] = mapped_column(sa.Integer())
    diagnosis: Mapped[str] = mapped_column(sa.String(32))
    rating: Mapped[float] = mapped_column(sa.Float())
    management: Mapped[str] = mapped_column(sa.String(32))
    seconds: Mapped[float] = mapped_column(sa.Float())
    openings: Mapped[int] = mapped_column(sa.Integer())
    submitted_at: Mapped[dt.datetime] = mapped_column(sa.DateTime())


def database_url(db: str | Path) -> str:
    """A SQLAlchemy URL from what a user typed: a file path (SQLite) or a URL; `postgresql://` means psycopg 3."""
    text = str(db)
    if "://" not in text:
        path = Path(text).expanduser().resolve()
        if not path.parent.is_dir():
            raise UserError(f"--db {db}: folder {path.parent} does not exist")
        return f"sqlite:///{path}"
    if text.startswith(("postgresql://", "postgres://")):
        text = "postgresql+psycopg://" + text.split("://", 1)[1]
    if not text.startswith(("sqlite:", "postgresql+psycopg:")):
        raise UserError(f"--db {db}: use a SQLite file path, sqlite:///FILE or postgresql://user@host/dbname")
    return text


def _migrations_dir() -> str:
    return str(resources.files("lesionlab.workflows.reader_study").joinpath("migrations"))


def alembic_config(connection: sa.Connection | None = None):
    """An alembic Config for the reader-study migrations (no alembic.ini: the script location is the package)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", _migrations_dir())
    cfg.set_main_option("version_table", VERSION_TABLE)
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: sa.Engine) -> None:
    """Bring the schema to the newest revision (alembic `upgrade head`) on one connection."""
    from alembic import command

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # two processes opening a fresh database at once must not both create the tables
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(726019)")
        command.upgrade(alembic_config(conn), "head")


def current_revision(engine: sa.Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


class ReaderDB:
    """An open reader-study database: an engine, and sessions for reading and for writing.

    SQLite runs in WAL mode (readers never wait for a writer) and write transactions start with BEGIN IMMEDIATE,
    so two writers queue on the busy timeout instead of one failing with "database is locked" when it upgrades a
    read lock (the well-known SQLite deadlock of deferred transactions).
    """

    def __init__(self, url: str, engine: sa.Engine):
        self.url = url
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(engine.execution_options(reader_study_write=True), expire_on_commit=False)

    def __repr__(self) -> str:
        return f"ReaderDB({self.engine.url.render_as_string(hide_password=True)!r})"

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session for queries (rolled back at the end)."""
        with self._read() as s:
            yield s

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose work is committed at the end, or rolled back on an error."""
        with self._write() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20,
                              max_overflow=20)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below); pysqlite's own is deferred
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("reader_study_write") else "BEGIN")

    return engine


def open_db(db: str | Path, *, migrate: bool = True) -> ReaderDB:
    """Open (and, with `migrate`, create or upgrade) a reader-study database.

    Args:
        db: a SQLite file path, `sqlite:///FILE`, or `postgresql://user:password@host:port/dbname`.
        migrate: run the alembic migrations to the newest revision first (the default); without it a database
            whose schema is not the newest is refused.
    """
    url = database_url(db)
    if url.startswith("sqlite"):
        engine = _sqlite_engine(url)
    else:
        engine = sa.create_engine(url, pool_size=10, max_overflow=40, pool_pre_ping=True)
    try:
        if migrate:
            upgrade(engine)
        else:
            from alembic.script import ScriptDirectory

            head = ScriptDirectory.from_config(alembic_config()).get_current_head()
            if current_revision(engine) != head:
                raise UserError(f"--db {db}: not a reader-study database at schema {head}; create a study in it "
                                "first (`lesionlab reader-study create`)")
    except sa.exc.OperationalError as e:
        engine.dispose()
        raise UserError(f"--db {engine.url.render_as_string(hide_password=True)}: cannot open the database "
                        f"({str(e.orig).strip().splitlines()[0]})") from None
    return ReaderDB(url, engine)
