"""Load and soak: many small prune jobs from 50 concurrent clients against the embedded default.

Every job must be accounted for, and the API process must neither grow (RSS) nor leak file
descriptors as jobs go by. `make soak` runs 1000 jobs (CLIPPRUNE_SOAK_JOBS); the suite runs 200.

What is measured: the uvicorn process alone. It is the one process that lives as long as the
service and must not grow; the worker processes are recycled every 50 jobs by design, so their
memory returns to the system on a schedule and adding it in would measure where the recycle
fell, not a leak. Their RSS is printed beside it for the record.

Why the baseline is taken after the first 100 jobs and not at start: the first jobs fill what
is built lazily and then kept (the threadpool's threads, SQLAlchemy's pooled connections, a
worker generation's pipes, allocator arenas for 50 concurrent requests); by 100 jobs the two
workers have done about 50 each, the recycling point, so the baseline holds a steady state and
growth from there on is what a leak would look like. Every kind of fd must be back to its
warm-up count except the SQLite database's own (the file, -wal, -shm): those follow the most
connections the pool has opened at once, which a later burst can raise, so they are held to
the pool's bound instead (see _connection_bound).
"""

import contextlib
import hashlib
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import psutil
from server import Server, submit

from service.store import make_engine

CLIENTS = 50
WARM_UP_JOBS = 100
JOBS = int(os.environ.get("CLIPPRUNE_SOAK_JOBS", "200"))
if JOBS <= WARM_UP_JOBS:  # a setting that would measure nothing is an error, not a skip
    raise ValueError(f"CLIPPRUNE_SOAK_JOBS={JOBS}: the soak needs more than {WARM_UP_JOBS} jobs")
RSS_GROWTH = 0.10  # allowed growth of the API process's RSS from warm-up to the end
SETTLE_S = 10.0  # for sockets the clients closed to be closed by the server too


def _run_jobs(server: Server, model: bytes, count: int) -> list[str]:
    """`count` prune jobs from CLIENTS threads, one httpx client each, submitting with wait=
    and downloading each result; returns the ids submitted (every one, whatever happened)."""
    remaining = iter(range(count))
    take = threading.Lock()
    features = np.random.default_rng(0).random((8, 64), dtype=np.float32)

    def client_run(_: int) -> list[tuple[str, str]]:
        outcomes = []
        # A connection idle for uvicorn's keep-alive timeout (5 s, httpx's pool expiry too) can
        # be closed by the server just as the client sends on it, and a POST is not retried;
        # on a loaded machine a thread can sit that long between two requests.
        limits = httpx.Limits(keepalive_expiry=1)
        with httpx.Client(base_url=server.url, timeout=120, limits=limits) as client:
            while True:
                with take:
                    if next(remaining, None) is None:
                        return outcomes
                response = submit(client, "prune", {"model": model}, {"sparsity": 0.5}, wait=60)
                assert response.status_code in (200, 202), response.text
                job = response.json()
                outcomes.append((job["id"], job["status"]))
                if job["status"] != "succeeded":
                    continue  # checked below: every id must end succeeded
                download = client.get(job["links"]["model"])
                assert download.status_code == 200
                digest = hashlib.sha256(download.content).hexdigest()
                assert download.headers["etag"] == f'"{digest}"'
                session = ort.InferenceSession(download.content, providers=["CPUExecutionProvider"])
                assert session.run(None, {"X": features})[0].shape == (8,)

    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = [o for batch in pool.map(client_run, range(CLIENTS)) for o in batch]
    ids = [job_id for job_id, _ in outcomes]
    assert len(ids) == len(set(ids)) == count
    # A job that was still running when its wait ran out is followed to its end here.
    with server.client() as client:
        for job_id, status in outcomes:
            deadline = time.monotonic() + 120
            while status not in {"succeeded", "failed", "canceled"}:
                assert time.monotonic() < deadline, f"job {job_id} stuck in {status}"
                time.sleep(0.1)
                status = client.get(f"/v1/jobs/{job_id}").json()["status"]
            assert status == "succeeded", client.get(f"/v1/jobs/{job_id}").json()
    return ids


