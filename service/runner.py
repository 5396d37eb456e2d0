"""Running one job to its end inside a worker process, whatever the backend.

The job row is claimed (queued -> running) before any work, progress goes to the row, and the
job ends `succeeded` or `failed` with a problem that says why. A job that is not queued any more
(canceled, or already run by another worker) is left alone, so a redelivered job never runs twice.
"""

import logging
import os
import resource
import secrets
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from threadpoolctl import threadpool_info, threadpool_limits

from service.artifacts import DISK_FULL
from service.store import JobStore
from workers import jobs
from workers.errors import InputError, one_line
from workers.jobs.memory import MEMORY_LIMIT, memory_limit

log = logging.getLogger("clipprune.job")

MAX_ATTEMPTS = 2  # a job whose worker was lost is retried once, then failed
ENDED = ("succeeded", "failed")  # what run_job returns when this run ended the job
STAGE_TIMEOUT_EXIT = 75  # a worker ends itself with this status after failing a stuck stage
PROGRESS_INTERVAL_S = 0.5  # at most two progress writes a second; stage changes always go


# How onnxruntime says an allocation failed (it returns an error rather than raising bad_alloc),
# and protobuf when a model its parser cannot hold arrives (it raises DecodeError).
ALLOCATION_FAILED = (
    "Failed to allocate memory",
    "bad_alloc",
    "bad allocation",
    "Arena alloc failed",
)


# Read by OpenMP and BLAS libraries that load after the limit is set; those already loaded
# (NumPy's OpenBLAS, imported by the forkserver) are limited through threadpoolctl.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def prepare_worker(memory_bytes: int | None, threads: int | None) -> None:
    """What every worker process does before its first job, in every backend: cap its memory
    and its math libraries' threads, so that the workers together stay within the machine."""
    if memory_bytes is not None:
        limit_memory(memory_bytes)
    if threads is not None:
        limit_threads(threads)


def limit_threads(threads: int) -> None:
    """Cap the BLAS and OpenMP thread pools of this process at `threads`
    (CLIPPRUNE_WORKER_THREADS): two workers each running BLAS on every core oversubscribe
    them (a 30-epoch fine-tune took 15-32 s instead of 4.5 s on a busy machine)."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    threadpool_limits(limits=threads)


def math_threads() -> str:
    """The thread pools this process's math libraries run, for the job log."""
    pools = threadpool_info()
    return ", ".join(f"{pool['internal_api']} {pool['num_threads']}" for pool in pools) or "none"


def limit_memory(limit_bytes: int) -> None:
    """Cap this worker process's memory at `limit_bytes` (CLIPPRUNE_WORKER_MEMORY_BYTES), before
    any job runs: an allocation past it fails (MemoryError, or onnxruntime's error) instead of
    growing the process until the kernel picks a victim."""
    resource.setrlimit(MEMORY_LIMIT, (limit_bytes, limit_bytes))


def out_of_memory_detail(limit: int | None) -> str:
    if limit is None:
        return "the job ran out of memory"
    return (
        f"the job needed more memory than a worker is allowed: {limit} bytes "
        f"({limit / 2**30:.2f} GiB, CLIPPRUNE_WORKER_MEMORY_BYTES)"
    )


def _allocation_failed(exc: BaseException) -> bool:
    """Did `exc`, or an error it was raised from, come from a failed allocation?"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or any(s in str(current) for s in ALLOCATION_FAILED):
            return True
        current = current.__cause__ or current.__context__
    return False


def problem(status: int, title: str, detail: str) -> dict[str, Any]:
    """A job's problem; the detail on one line of at most 300 characters, whatever raised it."""
    return {"type": "about:blank", "title": title, "status": status, "detail": one_line(detail)}


