"""The queue limit (CLIPPRUNE_MAX_QUEUED_JOBS) holds under concurrency: a submit takes its slot
in the same transaction that counts, before its body is read, so concurrent submits and slow
uploads cannot together pass it, and a slot taken by a process that died is given back."""

import json
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server import Server, accepted_id, submit

from service.store import JobStore, new_job_id

LIMIT = 20
# Jobs that run for minutes: once a worker has one, nothing else leaves the queue, so every
# 202 beyond the limit would be a slot the limit failed to hold.
SLOW_TRAIN = {"epochs": 10000, "model": {"type": "mlp", "hidden": [64]}}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres_url")


def test_concurrent_reservations_never_pass_the_limit(database):
    store = JobStore(database)
    try:
        with ThreadPoolExecutor(64) as pool:
            answers = list(
                pool.map(
                    lambda _: store.reserve(new_job_id(), "owner", "prune", LIMIT, 60),
                    range(150),
                )
            )
        assert answers.count(None) == LIMIT
        assert all(answer == LIMIT for answer in answers if answer is not None)
        assert store.waiting() == LIMIT
        assert store.count("queued") == 0  # reserved, not runnable: the dispatcher sees none
        assert store.page("owner", 100, None) == []  # nor does the owner's listing
    finally:
        store.engine.dispose()


def test_a_reservation_is_released_activated_or_swept(database):
    store = JobStore(database)
    try:
        held, failed, abandoned = new_job_id(), new_job_id(), new_job_id()
        for job_id in (held, failed, abandoned):
            assert store.reserve(job_id, "owner", "prune", 3, 60) is None
        assert store.reserve(new_job_id(), "owner", "prune", 3, 60) == 3
        store.release(failed)
        row = store.activate(held, {"sparsity": 0.5})
        assert (row.status, row.stage, row.params) == ("queued", "queued", {"sparsity": 0.5})
        store.release(held)  # a no-op once the job is queued
        assert store.queued(10) == [held]
        # `abandoned` is no longer renewed; with a lease of 0 s the next reservation sweeps it
        time.sleep(0.01)
        assert store.reserve(new_job_id(), "owner", "prune", 3, 0) is None
        assert store.get(abandoned) is None
        assert store.activate(abandoned, {}) is None
        assert store.waiting() == 2
    finally:
        store.engine.dispose()


def _waiting(server: Server, database: str) -> int:
    if database == "sqlite":
        with sqlite3.connect(server.data_dir / "clipprune.db", timeout=30) as db:
            (count,) = db.execute(
                "SELECT count(*) FROM clipprune_jobs WHERE status IN ('queued', 'uploading')"
            ).fetchone()
        return count
    store = JobStore(database)
    try:
        return store.waiting()
    finally:
        store.engine.dispose()


