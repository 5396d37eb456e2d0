"""JobEnds: a request waiting on a job wakes when another thread says the job ended."""

import asyncio
import threading

from service.job_ends import JobEnds


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
