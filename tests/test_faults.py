"""Faults a real deployment meets that test_service_resilience does not bring: the artifact store's
disk filling up (a real, small tmpfs, not a simulated error), restarts and crashes with jobs
waiting in the queue behind the running ones, and the worker pool's forkserver killed."""

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import psutil
import pytest
from brokers import skip_or_fail
from server import Server, accepted_id, submit, wait_for

PAGE = 4096  # tmpfs counts space in pages
SMALL_DISK = "2m"
PRUNE = {"sparsity": 0.5}


def _private_mounts() -> list[str]:
    """A mount namespace of the server's own, so a tmpfs mounted there needs no cleanup on the
    host and leaks nowhere; unprivileged, a user namespace first makes mounting allowed."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", "--mount", "--propagation", "private", *user]


@pytest.fixture
def small_disk(tmp_path, make_server) -> tuple[Server, Path]:
    """A service whose artifact store (DATA_DIR/jobs) is a tmpfs of SMALL_DISK, with its
    database on the real disk beside it; and the store's directory as the test sees it (through
    /proc/PID/root, since the mount exists only in the server's namespace)."""
    data_dir = tmp_path / "data"
    store = data_dir / "jobs"
    store.mkdir(parents=True)
    mount = f'mount -t tmpfs -o size={SMALL_DISK} clipprune-test "$0" && exec "$@"'
    if shutil.which("unshare") is None:
        skip_or_fail("no unshare(1) here to give the server a small disk of its own")
    probe = subprocess.run(
        [*_private_mounts(), "sh", "-c", mount, str(store), "true"], capture_output=True
    )
    if probe.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs in a namespace here: {probe.stderr.decode().strip()}")
    server = make_server(data_dir, wrap=[*_private_mounts(), "sh", "-c", mount, str(store)])
    return server, Path(f"/proc/{server.process.pid}/root{store}")