def _listed(server: Server) -> list[str]:
    listed, url = [], "/v1/jobs?limit=100"
    with server.client() as client:
        while url:
            page = client.get(url).json()
            listed += [job["id"] for job in page["items"]]
            url = page["next"]
    return listed


DATABASE = "clipprune.db"  # and its -wal and -shm beside it


def _database(kind: str) -> bool:
    return kind.startswith(DATABASE)


def _fds(pid: int) -> Counter[str]:
    """The process's open fds by kind: socket, pipe, anon_inode, or the file's name."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            kinds[target.split(":")[0] if ":[" in target else os.path.basename(target)] += 1
    return kinds


def _others(kinds: Counter[str]) -> int:
    return sum(n for kind, n in kinds.items() if not _database(kind))


def _sqlite(kinds: Counter[str]) -> int:
    return sum(n for kind, n in kinds.items() if _database(kind))


def _settled_fds(pid: int, target: int | None = None) -> Counter[str]:
    """Open fds once the server has closed the sockets of clients that went away: until
    those besides the database's are down to `target`, or (without one) unchanged for a
    second."""
    deadline = time.monotonic() + SETTLE_S
    kinds, steady_since = _fds(pid), time.monotonic()
    while time.monotonic() < deadline:
        if target is not None and _others(kinds) <= target:
            break
        if target is None and time.monotonic() - steady_since >= 1.0:
            break
        time.sleep(0.2)
        now = _fds(pid)
        if now != kinds:
            kinds, steady_since = now, time.monotonic()
    return kinds


def _connection_bound(tmp_path: Path) -> int:
    """How many SQLite connections the API process can hold at once: its pool's size plus
    overflow. The database's fds follow the connections, which the pool opens as load asks
    and keeps (each holds the database and its -wal open), and which no warm-up can be sure
    to have opened all of: a later burst may open one more. And SQLite does not close the
    database file's fd when a connection closes while another holds a lock on the file
    (closing it would drop that process's POSIX locks); it keeps the fd for the next
    connection to reuse. So each of the database's files has at most this many fds open."""
    engine = make_engine(f"sqlite:///{tmp_path / 'bound.db'}")
    try:
        return engine.pool.size() + engine.pool._max_overflow  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def _mib(rss: int) -> str:
    return f"{rss / 2**20:.1f} MiB"


def test_soak_every_job_accounted_for_and_the_api_process_does_not_grow(
    make_server, tmp_path, mlp_classifier
):
    model = mlp_classifier.SerializeToString()
    server = make_server()
    api = psutil.Process(server.process.pid)
    start_rss, started = api.memory_info().rss, time.monotonic()
    ids = _run_jobs(server, model, WARM_UP_JOBS)
    warm_rss, warm_fds = api.memory_info().rss, _settled_fds(api.pid)
    warm_total = api.num_fds()
    ids += _run_jobs(server, model, JOBS - WARM_UP_JOBS)
    elapsed = time.monotonic() - started
    end_fds = _settled_fds(api.pid, _others(warm_fds))
    end_rss, end_total = api.memory_info().rss, api.num_fds()
    workers = sum(p.memory_info().rss for p in server.job_processes())
    print(
        f"\nsoak: {JOBS} jobs in {elapsed:.1f} s ({JOBS / elapsed:.1f} jobs/s); API RSS "
        f"{_mib(start_rss)} at start, {_mib(warm_rss)} after {WARM_UP_JOBS} jobs, "
        f"{_mib(end_rss)} after {JOBS}; fds {warm_total} -> {end_total} ({_sqlite(warm_fds)}"
        f" -> {_sqlite(end_fds)} on the database); workers' RSS {_mib(workers)} at the end"
    )
    assert sorted(_listed(server)) == sorted(ids)
    assert end_rss <= warm_rss * (1 + RSS_GROWTH), (
        f"API RSS grew {_mib(warm_rss)} -> {_mib(end_rss)} over {JOBS - WARM_UP_JOBS} jobs"
    )
    grew = {
        kind: (warm_fds[kind], n)
        for kind, n in end_fds.items()
        if n > warm_fds[kind] and not _database(kind)
    }
    assert not grew, f"open fds grew (after warm-up, at the end): {grew}"
    bound = _connection_bound(tmp_path)
    assert all(n <= bound for kind, n in end_fds.items() if _database(kind)), end_fds
