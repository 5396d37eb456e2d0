"""The embedded backend: `workers` long-lived worker processes, one job at a time each.

Not concurrent.futures.ProcessPoolExecutor: a pool cannot stop one running job, and one killed
worker breaks the whole pool and fails every job in it. Here each worker is a process of its own
(forked from a forkserver that has the compute modules imported) with a pipe to the dispatcher:
DELETE and the time limit kill exactly the worker running that job, a worker that dies (OOM,
SIGKILL) fails exactly its job, and a fresh worker takes its place. No worker outlives a dead
forkserver: each one it forked is killed for certain (through a pidfd, since the sentinel
closes with the forkserver while the worker runs on) and its job is retried as a lost
worker's; the next spawn starts a new forkserver. Workers stay warm between jobs (onnxruntime
and BLAS initialised once) and are recycled after MAX_JOBS_PER_WORKER jobs so memory a large
job left behind goes back to the system. The job table is the queue, so a restart loses
nothing.
"""

import asyncio
import contextlib
import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from service.artifacts import ArtifactStore
from service.job_ends import JobEnds
from service.logs import configure_logging
from service.runner import (
    end_with_failure,
    out_of_memory_detail,
    prepare_worker,
    problem,
    requeue_or_fail,
    run_job,
)
from service.settings import Settings
from service.store import JobStore

log = logging.getLogger("clipprune.backend")

TICK_S = 0.2
MAX_JOBS_PER_WORKER = 50
ORPHAN_CHECK_S = 0.5
KILL_WAIT_S = 5.0


def _exit_with(service_pid: int, parent_pid: int) -> None:
    """A worker must not outlive its service (after a crash the restarted service requeues
    the job it was running) nor its forkserver (the dispatcher counts the worker lost and
    retries its job, which must then have no other run)."""
    while True:
        time.sleep(ORPHAN_CHECK_S)
        if os.getppid() != parent_pid:  # the forkserver died: the worker was re-parented
            os._exit(70)
        try:
            os.kill(service_pid, 0)
        except ProcessLookupError:
            os._exit(70)


def _worker_main(settings: Settings, jobs: Connection, service_pid: int) -> None:
    """A worker process: run each job id that arrives, answer with its final status."""
    prepare_worker(settings.worker_memory_bytes, settings.worker_threads)  # before any job
    watch = threading.Thread(target=_exit_with, args=(service_pid, os.getppid()), daemon=True)
    watch.start()
    configure_logging()
    store = JobStore(settings.database)
    artifacts = ArtifactStore(settings.data_dir)
    while True:
        try:
            job_id = jobs.recv()
        except EOFError:  # the dispatcher closed the pipe: time to go
            return
        status = run_job(
            store,
            artifacts.job_dir(job_id),
            job_id,
            settings.heartbeat_s,
            stage_timeout_s=settings.stage_timeout_s,
        )
        jobs.send(status)


def _parent_pid(pid: int) -> int:
    """From /proc/PID/stat: the field after the state, which follows the command name (and
    that may hold spaces and parentheses, so the line is split after its last one)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


def _exited(pidfd: int, timeout_s: float = 0) -> bool:
    """Has the process behind `pidfd` exited (a zombie counts)? Waits up to `timeout_s`."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def _pidfds(pid: int | None) -> tuple[int, int]:
    """pidfds of a worker just started and of its parent, the forkserver that forked it."""
    assert pid is not None  # set by start()
    pidfd = os.pidfd_open(pid)
    try:
        return pidfd, os.pidfd_open(_parent_pid(pid))
    except OSError:
        os.close(pidfd)
        raise


@dataclass
class _Worker:
    process: BaseProcess
    jobs: Connection
    # pidfds of the worker and of the forkserver that forked it: they tell for certain when
    # each has exited, and a signal sent through one can reach no process that reused the pid.
    pidfd: int
    forkserver: int
    job_id: str | None = None
    started: float = 0.0
    done: int = 0  # jobs finished by this process


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the kernel's out-of-memory killer, or an operator)" if -code == 9 else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