def _free(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _fill(store: Path, leave: int) -> Path:
    """Fill the store's disk until `leave` bytes are free; the filler file is returned."""
    filler = store / "filler"
    with filler.open("ab") as out:
        out.write(b"\0" * (_free(store) - leave))
    assert _free(store) == leave
    return filler


def _pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


def test_a_full_disk_fails_the_job_saying_so_and_serves_no_partial_model(
    small_disk, mlp_classifier
):
    server, store = small_disk
    model = mlp_classifier.SerializeToString()
    # Room for the upload and two pages more: the job's result (as large as the model; dense
    # keeps every weight) gets two pages written, then the disk is full.
    filler = _fill(store, _pages(len(model)) + 2 * PAGE)
    with server.client() as client:
        job = submit(client, "prune", {"model": model}, PRUNE, wait=30).json()
        assert job["status"] == "failed", job
        assert job["error"]["status"] == 507 and job["error"]["title"] == "Insufficient storage"
        assert "disk" in job["error"]["detail"] and "full" in job["error"]["detail"]
        for result in ("model", "report", "report.html"):
            refused = client.get(f"/v1/jobs/{job['id']}/{result}")
            assert refused.status_code == 410, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
        # Nothing but the upload is left: no result under its name, no half-written one
        # holding on to the space a full disk needs back.
        assert sorted(p.name for p in (store / job["id"]).iterdir()) == ["input"]

        # Full to the last page: a submit cannot even store its upload.
        _fill(store, 0)
        refused = submit(client, "prune", {"model": model}, PRUNE, wait=30)
        assert refused.status_code == 507, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert "full" in refused.json()["detail"]
        assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [job["id"]]
        assert sorted(p.name for p in store.iterdir()) == sorted(["filler", job["id"]])
        assert client.get("/livez").status_code == 200

        filler.unlink()  # space is back: the service carries on
        later = submit(client, "prune", {"model": model}, PRUNE, wait=30).json()
        assert later["status"] == "succeeded", later
        download = client.get(later["links"]["model"])
        assert download.status_code == 200
        ort.InferenceSession(download.content, providers=["CPUExecutionProvider"])
        assert client.get("/readyz").status_code == 200


def _statuses(data_dir: Path) -> dict[str, tuple[str, int]]:
    """Every job row as the database holds it: id -> (status, attempts)."""
    with sqlite3.connect(data_dir / "clipprune.db") as db:
        rows = db.execute("SELECT id, status, attempts FROM clipprune_jobs").fetchall()
    return {job_id: (status, attempts) for job_id, status, attempts in rows}


def _until_some_run_and_some_wait(data_dir: Path) -> dict[str, tuple[str, int]]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = _statuses(data_dir)
        if {"running", "queued"} <= {status for status, _ in rows.values()}:
            return rows
        time.sleep(0.02)
    raise AssertionError(f"never saw jobs running and queued at once: {rows}")


def _count(rows: dict[str, tuple[str, int]], status: str) -> int:
    return sum(s == status for s, _ in rows.values())


def test_restart_and_crash_with_jobs_queued_lose_none(make_server, tmp_path, digits_csv):
    """Six jobs on two workers: a graceful restart while some run and the rest wait, then a
    crash while some run and some wait. Every job ends succeeded: none lost, none left
    queued or running, and a job a graceful stop put back still has its retry for a crash
    (README: on a graceful stop running jobs run again; after a crash they are retried once)."""
    data_dir = tmp_path / "data"
    params = {"model": {"hidden": [64]}, "epochs": 15}
    server = make_server(data_dir)
    with server.client() as client:
        upload = {"train_data": digits_csv}
        ids = [submit(client, "train", upload, params).json()["id"] for _ in range(6)]
    at_stop = _until_some_run_and_some_wait(data_dir)
    server.stop()
    after_stop = _statuses(data_dir)
    assert set(after_stop) == set(ids)
    assert {s for s, _ in after_stop.values()} <= {"queued", "succeeded"}, after_stop

    server = make_server(data_dir)
    _until_some_run_and_some_wait(data_dir)
    server.process.send_signal(signal.SIGKILL)  # no graceful shutdown: the service just dies
    server.process.wait()
    at_crash = _statuses(data_dir)

    server = make_server(data_dir)
    with server.client() as client:
        ended = {job_id: wait_for(client, job_id, timeout=120) for job_id in ids}
        print(
            f"\nat the stop {_count(at_stop, 'running')} running, "
            f"{_count(at_stop, 'queued')} queued; at the crash "
            f"{_count(at_crash, 'running')} running, {_count(at_crash, 'queued')} queued"
        )
        for job_id, job in ended.items():
            assert job["status"] == "succeeded", (at_crash[job_id], job)
            model = client.get(job["links"]["model"])
            assert model.status_code == 200
            ort.InferenceSession(model.content, providers=["CPUExecutionProvider"])
        listed = [j["id"] for j in client.get("/v1/jobs").json()["items"]]
        assert sorted(listed) == sorted(ids)


LONG_TRAIN = {"model": {"hidden": [1024, 1024]}, "epochs": 10_000}  # runs until stopped


def _gone(process: psutil.Process) -> bool:
    """Exited: a zombie counts (a worker whose forkserver died is re-parented, and who reaps
    it then is up to the machine's init)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.05)


def _kill_the_forkserver(server: Server, job_id: str) -> list[psutil.Process]:
    """SIGKILL the forkserver that forked the worker running `job_id` (the workers' parent);
    the workers it forked are returned."""
    workers = server.job_processes()
    running = server.job_process(job_id)
    assert running in workers
    running.parent().kill()
    return workers


def _attempts(data_dir: Path, job_id: str) -> int:
    with sqlite3.connect(data_dir / "clipprune.db") as db:
        (attempts,) = db.execute(
            "SELECT attempts FROM clipprune_jobs WHERE id = ?", (job_id,)
        ).fetchone()
    return attempts


def _a_normal_job_succeeds(server: Server, upload: dict[str, bytes]) -> None:
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
        job = submit(client, "prune", upload, PRUNE, wait=30).json()
        assert job["status"] == "succeeded", job
    assert len(server.job_processes()) == 2


def test_a_dead_forkserver_takes_its_workers_along_and_the_job_runs_again(
    make_server, tmp_path, digits_csv, digits_upload
):
    """Issue 14: the job of a worker whose forkserver died is a lost worker's (requeued once),
    not a failure of its own; the workers die with their forkserver, not minutes later."""
    server = make_server()
    with server.client() as client:
        params = {"model": {"hidden": [64]}, "epochs": 200}
        job_id = accepted_id(submit(client, "train", {"train_data": digits_csv}, params))
        wait_for(client, job_id, {"running"})
        old = _kill_the_forkserver(server, job_id)
        _until(lambda: all(_gone(worker) for worker in old), "every old worker gone", 10)
        job = wait_for(client, job_id)
        assert job["status"] == "succeeded", job
        assert _attempts(tmp_path / "data", job_id) == 2
        assert client.get(job["links"]["model"]).status_code == 200
    assert not set(server.job_processes()) & set(old)
    _a_normal_job_succeeds(server, digits_upload)


def test_a_job_whose_forkserver_dies_twice_fails_saying_so_and_gets_no_model(
    make_server, tmp_path, digits_csv, digits_upload
):
    server = make_server()
    with server.client() as client:
        job_id = accepted_id(submit(client, "train", {"train_data": digits_csv}, LONG_TRAIN))
        wait_for(client, job_id, {"running"})
        old = _kill_the_forkserver(server, job_id)
        _until(lambda: _attempts(tmp_path / "data", job_id) == 2, "the job claimed again")
        old += _kill_the_forkserver(server, job_id)
        _until(lambda: all(_gone(worker) for worker in old), "every old worker gone", 10)
        job = wait_for(client, job_id)
        assert job["status"] == "failed", job
        assert job["error"]["title"] == "Worker lost", job["error"]
        assert "forkserver process died" in job["error"]["detail"], job["error"]
    # Every process that ran the job has exited: nothing can write its model any more.
    assert not (tmp_path / "data" / "jobs" / job_id / "model.onnx").exists()
    _a_normal_job_succeeds(server, digits_upload)
