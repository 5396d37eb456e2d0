"""The job store: one table, SQLAlchemy 2, SQLite by default and PostgreSQL by URL.

Every state change is a conditional UPDATE (check-and-set), so two processes can never both
start a job, and a finished job is never touched again.
"""

import functools
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    Integer,
    String,
    Update,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from schemas.job import FINISHED
from service import migrations


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "clipprune_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str] = mapped_column(String(64), default="queued")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Which process runs the job and when it last said so: a lease that other processes can
    # see expire when a worker dies without a word (SIGKILL, OOM, lost machine).
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def now() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without their zone; they were stored as UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def new_job_id() -> str:
    return secrets.token_hex(16)  # 128 random bits: not guessable, not enumerable


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _: Any) -> None:
            # WAL: the API reads while job processes write progress. synchronous=NORMAL: in
            # WAL mode a commit then costs no fsync (checkpoints do), and what was committed
            # survives any crash of the service or its workers, so a 202's job is kept across
            # restarts; only an OS crash or power cut can roll back the newest commits, never
            # corrupt the file. FULL would fsync each of the ~10 writes a job makes.
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


# The statements every job runs, built once and bound per call: building a SQLAlchemy statement
# (and loading through the ORM) costs several times what SQLite takes to run it, and these run
# on the same few cores as the jobs.
JOBS = JobRow.__table__
GET = select(JOBS).where(JOBS.c.id == bindparam("job_id"))
INSERT = insert(JOBS)
QUEUED = (
    select(JOBS.c.id)
    .where(JOBS.c.status == "queued")
    .order_by(JOBS.c.created_at, JOBS.c.id)
    .limit(bindparam("limit"))
)
COUNT = select(func.count()).select_from(JOBS).where(JOBS.c.status == bindparam("status"))

# A submit holds a slot in the queue from before its body is read: a row in UPLOADING, which
# nothing runs, lists or cancels (every other query names the states it wants), until the
# upload is stored and the row becomes queued, or the upload fails and the row is deleted.
UPLOADING = "uploading"
WAITING = (UPLOADING, "queued")  # what the queue limit counts
WAITING_COUNT = select(func.count()).select_from(JOBS).where(JOBS.c.status.in_(WAITING))
# A reservation whose request stopped renewing it (the API process died mid-upload).
ABANDONED = delete(JOBS).where(
    (JOBS.c.status == UPLOADING) & (JOBS.c.heartbeat_at < bindparam("cutoff"))
)
RELEASE = delete(JOBS).where((JOBS.c.id == bindparam("job_id")) & (JOBS.c.status == UPLOADING))
# Reservations take this PostgreSQL advisory lock (any fixed 64-bit number) for their
# transaction, so a count and the insert it allows are never interleaved with another's.
RESERVE_LOCK = text("SELECT pg_advisory_xact_lock(7418530284011)")


@functools.cache
def _transition_statement(
    allowed: frozenset[str], with_token: bool, columns: tuple[str, ...], increment: tuple[str, ...]
) -> Update:
    """A state change's UPDATE, built once per shape (claim, progress, success, ...)."""
    condition = (JOBS.c.id == bindparam("job_id")) & JOBS.c.status.in_(sorted(allowed))
    if with_token:
        condition = condition & (JOBS.c.worker == bindparam("token"))
    values: dict[str, Any] = {
        name: bindparam(f"new_{name}", type_=JOBS.c[name].type) for name in columns
    }
    values.update({name: JOBS.c[name] + 1 for name in increment})
    return update(JOBS).where(condition).values(values)


