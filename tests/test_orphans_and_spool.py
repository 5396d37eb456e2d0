"""Issue 14, Deliver 6: what is left on disk. Job directories whose job is gone are removed
at start."""

from datetime import timedelta
from pathlib import Path

from server import submit
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
