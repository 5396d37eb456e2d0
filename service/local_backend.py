"""The embedded backend: one worker process per job, at most `workers` at once.

A process per job (from a forkserver that has the compute modules imported, so a start costs
milliseconds) rather than concurrent.futures.ProcessPoolExecutor: a pool cannot stop one running
job, and one killed worker breaks the whole pool and fails every job in it. Here DELETE and the
time limit kill exactly one process, a process that dies (OOM, SIGKILL) fails exactly its job,
and the next job gets a fresh process. The job table is the queue, so a restart loses nothing.
"""

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from service.artifacts import ArtifactStore
from service.logs import configure_logging
from service.runner import problem, run_job
from service.settings import Settings
from service.store import JobStore

log = logging.getLogger("clipprune.backend")

TICK_S = 0.2
MAX_ATTEMPTS = 2  # a job left running by a crashed service is retried once, then failed
ORPHAN_CHECK_S = 0.5


def _exit_with(service_pid: int) -> None:
    """A job must not outlive its service: after a crash the restarted service requeues it."""
    while True:
        time.sleep(ORPHAN_CHECK_S)
        try:
            os.kill(service_pid, 0)
        except ProcessLookupError:
            os._exit(70)


def _job_process(settings: Settings, job_id: str, service_pid: int) -> None:
    threading.Thread(target=_exit_with, args=(service_pid,), daemon=True).start()
    configure_logging()
    store = JobStore(settings.database)
    run_job(store, ArtifactStore(settings.data_dir).job_dir(job_id), job_id, settings.heartbeat_s)


@dataclass
class _Running:
    process: BaseProcess
    started: float


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the kernel's out-of-memory killer, or an operator)" if -code == 9 else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


class LocalBackend:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["service.runner", "workers.jobs"])
        self.running: dict[str, _Running] = {}
        self.lock = threading.Lock()
        # The dispatcher sleeps until a job process ends or a submit rings this bell, so a
        # free slot is filled at once rather than at the next tick.
        self.bell, self.bell_rope = socket.socketpair()
        self.bell.setblocking(False)
        self.bell_rope.setblocking(False)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def recover(self) -> None:
        """Jobs a dead service left `running`: retried if they have attempts left, else failed."""
        for job_id in self.store.running():
            row = self.store.get(job_id)
            if row is not None and row.attempts < MAX_ATTEMPTS and self.store.requeue(job_id):
                log.warning(
                    "requeued job left running by a stopped service", extra={"job_id": job_id}
                )
                continue
            self.store.fail(
                job_id,
                problem(500, "Worker lost", "the service stopped while this job ran, twice"),
                {"running"},
            )

    async def start(self) -> None:
        self.recover()
        self.thread = threading.Thread(target=self._run, name="clipprune-dispatcher", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        self.stopping.set()
        self._ring()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 10)
        with self.lock:
            for job_id, running in list(self.running.items()):
                running.process.kill()
                running.process.join(5)
                self.store.requeue(job_id)  # it runs again on the next start
            self.running.clear()
        self.bell.close()
        self.bell_rope.close()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def submitted(self, job_id: str) -> None:
        self._ring()  # the job is in the table; the dispatcher picks it up now

    def _ring(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self.bell_rope.send(b"\0")

    def cancel(self, job_id: str) -> None:
        with self.lock:
            running = self.running.pop(job_id, None)
        if running is not None:
            running.process.kill()
            running.process.join(5)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("dispatcher tick failed; retrying")
            with self.lock:
                sentinels = [running.process.sentinel for running in self.running.values()]
            wait([*sentinels, self.bell], timeout=TICK_S)
            with contextlib.suppress(BlockingIOError, OSError):
                while self.bell.recv(4096):
                    pass

    def tick(self) -> None:
        with self.lock:
            self._reap()
            self._dispatch()

    def _reap(self) -> None:
        limit = self.settings.job_timeout_s
        for job_id, running in list(self.running.items()):
            process = running.process
            if process.is_alive():
                if time.monotonic() - running.started <= limit:
                    continue
                process.kill()
                process.join(5)
                self.store.fail(
                    job_id,
                    problem(
                        504,
                        "Job time limit",
                        f"the job ran longer than {limit:g} s "
                        "(CLIPPRUNE_JOB_TIMEOUT_S) and was stopped",
                    ),
                    {"running"},
                )
            else:
                process.join()
                if process.exitcode != 0:
                    detail = f"the job's worker process {describe_exit(process.exitcode)}"
                    self.store.fail(job_id, problem(500, "Worker process died", detail))
            del self.running[job_id]

    def _dispatch(self) -> None:
        free = self.settings.workers - len(self.running)
        if free <= 0:
            return
        for job_id in self.store.queued(free):
            process = self.context.Process(
                target=_job_process,
                args=(self.settings, job_id, os.getpid()),
                name=f"clipprune-job-{job_id}",
            )
            process.start()
            self.running[job_id] = _Running(process, time.monotonic())
