"""Schema migrations (service/migrations): a database an earlier release made keeps its jobs.

The previous release's job table is frozen below as data: the fourteen columns the embedded
service shipped with (f26506a), before the Celery backend added the lease and publish columns.
Each test builds a database the way that release did (its create_all), on SQLite and on
PostgreSQL, and then opens it with today's code: the real service, or the JobStore that
`clipprune serve`, `clipprune worker` and their worker processes all open.
"""

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    inspect,
    select,
)

from schemas.params import TrainParams
from service import migrations
from service.auth import owner_of
from service.store import Base, JobStore, aware, new_job_id
from tests.server import accepted_id, submit, wait_for

KEY = "migration-key"
FAILED = {"type": "about:blank", "title": "Unprocessable Content", "status": 422, "detail": "x"}
ROOT = Path(__file__).resolve().parents[1]


def previous_release_table(metadata: MetaData, *extra: Column) -> Table:
    """clipprune_jobs as service/store.py declared it in the release before the Celery backend."""
    return Table(
        "clipprune_jobs",
        metadata,
        Column("id", String(32), primary_key=True),
        Column("owner", String(64), index=True, nullable=False),
        Column("kind", String(16), nullable=False),
        Column("status", String(16), index=True, nullable=False),
        Column("params", JSON, nullable=False),
        Column("progress", Float, default=0.0, nullable=False),
        Column("stage", String(64), default="queued", nullable=False),
        Column("created_at", DateTime(timezone=True), index=True, nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=True),
        Column("finished_at", DateTime(timezone=True), nullable=True),
        Column("error", JSON, nullable=True),
        Column("attempts", Integer, default=0, nullable=False),
        *extra,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    """An empty database: the SQLite file a data directory holds, or a PostgreSQL schema."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    (tmp_path / "data").mkdir()
    return f"sqlite:///{(tmp_path / 'data' / 'clipprune.db').resolve()}"


def old_jobs(owner: str) -> list[dict]:
    """One job in each finished state, as the previous release wrote them (within the last
    hour: finished jobs older than the service's TTL are deleted at start)."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    jobs = []
    for n, status in enumerate(["succeeded", "failed", "canceled", "succeeded"]):
        created = start + timedelta(minutes=n)
        jobs.append(
            {
                "id": new_job_id(),
                "owner": owner,
                "kind": "train" if n % 2 else "prune",
                "status": status,
                "params": {"n": n, "nested": {"list": [1, 2.5, "x"]}},
                "progress": 1.0 if status == "succeeded" else 0.5,
                "stage": {"succeeded": "done", "failed": "failed"}.get(status, "canceled"),
                "created_at": created,
                "started_at": created + timedelta(seconds=1),
                "finished_at": created + timedelta(seconds=30),
                "error": FAILED if status == "failed" else None,
                "attempts": 1,
            }
        )
    return jobs


def make_previous_release_database(url: str, jobs: list[dict], *extra: Column) -> None:
    engine = create_engine(url)
    metadata = MetaData()
    table = previous_release_table(metadata, *extra)
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(table.insert(), jobs)
    engine.dispose()


def schema_state(url: str) -> tuple[str | None, list, set[str], int]:
    """(revision, differences from store.py's metadata, the table's columns, its row count)."""
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": migrations.VERSION_TABLE}
        )
        state = (
            context.get_current_revision(),
            compare_metadata(context, Base.metadata),
            {column["name"] for column in inspect(connection).get_columns("clipprune_jobs")},
            connection.execute(
                select(func.count()).select_from(Base.metadata.tables["clipprune_jobs"])
            ).scalar(),
        )
    engine.dispose()
    return state


def test_the_service_upgrades_a_previous_release_database_and_loses_no_job(
    database, make_server, tmp_path, digits_csv
):
    owner = owner_of(KEY)
    finished = old_jobs(owner)
    # A job the previous release queued and never ran, its upload on disk: it runs now.
    queued_id = new_job_id()
    params = TrainParams(model={"type": "mlp", "hidden": [16]}, epochs=2).model_dump(mode="json")
    queued = {
        **finished[0],
        "id": queued_id,
        "kind": "train",
        "status": "queued",
        "params": params,
        "progress": 0.0,
        "stage": "queued",
        "created_at": finished[-1]["created_at"] + timedelta(minutes=1),
        "started_at": None,
        "finished_at": None,
        "error": None,
        "attempts": 0,
    }
    make_previous_release_database(database, [*finished, queued])
    data_dir = tmp_path / "data"
    inputs = data_dir / "jobs" / queued_id / "input"
    inputs.mkdir(parents=True)
    (inputs / "train_data").write_bytes(digits_csv)

    settings = {"api_keys": KEY}
    if database.startswith("postgresql"):
        settings["database_url"] = database
    server = make_server(data_dir=data_dir, **settings)
    with server.client(KEY) as client:
        for job in finished:
            got = client.get(f"/v1/jobs/{job['id']}").json()
            assert (got["status"], got["kind"], got["params"], got["progress"]) == (
                job["status"],
                job["kind"],
                job["params"],
                job["progress"],
            )
            assert datetime.fromisoformat(got["created_at"]) == job["created_at"]
            assert (got["error"] or {}).get("detail") == (job["error"] or {}).get("detail")
        assert wait_for(client, queued_id)["status"] == "succeeded"
        new = wait_for(
            client,
            accepted_id(
                submit(
                    client,
                    "train",
                    {"train_data": digits_csv},
                    {"epochs": 2, "model": {"hidden": [16]}},
                )
            ),
        )
        assert new["status"] == "succeeded"
        listed = client.get("/v1/jobs", params={"limit": 100}).json()["items"]
        assert {job["id"] for job in listed} == {job["id"] for job in finished} | {
            queued_id,
            new["id"],
        }
    server.stop()

    revision, differences, columns, rows = schema_state(database)
    assert revision == migrations.head() and differences == []
    assert {"worker", "heartbeat_at", "published_at"} <= columns
    assert rows == len(finished) + 2
    # A second start finds the database at head and changes nothing.
    restarted = make_server(data_dir=data_dir, **settings)
    with restarted.client(KEY) as client:
        assert len(client.get("/v1/jobs", params={"limit": 100}).json()["items"]) == rows


def test_a_database_made_before_migrations_is_stamped_not_recreated(database):
    """Today's table, made by create_all before there were migrations: kept as it is."""
    engine = create_engine(database)
    Base.metadata.create_all(engine)
    job_id = new_job_id()
    moment = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(
            Base.metadata.tables["clipprune_jobs"].insert(),
            {
                **old_jobs("o")[0],
                "id": job_id,
                "worker": "host:1:nonce",
                "heartbeat_at": moment,
                "published_at": moment,
            },
        )
    engine.dispose()
    store = JobStore(database)
    row = store.get(job_id)
    stored = (row.worker, aware(row.heartbeat_at), aware(row.published_at))
    assert stored == ("host:1:nonce", moment, moment)
    store.engine.dispose()
    revision, differences, _, rows = schema_state(database)
    assert (revision, differences, rows) == (migrations.head(), [], 1)


def test_processes_starting_together_migrate_once(database):
    """serve, worker and their processes all open the store at start: one migrates, the
    others wait for it and then find the database at head."""
    make_previous_release_database(database, old_jobs("o"))
    opening = [
        subprocess.Popen(
            [sys.executable, "-c", f"from service.store import JobStore; JobStore({database!r})"],
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        for _ in range(6)
    ]
    for process in opening:
        _, errors = process.communicate(timeout=120)
        assert process.returncode == 0, errors.decode()[-2000:]
    revision, differences, _, rows = schema_state(database)
    assert (revision, differences, rows) == (migrations.head(), [], 4)
    store = JobStore(database)
    job_id = new_job_id()
    store.create(job_id, "o", "train", {})
    assert store.claim(job_id, "run-1") and store.get(job_id).worker == "run-1"
    store.engine.dispose()


def test_a_table_no_release_made_is_refused_and_left_alone(database):
    make_previous_release_database(database, old_jobs("o"), Column("mystery", Integer))
    with pytest.raises(RuntimeError, match="no release of clipprune made"):
        JobStore(database)
    engine = create_engine(database)
    with engine.connect() as connection:
        columns = {column["name"] for column in inspect(connection).get_columns("clipprune_jobs")}
        assert migrations.current(connection) is None
    engine.dispose()
    assert "worker" not in columns and "mystery" in columns


def test_the_newest_revision_is_the_table_store_py_declares(database):
    """A change to JobRow without a revision of its own fails here, not in production."""
    JobStore(database).engine.dispose()
    revision, differences, _, rows = schema_state(database)
    assert (revision, differences, rows) == (migrations.head(), [], 0)
