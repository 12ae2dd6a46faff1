"""Alembic environment of the reader-study database: always run on a connection given by `db.upgrade`."""

from __future__ import annotations

from alembic import context

from lesionlab.workflows.reader_study.db import VERSION_TABLE, Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("reader-study migrations run through lesionlab.workflows.reader_study.db.upgrade")
    context.configure(connection=connection, target_metadata=target_metadata, version_table=VERSION_TABLE,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) mode is not supported for reader-study migrations")
run_migrations_online()
