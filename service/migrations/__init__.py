"""Schema migrations of the job table (Alembic), applied by every process that opens the store.

`upgrade(engine)` brings the database to the newest revision under a lock, so processes that
start together (`clipprune serve`, `clipprune worker`, their worker processes) migrate it once:
an advisory lock on PostgreSQL (taken inside the migration's transaction, which PostgreSQL runs
DDL in, so a migration is applied whole or not at all), a file lock next to the database on
SQLite. The scripts live in this package (env.py, versions/); no alembic.ini is needed. Alembic
records the revision in its own table, `clipprune_alembic_version`, so a database shared with
another Alembic project keeps both histories apart.
"""

import contextlib
import fcntl
import functools
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent
VERSION_TABLE = "clipprune_alembic_version"
# pg_advisory_xact_lock's key: any bigint no other lock of this database uses ("clipprun").
ADVISORY_LOCK_KEY = 0x636C697070727521


def config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for this package's scripts, on `connection` if given."""
    result = Config()
    result.set_main_option("script_location", str(HERE).replace("%", "%%"))
    result.attributes["connection"] = connection
    return result


@functools.cache
def head() -> str:
    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None
    return revision


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()


@contextlib.contextmanager
def _file_lock(engine: Engine) -> Iterator[None]:
    """SQLite: an exclusive lock on `<database>.migrate-lock` (none for an in-memory one)."""
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    with open(f"{database}.migrate-lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upgrade(engine: Engine) -> None:
    """`alembic upgrade head` on `engine`'s database, once however many processes ask at once.

    A database made before migrations (the table `create_all` made, no version table) is
    brought to the first revision by that revision itself: it adds the columns an older
    release's table lacks and keeps every row (versions/0001_job_table.py)."""
    lock = _file_lock(engine) if engine.dialect.name == "sqlite" else contextlib.nullcontext()
    with lock, engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY}
            )
        if current(connection) == head():
            return  # the common case: nothing to do, no migration environment loaded
        command.upgrade(config(connection), "head")
