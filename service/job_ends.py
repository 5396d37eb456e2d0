"""Requests waiting for a job to end (`?wait=`), woken by whatever in this process ends it.

A waiting request sleeps on an event rather than reading its job row over and over: on a small
machine every read is CPU the workers do not get, and a poll answers late by up to its period.
"""

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class JobEnds:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # ended() comes from the dispatcher thread too
        self._waiting: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever the job may have ended. Watch before the job can start, so
        that no end goes unheard; clear the event before reading the row again."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiting.setdefault(job_id, []).append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiting = self._waiting[job_id]
                waiting.remove(entry)
                if not waiting:
                    del self._waiting[job_id]

    def ended(self, job_id: str) -> None:
        """From any thread: the job's row may now show an end; its waiters read it again."""
        with self._lock:
            waiting = list(self._waiting.get(job_id, ()))
        for loop, event in waiting:
            loop.call_soon_threadsafe(event.set)
