"""What an attempt writes on its way to a job's result (candidate directories, the staged
model) does not outlive the job: a run removes what a dead attempt left, a job that ends, failed
or succeeded, leaves none (also when the service ends it: a killed worker, the job time limit),
and a run whose claim lapsed leaves the live run's files alone."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from server import accepted_id, submit, wait_for

from service.runner import run_job
from service.store import JobStore, new_job_id
from workers.jobs import INPUT_DIR, MODEL_IN, MODEL_OUT, REPORT_OUT
from workers.jobs.files import ATTEMPT_PREFIX


def attempt_files(job_dir: Path) -> list[str]:
    return sorted(path.name for path in job_dir.iterdir() if path.name.startswith("."))


def job(tmp_path: Path, model: bytes, params: dict, eval_data=None) -> tuple[JobStore, str, Path]:
    """A queued prune job in a real SQLite store, its files staged as the service stages them,
    with what a worker killed mid-job left beside them."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job_id = new_job_id()
    store.create(job_id, "owner", "prune", params)
    job_dir = tmp_path / job_id
    (job_dir / INPUT_DIR).mkdir(parents=True)
    (job_dir / INPUT_DIR / MODEL_IN).write_bytes(model)
    if eval_data is not None:
        np.savez(job_dir / "eval.npz", X=eval_data[0], y=eval_data[1])
        (job_dir / "eval.npz").rename(job_dir / INPUT_DIR / "eval_data")
    dead = job_dir / f"{ATTEMPT_PREFIX}dead"
    dead.mkdir()
    (dead / "candidate-3.int8.onnx").write_bytes(b"half a file")
    (dead / "model.onnx").write_bytes(b"a dead attempt's staged model")
    return store, job_id, job_dir


def test_a_job_that_succeeds_leaves_no_attempt_files(tmp_path, digits_300_100):
    model, _, held_out = digits_300_100
    store, job_id, job_dir = job(
        tmp_path, model.SerializeToString(), {"max_accuracy_drop": 0.02}, held_out
    )
    assert run_job(store, job_dir, job_id, heartbeat_s=60) == "succeeded"
    assert attempt_files(job_dir) == [] and (job_dir / MODEL_OUT).stat().st_size > 0


def test_a_job_that_fails_leaves_no_attempt_files(tmp_path):
    store, job_id, job_dir = job(tmp_path, b"not an onnx model", {"sparsity": 0.5})
    assert run_job(store, job_dir, job_id, heartbeat_s=60) == "failed"
    row = store.get(job_id)
    assert row is not None and row.error is not None and row.error["status"] == 422
    assert attempt_files(job_dir) == []


def test_a_run_whose_claim_lapsed_leaves_the_live_runs_files(tmp_path, digits_300_100):
    """A lease that lapsed while its worker lived: another run claims the job and works in its
    own directory; the first run stops at its next progress report, publishes nothing, and its
    end does not remove the other's files."""
    model, _, held_out = digits_300_100
    store, job_id, job_dir = job(
        tmp_path, model.SerializeToString(), {"max_accuracy_drop": 0.02}, held_out
    )
    ended: list[str] = []
    first = threading.Thread(target=lambda: ended.append(run_job(store, job_dir, job_id, 60)))
    first.start()
    deadline = time.monotonic() + 60
    while (row := store.get(job_id)) is not None and not row.stage.startswith("candidate"):
        assert time.monotonic() < deadline, row.stage
        time.sleep(0.01)
    assert attempt_files(job_dir) != [] and not (job_dir / f"{ATTEMPT_PREFIX}dead").exists()
    assert store.requeue(job_id) and store.claim(job_id, "the live run")
    live = job_dir / f"{ATTEMPT_PREFIX}live"
    live.mkdir()
    (live / "model.onnx").write_bytes(b"the live run's staged model")
    first.join(timeout=120)
    # neither its directory nor its staged model (which it puts in place when it reports) taken
    assert ended == ["superseded"] and (live / "model.onnx").exists()
    # and it stopped at its next progress report: no result of its own published
    assert not (job_dir / MODEL_OUT).exists() and not (job_dir / REPORT_OUT).exists()


# A search long enough to be caught mid-way: fine-tuning every candidate for 300 epochs.
LONG_SEARCH = {"max_accuracy_drop": 0.001, "fine_tune": {"epochs": 300, "patience": None}}


def attempt_files_gone(job_dir: Path) -> bool:
    """Whoever ends a job writes its row first, then removes the files (removing them first
    could take a live run's, were the failure refused): wait a moment for the second step."""
    deadline = time.monotonic() + 30
    while list(job_dir.glob(".*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not list(job_dir.glob(".*"))


@pytest.mark.parametrize("ending", ["killed worker", "job time limit"])
def test_a_job_the_service_ends_leaves_no_attempt_files(
    make_server, digits_upload, digits_csv, ending
) -> None:
    settings = {"job_timeout_s": 15} if ending == "job time limit" else {}
    server = make_server(**settings)
    with server.client() as client:
        files = {**digits_upload, "train_data": digits_csv}
        job_id = accepted_id(submit(client, "prune", files, LONG_SEARCH))
        job = wait_for(client, job_id, {"running"})
        job_dir = server.data_dir / "jobs" / job_id
        while not job["stage"].startswith("candidate 2"):
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "running", job
            time.sleep(0.02)
        assert list(job_dir.glob(f"{ATTEMPT_PREFIX}*/*.onnx"))
        if ending == "killed worker":
            server.job_process(job_id).kill()  # as the kernel's out-of-memory killer does
        job = wait_for(client, job_id)
    expected = {"killed worker": "Worker process died", "job time limit": "Job time limit"}
    assert job["status"] == "failed" and job["error"]["title"] == expected[ending], job
    assert attempt_files_gone(job_dir)
