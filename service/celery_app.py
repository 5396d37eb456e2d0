"""The distributed backend's worker side: a Celery app whose one task runs one job.

Settings that make long CPU jobs safe: late acks (a job whose worker dies is delivered again),
prefetch 1 (a worker holds only the job it runs), reject on worker lost, hard and soft time
limits, and a Redis visibility timeout above the hard limit (else Redis hands a long job to a
second worker while the first still runs it). The job row is claimed check-and-set, so a
message delivered twice runs the job once.
"""

import functools
import logging
import os
import signal
import socket

from billiard.common import human_status
from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from celery.worker.request import Request

from service.artifacts import ArtifactStore
from service.local_backend import death_problem
from service.logs import configure_logging
from service.runner import end_with_failure, prepare_worker, run_job
from service.settings import Settings
from service.store import JobStore

TASK = "clipprune.run_job"
HARD_LIMIT_GRACE_S = 30  # after the soft limit, time to record the failure before the kill

log = logging.getLogger("clipprune.worker")


def queue_name(settings: Settings) -> str:
    return f"{settings.broker_prefix}jobs"


@functools.cache
def job_store(database: str) -> JobStore:
    """This process's JobStore for a database: one engine per worker process, made by the first
    job the process runs. Emptied in a forked child, so no process uses its parent's engine."""
    return JobStore(database)


os.register_at_fork(after_in_child=job_store.cache_clear)


# How billiard words the loss of a pool child that SIGABRT ended, in its WorkerLostError.
ABORTED = f"exited prematurely: {human_status(-signal.SIGABRT)}"


def _fail_aborted(settings: Settings, job_id: str, child_pid: int | None) -> None:
    """Fail the job of a pool child that native code aborted, as the embedded pool does (the
    memory limit, its likely cause): run again, the same input would abort again. Only while
    the job's claim is that child's; a run that has taken the job since is left alone. With
    an engine of its own, disposed of here: this main process forks the pool's children."""
    store = JobStore(settings.database)
    try:
        row = store.get(job_id)
        claim = f"{socket.gethostname()}:{child_pid}:"  # run_job's token starts so
        if row is not None and row.worker is not None and row.worker.startswith(claim):
            died = death_problem(-signal.SIGABRT, settings.worker_memory_bytes)
            # queued too: the child may take longer to die (a core dump) than the job's lease,
            # and a job the lease expiry requeued keeps the claim until it runs again
            job_dir = ArtifactStore(settings.data_dir).job_dir(job_id)
            if end_with_failure(store, job_dir, job_id, died, {"running", "queued"}, row.worker):
                log.warning("job failed: its worker aborted", extra={"job_id": job_id})
    finally:
        store.engine.dispose()


class JobRequest(Request):
    """A job's task request in the worker's main process, which sees a pool child die."""

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        lost = exc_info.exception
        if isinstance(lost, ExceptionWithTraceback):  # as billiard hands it over
            lost = lost.exc
        if isinstance(lost, WorkerLostError) and ABORTED in str(lost):
            # Before the message goes back to the queue (reject on worker lost): the redelivery
            # then finds the job failed and skips it.
            _fail_aborted(self.task.settings, self.id, self.worker_pid)
        super().on_failure(exc_info, send_failed_event, return_ok)


class JobTask(Task):
    """The task class `make_celery` registers `run_job_task` with; `settings` is its app's."""

    settings: Settings
    Request = JobRequest


def run_job_task(task: JobTask, job_id: str) -> str:
    """The task body: run one job in this worker process and return its final status."""
    settings = task.settings
    store = job_store(settings.database)
    job_dir = ArtifactStore(settings.data_dir).job_dir(job_id)
    status = run_job(
        store,
        job_dir,
        job_id,
        settings.heartbeat_s,
        (SoftTimeLimitExceeded,),
        stage_timeout_s=settings.stage_timeout_s,
    )
    log.info("job %s: %s", job_id, status, extra={"job_id": job_id})
    return status


def make_celery(settings: Settings) -> Celery:
    app = Celery("clipprune", broker=settings.broker_url, set_as_current=False)
    hard_limit = settings.job_timeout_s + HARD_LIMIT_GRACE_S
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=True,
        task_soft_time_limit=settings.job_timeout_s,
        task_time_limit=hard_limit,
        broker_transport_options={
            "visibility_timeout": int(hard_limit * 2 + 60),
            "global_keyprefix": settings.broker_prefix,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_default_queue=queue_name(settings),
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        # Keep a running job going when the broker connection drops: it records its end in the
        # job table, and the message redelivered after reconnecting finds it done and skips.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=False,
    )
    app.task(name=TASK, bind=True, base=JobTask, settings=settings)(run_job_task)
    return app


def worker_name() -> str:
    return f"clipprune@{socket.gethostname()}"


def ping_worker(settings: Settings, timeout_s: float = 3.0) -> bool:
    """Does this host's worker answer a ping over the broker?"""
    replies = make_celery(settings).control.ping(destination=[worker_name()], timeout=timeout_s)
    return bool(replies)


def run_worker(settings: Settings) -> None:
    """`clipprune worker`: a Celery worker with `settings.workers` processes."""
    configure_logging()
    app = make_celery(settings)
    memory, threads = settings.worker_memory_bytes, settings.worker_threads

    def prepare_child(**_: object) -> None:
        prepare_worker(memory, threads)  # in each pool child, before it takes a job; not the parent

    worker_process_init.connect(prepare_child, weak=False)
    app.worker_main(
        [
            "worker",
            f"--concurrency={settings.workers}",
            "--loglevel=INFO",
            f"--hostname={worker_name()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