def death_problem(code: int | None, memory_limit: int | None) -> dict:
    """The problem of a job whose worker process died with exit `code`, in every backend.
    Native code (onnxruntime, onnx, BLAS) that cannot allocate may abort the process (an
    uncaught std::bad_alloc ends in abort()): a SIGABRT is reported as the memory limit
    (`memory_limit`, CLIPPRUNE_WORKER_MEMORY_BYTES), its likely cause, naming the signal."""
    detail = f"the job's worker process {describe_exit(code)}"
    if code == -signal.SIGABRT:
        limit = out_of_memory_detail(memory_limit)
        return problem(
            422,
            "Out of memory",
            f"{detail}, as native code does when an allocation fails; most likely {limit}",
        )
    return problem(500, "Worker process died", detail)


class LocalBackend:
    # Every job ends in this process's dispatcher or in a DELETE, which both tell `ends`; the
    # re-read only bounds the wait should an end ever go untold.
    recheck_s = 1.0

    def __init__(self, settings: Settings, store: JobStore, ends: JobEnds) -> None:
        self.settings = settings
        self.store = store
        self.ends = ends
        self.artifacts = ArtifactStore(settings.data_dir)
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["service.runner", "workers.jobs"])
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        # The dispatcher sleeps until a job ends, a worker dies or a submit rings this bell.
        self.bell, self.bell_rope = socket.socketpair()
        self.bell.setblocking(False)
        self.bell_rope.setblocking(False)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def recover(self) -> None:
        """Jobs a dead service left `running`: retried if they have attempts left, else failed."""
        for job_id in self.store.running():
            row = self.store.get(job_id)
            attempts = None if row is None else row.attempts
            detail = "the service stopped while this job ran, twice"
            if requeue_or_fail(
                self.store, self.artifacts.job_dir(job_id), job_id, attempts, detail
            ):
                log.warning(
                    "requeued job left running by a stopped service", extra={"job_id": job_id}
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
            for worker in self.workers:
                self._kill(worker)
                self._release(worker)
                if worker.job_id is not None:
                    # it runs again on the next start, with its crash retry still to come
                    self.store.put_back(worker.job_id)
            self.workers.clear()
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
            for worker in self.workers:
                if worker.job_id == job_id:
                    self._kill(worker)
                    # Canceled, not lost: the dispatcher must not tell waiters the job ended, or
                    # they would answer with the row's passing `canceled`; the DELETE tells them
                    # once the row is gone, and they answer 404.
                    worker.job_id = None
        self._ring()  # the dispatcher replaces the worker

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("dispatcher tick failed; retrying")
            with self.lock:
                waits = [w.jobs for w in self.workers if w.job_id and not w.jobs.closed] + [
                    w.process.sentinel for w in self.workers
                ]
            wait([*waits, self.bell], timeout=TICK_S)
            with contextlib.suppress(BlockingIOError, OSError):
                while self.bell.recv(4096):
                    pass

    def tick(self) -> None:
        with self.lock:
            self._collect()
            self._reap()
            self._fill()
            self._dispatch()

    def _spawn(self) -> _Worker:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=_worker_main,
            args=(self.settings, theirs, os.getpid()),
            name="clipprune-worker",
            daemon=False,
        )
        process.start()
        theirs.close()
        try:
            return _Worker(process, ours, *_pidfds(process.pid))
        except OSError:  # the worker is gone already (it failed as it started): tried next tick
            ours.close()
            raise

    def _kill(self, worker: _Worker) -> None:
        """SIGKILL the worker and wait until it has exited: its sentinel is no proof, as it
        closes when the forkserver dies while the worker runs on."""
        with contextlib.suppress(ProcessLookupError):  # already exited and reaped
            signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
        if not _exited(worker.pidfd, KILL_WAIT_S):
            log.error("worker %s still runs %g s after SIGKILL", worker.process.pid, KILL_WAIT_S)
        worker.process.join(KILL_WAIT_S)  # its exit status, from the forkserver if it runs

    def _release(self, worker: _Worker) -> None:
        """Close what the dispatcher holds of a worker it is done with: its pipe, its pidfds,
        and the two descriptors multiprocessing keeps per forkserver child until the process
        is joined and closed (a recycled worker left them open: /metrics' soak saw pipes grow)."""
        worker.jobs.close()
        os.close(worker.pidfd)
        os.close(worker.forkserver)
        worker.process.join(KILL_WAIT_S)
        with contextlib.suppress(ValueError):  # still running after its kill: logged by _kill
            worker.process.close()

    def _collect(self) -> None:
        """Workers that answered: their job is over (the runner recorded how it ended)."""
        for worker in self.workers:
            if worker.job_id is None or worker.jobs.closed:
                continue
            with contextlib.suppress(EOFError, OSError):
                if worker.jobs.poll():
                    worker.jobs.recv()
                    self.ends.ended(worker.job_id)
                    worker.job_id = None
                    worker.done += 1

    def _reap(self) -> None:
        """Workers that died, ran past the time limit, or have done their share: replaced."""
        limit = self.settings.job_timeout_s
        keep = []
        for worker in self.workers:
            process = worker.process
            if worker.job_id and process.is_alive() and time.monotonic() - worker.started > limit:
                self._kill(worker)
                end_with_failure(
                    self.store,
                    self.artifacts.job_dir(worker.job_id),
                    worker.job_id,
                    problem(
                        504,
                        "Job time limit",
                        f"the job ran longer than {limit:g} s "
                        "(CLIPPRUNE_JOB_TIMEOUT_S) and was stopped",
                    ),
                    {"running"},
                )
                self.ends.ended(worker.job_id)
            elif not process.is_alive():  # the worker died, or the forkserver that forked it
                forkserver_died = _exited(worker.forkserver)
                self._kill(worker)  # before its job is accounted for: no run outlives that
                if worker.job_id:
                    self._lost(worker.job_id, forkserver_died, process.exitcode)
            elif worker.job_id is None and worker.done >= MAX_JOBS_PER_WORKER:
                worker.jobs.close()  # EOF: the worker returns
                if not _exited(worker.pidfd, KILL_WAIT_S):
                    self._kill(worker)
            else:
                keep.append(worker)
                continue
            self._release(worker)
        self.workers = keep

    def _lost(self, job_id: str, forkserver_died: bool, code: int | None) -> None:
        """Account for the job of a worker that is gone. A dead forkserver is not the job's
        doing: the job gets a lost worker's retry (requeued once, then failed), as after a
        crash. A worker that died itself fails its job, saying how."""
        job_dir = self.artifacts.job_dir(job_id)
        if forkserver_died:
            row = self.store.get(job_id)
            detail = "the worker pool's forkserver process died while this job ran, twice"
            attempts = None if row is None else row.attempts
            if requeue_or_fail(self.store, job_dir, job_id, attempts, detail):
                log.warning("requeued a job whose forkserver died", extra={"job_id": job_id})
                return
        else:
            died = death_problem(code, self.settings.worker_memory_bytes)
            end_with_failure(self.store, job_dir, job_id, died, {"queued", "running"})
        self.ends.ended(job_id)

    def _fill(self) -> None:
        while len(self.workers) < self.settings.workers and not self.stopping.is_set():
            self.workers.append(self._spawn())

    def _dispatch(self) -> None:
        idle = [worker for worker in self.workers if worker.job_id is None]
        if not idle:
            return
        # jobs handed out but not yet claimed are still `queued` in the table: skip them
        handed = {worker.job_id for worker in self.workers if worker.job_id}
        waiting = [j for j in self.store.queued(len(idle) + len(handed)) if j not in handed]
        for worker, job_id in zip(idle, waiting, strict=False):
            worker.jobs.send(job_id)
            worker.job_id = job_id
            worker.started = time.monotonic()
