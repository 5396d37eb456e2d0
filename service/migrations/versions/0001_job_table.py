"""The job table as service/store.py declares it (the schema at the start of migrations).

A database made before migrations already has the table (`create_all` made it) and no version
table. This revision then keeps the table and its rows, and adds what an older release lacks:
the lease and publish columns (`worker`, `heartbeat_at`, `published_at`) came with the Celery
backend (commit 1e8017b); the release before it, the embedded service (f26506a), had the other
fourteen. Its columns are frozen here as data, so a later change to store.py needs a revision
of its own.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLE = "clipprune_jobs"
INDEXED = ("owner", "status", "created_at")


def columns() -> list[sa.Column]:
    return [
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
    ]


# Added after the first release: all nullable, so they can be added to a table with rows.
# NULL means "no lease, never published": right for queued and finished jobs, and a job left
# running by the old release has no heartbeat, so the lease check (heartbeat_at < cutoff) does
# not see it; the embedded backend's start-up requeues it as after any crash.
LATER = ("worker", "heartbeat_at", "published_at")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table(TABLE):
        op.create_table(TABLE, *columns())
        for name in INDEXED:
            op.create_index(f"ix_{TABLE}_{name}", TABLE, [name])
        return
    present = {column["name"] for column in inspector.get_columns(TABLE)}
    expected = {column.name for column in columns()}
    missing = expected - present
    if present - expected or missing - set(LATER):
        raise RuntimeError(
            f"the table {TABLE} has columns {sorted(present)}, which no release of clipprune "
            f"made: expected {sorted(expected)}, or those without {list(LATER)}; "
            "not migrating it"
        )
    for column in columns():
        if column.name in missing:
            op.add_column(TABLE, column)
    indexes = {index["name"] for index in inspector.get_indexes(TABLE)}
    for name in INDEXED:
        if f"ix_{TABLE}_{name}" not in indexes:
            op.create_index(f"ix_{TABLE}_{name}", TABLE, [name])


def downgrade() -> None:
    op.drop_table(TABLE)