def _assert_busy(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["retry-after"] == "10"
    assert len(response.content) < 300
    assert "the most this service queues" in response.json()["detail"]


@pytest.mark.parametrize("backend_db", ["sqlite", "postgresql"])
def test_150_concurrent_submits_against_a_limit_of_20(backend_db, make_server, request, digits_csv):
    database = "sqlite" if backend_db == "sqlite" else request.getfixturevalue("postgres_url")
    settings = {"max_queued_jobs": LIMIT, "workers": 1}
    if database != "sqlite":
        settings["database_url"] = database
    server = make_server(**settings)
    depths: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            depths.append(_waiting(server, database))
            time.sleep(0.02)

    start = threading.Barrier(150)

    def one(_: int) -> httpx.Response:
        with server.client() as client:
            start.wait()
            return submit(client, "train", {"train_data": digits_csv}, SLOW_TRAIN)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(150) as pool:
            responses = list(pool.map(one, range(150)))
    finally:
        done.set()
        watcher.join()
    codes = sorted(response.status_code for response in responses)
    accepted = codes.count(202)
    assert set(codes) == {202, 429}, codes
    # One worker can take one job out of the queue while the burst lasts, and it runs for
    # minutes: at most LIMIT + 1 accepted, and never more than LIMIT waiting at any moment.
    assert LIMIT <= accepted <= LIMIT + 1, codes
    for response in responses:
        if response.status_code == 429:
            _assert_busy(response)
    assert depths and max(depths) <= LIMIT, max(depths)
    assert _waiting(server, database) <= LIMIT
    with server.client() as client:
        _assert_busy(submit(client, "train", {"train_data": digits_csv}, SLOW_TRAIN))
        listed = client.get("/v1/jobs", params={"limit": 100}).json()
        assert len(listed["items"]) == accepted  # a refused submit left no job


def _multipart(digits_csv: bytes) -> tuple[bytes, bytes]:
    """A train submit as raw HTTP: the head (request line, headers) and the body."""
    boundary = "clipprune-queue-limit"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="params"\r\n\r\n'
            f"{json.dumps(SLOW_TRAIN)}\r\n"
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="train_data"; filename="train.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        + digits_csv
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /v1/jobs/train HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head, body


def _start_uploads(server: Server, count: int, digits_csv: bytes) -> list[socket.socket]:
    """`count` uploads that send their head, then stall before the body. (Body bytes the
    server never reads would turn its close after a 429 into a reset that loses the answer.)"""
    head, _ = _multipart(digits_csv)
    port = int(server.url.rsplit(":", 1)[1])
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(head)
        sockets.append(sock)
    return sockets


def _answer(sock: socket.socket, timeout: float) -> bytes:
    """What the server has said on this connection within `timeout` (b"" for nothing)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        pass
    return b"".join(chunks)


def _rows(server: Server) -> list[tuple[str, str | None]]:
    with sqlite3.connect(server.data_dir / "clipprune.db", timeout=30) as db:
        return db.execute("SELECT status, started_at FROM clipprune_jobs").fetchall()


def test_slow_uploads_hold_their_slots_and_give_them_back(make_server, digits_csv):
    server = make_server(max_queued_jobs=5)
    sockets = _start_uploads(server, 30, digits_csv)
    try:
        time.sleep(1)
        answers = [_answer(sock, 0.2) for sock in sockets]
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 429")]
        stalled = [sock for sock, a in zip(sockets, answers, strict=True) if not a]
        assert (len(refused), len(stalled)) == (25, 5), answers
        for answer in refused:
            assert b"application/problem+json" in answer and b"retry-after: 10" in answer.lower()
        # Five uploads hold the five slots, half their body in; none of them runs while it
        # uploads, or is listed.
        _, body = _multipart(digits_csv)
        for sock in stalled:
            sock.sendall(body[: len(body) // 2])
        time.sleep(2)
        assert _rows(server) == [("uploading", None)] * 5
        with server.client() as client:
            assert client.get("/v1/jobs").json()["items"] == []
            _assert_busy(submit(client, "train", {"train_data": digits_csv}, SLOW_TRAIN))
        # Two uploads finish (202), three are cut off: their slots go back.
        for sock in stalled[:2]:
            sock.sendall(body[len(body) // 2 :])
            assert _answer(sock, 30).startswith(b"HTTP/1.1 202"), "upload not accepted"
        for sock in stalled[2:]:
            sock.close()
        deadline = time.monotonic() + 10
        while any(status == "uploading" for status, _ in _rows(server)):
            assert time.monotonic() < deadline, _rows(server)
            time.sleep(0.05)
        assert len(_rows(server)) == 2
        with server.client() as client:
            for _ in range(3):  # the three slots given back, and then no more
                accepted_id(submit(client, "train", {"train_data": digits_csv}, SLOW_TRAIN))
            waiting = _waiting(server, "sqlite")
            if waiting >= 5:
                _assert_busy(submit(client, "train", {"train_data": digits_csv}, SLOW_TRAIN))
            assert waiting <= 5
    finally:
        for sock in sockets:
            sock.close()


def test_slots_of_a_crashed_server_are_swept_after_their_lease(make_server, digits_csv):
    settings = {"max_queued_jobs": 3, "heartbeat_s": 0.5, "worker_lease_s": 3}
    server = make_server(**settings)
    sockets = _start_uploads(server, 3, digits_csv)
    try:
        time.sleep(2)  # past a few renewals: the reservations are live
        assert _rows(server) == [("uploading", None)] * 3
        with server.client() as client:
            _assert_busy(submit(client, "train", {"train_data": digits_csv}, SLOW_TRAIN))
        server.process.kill()  # no chance to give anything back
        server.process.wait()
    finally:
        for sock in sockets:
            sock.close()
    server = make_server(**settings)
    assert [status for status, _ in _rows(server)] == ["uploading"] * 3
    time.sleep(3)  # the lease runs out: nothing renews these any more
    with server.client() as client:
        job_id = accepted_id(submit(client, "train", {"train_data": digits_csv}, SLOW_TRAIN))
        assert [job["id"] for job in client.get("/v1/jobs").json()["items"]] == [job_id]
    assert [status for status, _ in _rows(server)] != ["uploading"] * 3
    assert not any(status == "uploading" for status, _ in _rows(server))


def test_refused_uploads_give_their_slot_back(make_server, digits_csv):
    server = make_server(max_queued_jobs=1, max_upload_bytes=65536)
    small = b"\n".join(digits_csv.split(b"\n")[:200])  # under the upload limit
    with server.client() as client:
        refused = [
            submit(client, "train", {"train_data": small}, {"epochs": 0}),  # 422 params
            submit(client, "train", {"train_data": b""}, SLOW_TRAIN),  # 422 empty file
            submit(client, "train", {"train_data": digits_csv}, SLOW_TRAIN),  # 413
        ]
        assert [r.status_code for r in refused] == [422, 422, 413], [r.text for r in refused]
        accepted_id(submit(client, "train", {"train_data": small}, SLOW_TRAIN))
    assert len(_rows(server)) == 1  # the refused ones left no row behind