def end_with_failure(
    store: JobStore,
    job_dir: Path,
    job_id: str,
    failure: dict[str, Any],
    from_states: set[str],
    token: str | None = None,
) -> bool:
    """Fail the job from `from_states` (under `token`, if given); when this call ended it, what
    its attempts wrote on their way goes too: no attempt needs it any more. For whatever ends a
    job whose run could not (the stage watchdog, a backend that saw its worker die or time
    out); a run that ends its job cleans up as it returns."""
    if not store.fail(job_id, failure, from_states, token):
        return False
    jobs.remove_attempt_files(job_dir)
    return True


def requeue_or_fail(
    store: JobStore, job_dir: Path, job_id: str, attempts: int | None, detail: str
) -> bool:
    """The retry policy for a job whose worker was lost, in every backend:
    queued again if it has attempts left (True), else failed with a "Worker lost" problem that
    says `detail` (False). `attempts` is None when the job's row could not be read."""
    if attempts is not None and attempts < MAX_ATTEMPTS and store.requeue(job_id):
        return True
    end_with_failure(store, job_dir, job_id, problem(500, "Worker lost", detail), {"running"})
    return False


class ClaimLost(Exception):
    """The run's claim no longer holds its job (a lease that lapsed while the worker lived, so
    another run has it; or it was canceled): the run stops at its next progress report rather
    than compute, and publish, a result nobody takes."""


class StageClock:
    """The stage a job is in and since when: its progress callback moves it on."""

    def __init__(self) -> None:
        self.stage = "starting"
        self.since = time.monotonic()

    def enter(self, stage: str) -> None:
        if stage != self.stage:
            self.stage, self.since = stage, time.monotonic()


def _progress_writer(store: JobStore, job_id: str, token: str, clock: StageClock) -> jobs.Progress:
    last = {"stage": "", "time": 0.0}

    def write(stage: str, fraction: float) -> None:
        clock.enter(stage)
        moment = time.monotonic()
        if stage != last["stage"] or moment - last["time"] >= PROGRESS_INTERVAL_S:
            if not store.progress(job_id, token, stage, fraction):
                raise ClaimLost(f"the job's claim lapsed at stage {stage!r}")
            last.update(stage=stage, time=moment)

    return write


def _stage_watchdog(
    store: JobStore,
    job_dir: Path,
    job_id: str,
    token: str,
    clock: StageClock,
    budget_s: float,
    stop: threading.Event,
) -> None:
    """Fail the job and end this process when one stage outlives its budget. A stage may be
    stuck inside native code (onnxruntime running a Loop of 2^62 iterations, a session being
    built) that no Python exception can interrupt: only ending the process stops it, and every
    backend replaces a worker that exits."""
    while not stop.wait(min(1.0, budget_s / 4)):
        if time.monotonic() - clock.since <= budget_s:
            continue
        detail = (
            f"the job's stage {clock.stage!r} ran longer than {budget_s:g} s "
            "(CLIPPRUNE_STAGE_TIMEOUT_S) and was stopped; send a smaller model or data"
        )
        try:
            failure = problem(422, "Stage time limit", detail)
            end_with_failure(store, job_dir, job_id, failure, {"running"}, token)
        finally:
            log.info("job failed: %s", detail, extra={"job_id": job_id})
            logging.shutdown()
            os._exit(STAGE_TIMEOUT_EXIT)


def _heartbeat(
    store: JobStore, job_id: str, token: str, every_s: float, stop: threading.Event
) -> None:
    while not stop.wait(every_s):
        try:
            store.heartbeat(job_id, token)
        except Exception:  # a database hiccup: the next beat tries again within the lease
            log.warning("heartbeat failed", exc_info=True, extra={"job_id": job_id})


