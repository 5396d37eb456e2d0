"""Issue 14, Deliver 6: what is left on disk. Job directories whose job is gone are removed
at start, and uploads spool on the data directory's disk, leaving nothing behind."""

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from server import Server, accepted_id, submit, wait_for
from sqlalchemy import update

from service.settings import Settings
from service.store import JobRow, JobStore, new_job_id, now
from workers import jobs


def _job_dir(data_dir: Path, job_id: str) -> Path:
    """A job directory with an upload in it, as a submit leaves one."""
    inputs = data_dir / "jobs" / job_id / jobs.INPUT_DIR
    inputs.mkdir(parents=True)
    (inputs / jobs.MODEL_IN).write_bytes(b"half an upload")
    return inputs.parent


def _reserve(data_dir: Path, job_id: str, renewed_ago: timedelta) -> None:
    """The row of an upload under way (a reservation), last renewed `renewed_ago`."""
    store = JobStore(Settings(data_dir=data_dir).database)
    assert store.reserve(job_id, "owner", "prune", 100, 60) is None
    with store.session() as session:
        session.execute(
            update(JobRow).where(JobRow.id == job_id).values(heartbeat_at=now() - renewed_ago)
        )
    store.engine.dispose()


def test_job_directories_whose_job_is_gone_are_removed_at_start(
    make_server, tmp_path, digits_upload
):
    data_dir = tmp_path / "data"
    server = make_server(data_dir)
    with server.client() as client:
        job = submit(client, "prune", digits_upload, {"sparsity": 0.5}, wait=30).json()
        assert job["status"] == "succeeded", job
        model = client.get(job["links"]["model"]).content
    server.stop()

    no_row = _job_dir(data_dir, new_job_id())  # a crash between a DELETE's row and its files
    lapsed, held = new_job_id(), new_job_id()
    _job_dir(data_dir, lapsed)  # a crash during the upload's copy: its reservation lapsed
    _reserve(data_dir, lapsed, timedelta(hours=2))
    _job_dir(data_dir, held)  # an upload under way in another API process on the same data
    _reserve(data_dir, held, timedelta(0))
    (data_dir / "jobs" / "notes").mkdir()  # not a job id: not the store's to remove

    server = make_server(data_dir, worker_lease_s=3600)  # the held reservation stays in its lease
    assert not no_row.exists()
    assert sorted(p.name for p in (data_dir / "jobs").iterdir()) == sorted(
        [job["id"], held, "notes"]
    )
    store = JobStore(Settings(data_dir=data_dir).database)
    assert store.get(lapsed) is None  # its slot in the queue is given back
    assert store.get(held) is not None
    store.engine.dispose()
    with server.client() as client:
        assert client.get(job["links"]["model"]).content == model


def _open_files(pid: int) -> list[str]:
    """What the process's descriptors point at; an unnamed temporary file reads as
    `DIR/#INODE (deleted)`."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def _under(directory: Path, links: list[str]) -> list[str]:
    return [link for link in links if link.startswith(f"{directory}/")]


def _until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def system_tmp(monkeypatch) -> Iterator[Path]:
    """The server's system temporary directory (TMPDIR), one of its own. Short: the forkserver's
    socket goes there, and a socket's path has at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="cp-") as directory:
        monkeypatch.setenv("TMPDIR", directory)
        yield Path(directory)


def test_an_upload_spools_in_the_data_directory_and_leaves_nothing(
    system_tmp, make_server, digits_csv
):
    server: Server = make_server()
    spool = server.data_dir / "uploads"
    header, _, rows = digits_csv.partition(b"\n")
    data = header + b"\n" + b"\n".join([rows] * 8) + b"\n"  # 3 MiB: past the 1 MiB in memory
    boundary = "clipprune-spool"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="train_data"; '
        'filename="train.csv"\r\nContent-Type: text/csv\r\n\r\n'
    ).encode()
    tail = f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
    tail += f'{{"model": {{"hidden": [16]}}, "epochs": 1}}\r\n--{boundary}--\r\n'
    half = 2 * 2**20
    go_on = threading.Event()

    def body() -> Iterator[bytes]:  # the first 2 MiB, then the rest once the test has looked
        yield head + data[:half]
        assert go_on.wait(60)
        yield data[half:] + tail.encode()

    with server.client() as client, ThreadPoolExecutor(1) as pool:
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        sent = pool.submit(client.post, "/v1/jobs/train", content=body(), headers=headers)
        try:
            _until(lambda: _under(spool, _open_files(server.process.pid)), "spooled")
            assert not _under(system_tmp, _open_files(server.process.pid))
        finally:
            go_on.set()
        job_id = accepted_id(sent.result(60))
        stored = server.data_dir / "jobs" / job_id / jobs.INPUT_DIR / jobs.TRAIN_DATA
        assert stored.read_bytes() == data
        assert not _under(spool, _open_files(server.process.pid))  # closed: nothing left
        assert not list(spool.iterdir())
        assert wait_for(client, job_id)["status"] == "succeeded"
