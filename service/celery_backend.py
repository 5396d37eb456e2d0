"""The distributed backend's API side: publishes jobs to Celery and keeps the queue honest.

The job table stays the source of truth. A reconciler runs every few seconds and repairs what
a broker cannot: a job whose publish failed (broker down at submit) is published again; when
Redis restarts (it may keep nothing on disk) every queued job is published again; a running job
whose worker stopped renewing its lease (SIGKILL, OOM, lost machine) is requeued once, then
failed. Duplicated messages are harmless: the worker's claim is check-and-set.
"""

import asyncio
import contextlib
import logging
from datetime import timedelta

import redis

from service.artifacts import ArtifactStore
from service.celery_app import TASK, make_celery, queue_name
from service.runner import requeue_or_fail
from service.settings import Settings
from service.store import JobStore, now

log = logging.getLogger("clipprune.backend")

RECONCILE_S = 1.0
REPUBLISH_AFTER_S = 600


class CeleryBackend:
    recheck_s = 0.1  # jobs end in worker processes: a waiting request reads the row to see it

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.artifacts = ArtifactStore(settings.data_dir)
        self.app = make_celery(settings)
        self.redis = redis.Redis.from_url(
            settings.broker_url, socket_timeout=3, socket_connect_timeout=3
        )
        self.broker_run_id: str | None = None
        self.broker_ok = False
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name="clipprune-reconciler")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.redis.close()

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done() and self.broker_ok

    def submitted(self, job_id: str) -> None:
        try:
            self.publish(job_id)
        except Exception as exc:  # the broker's errors vary by transport; the reconciler retries
            log.warning("publish failed, will retry: %s", exc, extra={"job_id": job_id})

    def publish(self, job_id: str) -> None:
        self.app.send_task(
            TASK,
            args=[job_id],
            task_id=job_id,
            queue=queue_name(self.settings),
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
        )
        self.store.mark_published(job_id)

    def cancel(self, job_id: str) -> None:
        try:
            self.app.control.revoke(job_id, terminate=True, signal="SIGKILL")
        except Exception as exc:  # a worker that never sees the revoke finds the row gone
            log.warning("revoke failed: %s", exc, extra={"job_id": job_id})

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.reconcile)
            except Exception:
                log.exception("reconcile failed; retrying")
            await asyncio.sleep(RECONCILE_S)

    def reconcile(self) -> None:
        try:
            run_id = str(self.redis.info("server")["run_id"])
        except redis.RedisError as exc:
            if self.broker_ok:
                log.warning("broker unreachable: %s", exc)
            self.broker_ok = False
            return
        self.broker_ok = True
        # Queued jobs published long ago are published again: a message can be lost without a
        # broker restart (a worker that failed before it claimed the job acks it all the
        # same). A duplicate costs a worker one check-and-set.
        published_before = now() - timedelta(seconds=REPUBLISH_AFTER_S)
        if self.broker_run_id is not None and run_id != self.broker_run_id:
            published_before = now()  # everything published before the restart is gone
            log.warning("broker restarted; publishing the queued jobs again")
        self.broker_run_id = run_id
        for job_id in self.store.unpublished(published_before):
            self.publish(job_id)
        for row in self.store.stale(self.settings.worker_lease_s):
            detail = (
                f"the worker running this job ({row.worker}) stopped answering for "
                f"{self.settings.worker_lease_s:g} s, {row.attempts} time(s)"
            )
            job_dir = self.artifacts.job_dir(row.id)
            if requeue_or_fail(self.store, job_dir, row.id, row.attempts, detail):
                log.warning("worker %s lost; job requeued", row.worker, extra={"job_id": row.id})
                self.publish(row.id)