class JobStore:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        # Alembic revisions make and change the table (service/migrations), never create_all:
        # a database from an earlier release is brought up to date with its jobs in it.
        migrations.upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    def create(self, job_id: str, owner: str, kind: str, params: dict[str, Any]) -> JobRow:
        values = {
            "id": job_id,
            "owner": owner,
            "kind": kind,
            "status": "queued",
            "params": params,
            "progress": 0.0,
            "stage": "queued",
            "created_at": now(),
            "attempts": 0,
        }
        with self.engine.begin() as connection:
            connection.execute(INSERT, values)
        return JobRow(**values)

    def reserve(self, job_id: str, owner: str, kind: str, limit: int, lease_s: float) -> int | None:
        """A slot in the queue for a job whose upload has not been read yet: None when the row
        is in (state UPLOADING), else the number of jobs waiting, `limit` or more, and no row.

        The count and the insert are one transaction that no other reservation interleaves
        with (SQLite: BEGIN IMMEDIATE takes the database's write lock first; PostgreSQL: an
        advisory lock), so concurrent submits can never together pass the limit. Reservations
        not renewed (`hold`) for lease_s seconds are deleted first: their request is gone."""
        moment = now()
        values = {
            "id": job_id,
            "owner": owner,
            "kind": kind,
            "status": UPLOADING,
            "params": {},
            "progress": 0.0,
            "stage": UPLOADING,
            "created_at": moment,
            "attempts": 0,
            "heartbeat_at": moment,
        }
        with self.engine.connect() as connection:
            if self.engine.dialect.name == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                connection.execute(RESERVE_LOCK)
            connection.execute(ABANDONED, {"cutoff": moment - timedelta(seconds=lease_s)})
            waiting = int(connection.execute(WAITING_COUNT).scalar() or 0)
            if waiting < limit:
                connection.execute(INSERT, values)
            connection.commit()
        return waiting if waiting >= limit else None

    def hold(self, job_id: str) -> None:
        """Renew a reservation while its upload streams in."""
        self._transition(job_id, {UPLOADING}, heartbeat_at=now())

    def activate(self, job_id: str, params: dict[str, Any]) -> JobRow | None:
        """UPLOADING -> queued once the upload is stored: the job can run from now on. None
        when the reservation is gone (not renewed for its lease)."""
        moment = now()
        if not self._transition(
            job_id,
            {UPLOADING},
            status="queued",
            stage="queued",
            params=params,
            created_at=moment,  # the queue's order: when the job could first run
            heartbeat_at=None,
        ):
            return None
        return self.get(job_id)

    def release(self, job_id: str) -> None:
        """Give back the slot of an upload that failed (a no-op once the job is queued)."""
        with self.engine.begin() as connection:
            connection.execute(RELEASE, {"job_id": job_id})

    def waiting(self) -> int:
        """Jobs the queue limit counts: queued, and reserved by uploads under way."""
        with self.engine.connect() as connection:
            return int(connection.execute(WAITING_COUNT).scalar() or 0)

    def get(self, job_id: str, owner: str | None = None) -> JobRow | None:
        """The row as it is now (a copy: nothing written to it goes to the database). For an
        owner, a job still uploading is no job yet."""
        with self.engine.connect() as connection:
            found = connection.execute(GET, {"job_id": job_id}).one_or_none()
        if found is None or (owner is not None and found.owner != owner):
            return None
        if owner is not None and found.status == UPLOADING:
            return None
        return JobRow(**found._mapping)

    def page(self, owner: str, limit: int, before: tuple[datetime, str] | None) -> list[JobRow]:
        """The owner's jobs, newest first; `before` is the (created_at, id) of the last seen."""
        query = select(JobRow).where(JobRow.owner == owner, JobRow.status != UPLOADING)
        if before is not None:
            created, job_id = before
            query = query.where(
                (JobRow.created_at < created)
                | ((JobRow.created_at == created) & (JobRow.id < job_id))
            )
        query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit)
        with self.session() as session:
            return list(session.scalars(query))

    def queued(self, limit: int) -> list[str]:
        """Oldest queued jobs first: the order they are run in."""
        with self.engine.connect() as connection:
            return list(connection.execute(QUEUED, {"limit": limit}).scalars())

    def count(self, status: str) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(COUNT, {"status": status}).scalar() or 0)

    def _transition(
        self,
        job_id: str,
        allowed: set[str] | frozenset[str],
        token: str | None = None,
        increment: tuple[str, ...] = (),
        **values: Any,
    ) -> bool:
        """Change the row only if it is in an allowed state, and, given a claim token, only
        if that claim still holds (a run a lease expiry replaced cannot touch the job).
        `increment` names columns to add one to."""
        statement = _transition_statement(
            frozenset(allowed), token is not None, tuple(sorted(values)), increment
        )
        parameters = {
            "job_id": job_id,
            "token": token,
            **{f"new_{k}": v for k, v in values.items()},
        }
        with self.engine.begin() as connection:
            return connection.execute(statement, parameters).rowcount == 1

    def claim(self, job_id: str, token: str) -> bool:
        """queued -> running under `token`; False when someone else has it or it was canceled."""
        moment = now()
        return self._transition(
            job_id,
            {"queued"},
            increment=("attempts",),
            status="running",
            started_at=moment,
            stage="starting",
            worker=token[:128],
            heartbeat_at=moment,
        )

    def heartbeat(self, job_id: str, token: str) -> None:
        self._transition(job_id, {"running"}, token, heartbeat_at=now())

    def progress(self, job_id: str, token: str, stage: str, fraction: float) -> bool:
        """False when the claim `token` no longer holds the running job."""
        fraction = min(max(fraction, 0.0), 1.0)
        return self._transition(job_id, {"running"}, token, stage=stage[:64], progress=fraction)

    def succeed(self, job_id: str, token: str) -> bool:
        return self._transition(
            job_id,
            {"running"},
            token,
            status="succeeded",
            progress=1.0,
            stage="done",
            finished_at=now(),
        )

    def fail(
        self,
        job_id: str,
        problem: dict[str, Any],
        from_states: set[str] | None = None,
        token: str | None = None,
    ) -> bool:
        return self._transition(
            job_id,
            from_states or {"queued", "running"},
            token,
            status="failed",
            stage="failed",
            error=problem,
            finished_at=now(),
        )

    def cancel(self, job_id: str) -> bool:
        return self._transition(
            job_id, {"queued", "running"}, status="canceled", stage="canceled", finished_at=now()
        )

    def stale(self, lease_s: float) -> list[JobRow]:
        """Running jobs whose worker has not been heard from for lease_s seconds."""
        cutoff = now() - timedelta(seconds=lease_s)
        query = select(JobRow).where(JobRow.status == "running", JobRow.heartbeat_at < cutoff)
        with self.session() as session:
            return list(session.scalars(query))

    def mark_published(self, job_id: str) -> None:
        with self.session() as session:
            session.execute(update(JobRow).where(JobRow.id == job_id).values(published_at=now()))

    def unpublished(self, published_before: datetime | None = None) -> list[str]:
        """Queued jobs whose message never reached the broker (or went out before a moment)."""
        condition = JobRow.published_at.is_(None)
        if published_before is not None:
            condition = condition | (JobRow.published_at < published_before)
        query = (
            select(JobRow.id)
            .where(JobRow.status == "queued", condition)
            .order_by(JobRow.created_at, JobRow.id)
        )
        with self.session() as session:
            return list(session.scalars(query))

    def requeue(self, job_id: str) -> bool:
        return self._transition(job_id, {"running"}, status="queued", stage="queued", progress=0.0)

    def put_back(self, job_id: str) -> bool:
        """running -> queued for a job its own service stopped on purpose (a graceful stop):
        the interrupted run gives back its attempt, which is kept for the crash retry. A job
        stopped by a deploy and then by a crash would otherwise be failed, not retried."""
        condition = (JobRow.id == job_id) & (JobRow.status == "running")
        with self.session() as session:
            result = session.execute(
                update(JobRow)
                .where(condition)
                .values(status="queued", stage="queued", progress=0.0, attempts=JobRow.attempts - 1)
            )
            return result.rowcount == 1

    def running(self) -> list[str]:
        with self.session() as session:
            return list(session.scalars(select(JobRow.id).where(JobRow.status == "running")))

    def delete(self, job_id: str) -> None:
        with self.session() as session:
            row = session.get(JobRow, job_id)
            if row is not None:
                session.delete(row)

    def finished_since(self, moment: datetime) -> list[JobRow]:
        query = select(JobRow).where(JobRow.status.in_(FINISHED), JobRow.finished_at >= moment)
        with self.session() as session:
            return list(session.scalars(query))

    def expired(self, ttl_s: float) -> list[str]:
        cutoff = now() - timedelta(seconds=ttl_s)
        query = select(JobRow.id).where(JobRow.status.in_(FINISHED), JobRow.finished_at < cutoff)
        with self.session() as session:
            return list(session.scalars(query))
