"""Faults a real deployment meets that test_service_resilience does not bring: the artifact store's
disk filling up (a real, small tmpfs, not a simulated error), and restarts and crashes with
jobs waiting in the queue behind the running ones."""

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import onnxruntime as ort
import pytest
from brokers import skip_or_fail
from server import Server, submit, wait_for

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
        for link in ("model", "report", "report_html"):
            refused = client.get(job["links"][link])
            assert refused.status_code == 409, refused.text
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