def run_job(
    store: JobStore,
    job_dir: Path,
    job_id: str,
    heartbeat_s: float,
    time_limit_errors: tuple[type[BaseException], ...] = (),
    stage_timeout_s: float | None = None,
) -> str:
    """Claim and run one job; returns its final status ("skipped" if it was not queued,
    "superseded" if its claim lapsed and another run holds the job).

    The claim carries a token of this run; every later write to the job row names it, so a
    run that a lease expiry replaced can no longer change the job. While it runs, the row's
    heartbeat is renewed every `heartbeat_s`. `time_limit_errors`: exceptions the backend
    raises in the job when its time is up. `stage_timeout_s`: the budget of each stage (the
    stages are what the job reports as progress); past it the job fails and the process ends.
    """
    token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    if not store.claim(job_id, token):
        return "skipped"
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(store, job_id, token, heartbeat_s, stop), daemon=True
    )
    beat.start()
    clock = StageClock()
    if stage_timeout_s is not None:
        watchdog = threading.Thread(
            target=_stage_watchdog,
            args=(store, job_dir, job_id, token, clock, stage_timeout_s, stop),
            daemon=True,
        )
        watchdog.start()
    status = "superseded"
    try:
        # This run holds the claim: what an earlier attempt left (its worker died) is nobody's.
        jobs.remove_attempt_files(job_dir)
        status = _run_claimed(store, job_dir, job_id, token, clock, time_limit_errors)
        return status
    finally:
        stop.set()
        if status in ENDED:  # not when a later run holds the claim: its files are its own
            jobs.remove_attempt_files(job_dir)


def _run_claimed(
    store: JobStore,
    job_dir: Path,
    job_id: str,
    token: str,
    clock: StageClock,
    time_limit_errors: tuple[type[BaseException], ...],
) -> str:
    row = store.get(job_id)
    if row is None:  # deleted between the claim and now
        return "skipped"
    extra = {"job_id": job_id, "kind": row.kind}
    log.info("job started (math threads: %s)", math_threads(), extra=extra)
    started = time.monotonic()
    progress = _progress_writer(store, job_id, token, clock)

    def fail(status: int, title: str, detail: str) -> str:
        if store.fail(job_id, problem(status, title, detail), {"running"}, token):
            return "failed"
        log.warning("job failed but its claim had lapsed: %s", detail, extra=extra)
        return "superseded"

    try:
        entry = jobs.JOB_KINDS[row.kind]
        entry.run(job_dir, entry.params.model_validate(row.params), progress)
    except ClaimLost as exc:
        log.warning("job stopped: %s; another run or a cancel has it", exc, extra=extra)
        return "superseded"
    except time_limit_errors:
        detail = "the job ran past its time limit (CLIPPRUNE_JOB_TIMEOUT_S) and was stopped"
        return fail(504, "Job time limit", detail)
    except InputError as exc:
        if _allocation_failed(exc):  # e.g. onnxruntime's failed allocation, reported as bad data
            log.info("job failed: out of memory: %s", exc, extra=extra)
            return fail(422, "Out of memory", out_of_memory_detail(memory_limit()))
        log.info("job failed: %s", exc, extra=extra)
        return fail(422, exc.title, str(exc))
    except ValidationError as exc:  # params validated at submit; only a changed schema lands here
        return fail(422, "Invalid parameters", str(exc))
    except MemoryError:
        log.info("job failed: out of memory", extra=extra)
        return fail(422, "Out of memory", out_of_memory_detail(memory_limit()))
    except Exception as exc:
        if _allocation_failed(exc):
            log.info("job failed: out of memory: %s", exc, extra=extra)
            return fail(422, "Out of memory", out_of_memory_detail(memory_limit()))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            # Neither the caller's input nor a bug: the same job succeeds once space is freed.
            log.error("job failed: the disk is full: %s", exc, extra=extra)
            detail = (
                f"the disk holding the job's files is full ({exc.strerror}); "
                "send the job again once space is freed"
            )
            return fail(507, "Insufficient storage", detail)
        log.error("job crashed\n%s", traceback.format_exc(), extra=extra)
        detail = f"clipprune failed on this job ({type(exc).__name__}: {exc}); this is a bug"
        return fail(500, "Internal error", detail)
    if not store.succeed(job_id, token):
        log.warning(
            "job finished but its claim had lapsed; result left to the run that holds it",
            extra=extra,
        )
        return "superseded"
    log.info("job succeeded in %.2f s", time.monotonic() - started, extra=extra)
    return "succeeded"
