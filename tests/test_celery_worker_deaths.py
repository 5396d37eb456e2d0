"""A Celery pool child that dies is reported as the embedded pool reports its workers: one that
native code aborted (SIGABRT, as an uncaught std::bad_alloc ends) fails its job naming the
memory limit, rather than running it again, and is replaced. Real Redis, PostgreSQL and
`clipprune worker`, as in test_celery."""

import signal

from brokers import drop_prefix, start_worker
from server import accepted_id, submit, wait_for
from test_memory_limit import LIMIT, celery_settings

LONG_TRAIN = {"model": {"hidden": [64]}, "epochs": 10_000}  # runs until stopped


def test_a_child_aborted_by_native_code_fails_its_job_naming_the_limit(
    tmp_path, postgres_url, make_server, digits_csv, digits_upload
):
    settings = celery_settings(tmp_path, postgres_url)
    server = make_server(tmp_path / "data", **settings)
    worker = start_worker(tmp_path / "data", 1, **settings)
    try:
        with server.client() as client:
            job_id = accepted_id(submit(client, "train", {"train_data": digits_csv}, LONG_TRAIN))
            wait_for(client, job_id, {"running"})
            (child,) = worker.pool()
            child.send_signal(signal.SIGABRT)
            failed = wait_for(client, job_id, timeout=60)
            assert failed["status"] == "failed", failed
            error = failed["error"]
            assert error["title"] == "Out of memory", error
            assert "SIGABRT" in error["detail"], error
            assert "CLIPPRUNE_WORKER_MEMORY_BYTES" in error["detail"], error
            assert str(LIMIT) in error["detail"], error
            normal = submit(client, "prune", digits_upload, {"sparsity": 0.5}, wait=60).json()
            assert normal["status"] == "succeeded", normal
            assert wait_for(client, job_id)["status"] == "failed"  # never run again
        assert len(worker.pool()) == 1 and child not in worker.pool()
    finally:
        worker.stop()
        drop_prefix(settings["broker_url"], settings["broker_prefix"])
