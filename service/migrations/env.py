"""Alembic's environment: run on the connection `service.migrations.upgrade` hands over, or,
for the `alembic` command line (`alembic -x url=sqlite:///data/clipprune.db ...` with
script_location pointing here), on a URL of its own."""

from alembic import context
from sqlalchemy import Connection, create_engine

from service.migrations import VERSION_TABLE
from service.store import Base


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        url = context.get_x_argument(as_dictionary=True).get("url")
        if not url:
            raise SystemExit("give the database as -x url=<SQLAlchemy URL>")
        with create_engine(url).begin() as own:
            _migrate(own)
    else:
        _migrate(connection)


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("clipprune's migrations run online only")
run()
