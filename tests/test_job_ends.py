"""JobEnds: a request waiting on a job wakes when another thread says the job ended, and
only when it has."""

import asyncio
import threading

from service.job_ends import JobEnds
from service.local_backend import LocalBackend
from service.settings import Settings
from service.store import JobStore


def test_an_end_told_from_another_thread_wakes_only_that_jobs_waiters():
    ends = JobEnds()

    async def scenario() -> None:
        with ends.watch("a") as first, ends.watch("a") as second, ends.watch("b") as other:
            teller = threading.Thread(target=ends.ended, args=("a",))
            teller.start()
            await asyncio.wait_for(asyncio.gather(first.wait(), second.wait()), 5)
            teller.join()
            await asyncio.sleep(0)
            assert not other.is_set()

    asyncio.run(scenario())


def test_watches_leave_nothing_behind_and_an_unwatched_end_is_harmless():
    ends = JobEnds()

    async def scenario() -> None:
        with ends.watch("a"), ends.watch("a"):
            pass
        ends.ended("a")

    asyncio.run(scenario())
    assert ends._waiting == {}


def test_the_worker_a_delete_kills_does_not_tell_its_job_ended(tmp_path):
    """DELETE cancels the row, kills the worker, then removes the row and tells the waiters,
    who answer 404. Were the killed worker's death told first, they would read the row in
    between and answer 200 with a job about to vanish."""
    settings = Settings(data_dir=tmp_path, workers=1)
    told: list[str] = []
    ends = JobEnds()
    ends.ended = told.append  # type: ignore[method-assign]
    backend = LocalBackend(settings, JobStore(settings.database), ends)
    worker = backend._spawn()
    worker.job_id = "a" * 32  # as if handed this job
    backend.workers.append(worker)
    try:
        backend.cancel(worker.job_id)
        backend.tick()  # reaps the killed worker and starts its replacement
        assert told == [] and worker not in backend.workers
    finally:
        for each in backend.workers:
            backend._kill(each)
