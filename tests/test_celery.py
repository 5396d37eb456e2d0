"""The Celery backend against a real Redis, a real PostgreSQL and real `celery worker`s."""

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import redis
from brokers import any_redis, drop_prefix, own_redis, prefix, start_worker
from server import accepted_id, submit, wait_for

FAST_LEASE = {"heartbeat_s": 0.5, "worker_lease_s": 3}


@pytest.fixture
def deployment(tmp_path, postgres_url, make_server):
    """API + one worker sharing a data directory, PostgreSQL and Redis: a compose stack in
    miniature. Returns a function that starts it with the given broker and settings."""
    cleanups: list[Callable[[], None]] = []

    def start(redis_url: str, concurrency: int = 2, **extra):
        key_prefix = prefix()
        settings = {
            "backend": "celery",
            "broker_url": redis_url,
            "broker_prefix": key_prefix,
            "database_url": postgres_url,
            **FAST_LEASE,
            **extra,
        }
        data_dir = tmp_path / "data"
        cleanups.append(lambda: drop_prefix(redis_url, key_prefix))
        server = make_server(data_dir, **settings)
        cleanups.append(server.stop)
        worker = start_worker(data_dir, concurrency, **settings)
        cleanups.append(worker.stop)
        return server, worker

    yield start
    for cleanup in reversed(cleanups):
        with contextlib.suppress(redis.RedisError):  # a broker a test stopped has no keys left
            cleanup()


def test_jobs_run_on_celery_workers(tmp_path, deployment, mlp_classifier, digits_csv):
    server, worker = deployment(any_redis(tmp_path).url)
    worker_env = {f"CLIPPRUNE_{key.upper()}": value for key, value in worker.settings.items()}
    with server.client() as client:
        model = {"model": mlp_classifier.SerializeToString()}
        prune_id = accepted_id(submit(client, "prune", model, {"sparsity": 0.5}))
        params = {"model": {"hidden": [16]}, "epochs": 3}
        train_id = accepted_id(submit(client, "train", {"train_data": digits_csv}, params))
        for job_id in (prune_id, train_id):
            job = wait_for(client, job_id)
            assert job["status"] == "succeeded", job["error"]
            assert client.get(job["links"]["model"]).status_code == 200
        assert client.get("/readyz").json()["checks"]["workers"] == "ok"
    ping = subprocess.run(
        [sys.executable, "-m", "service.cli", "ping-worker"],
        env={**os.environ, **worker_env},
        capture_output=True,
        timeout=60,
    )
    assert ping.returncode == 0, ping.stderr


def test_a_worker_killed_mid_job_never_leaves_it_running(tmp_path, deployment, digits_csv):
    server, worker = deployment(any_redis(tmp_path).url, concurrency=1)
    with server.client() as client:
        params = {"model": {"hidden": [256, 256]}, "epochs": 60}
        job_id = accepted_id(submit(client, "train", {"train_data": digits_csv}, params))
        wait_for(client, job_id, {"running"})
        (child,) = worker.pool()
        child.kill()
        job = wait_for(client, job_id, timeout=180)
        # delivered again once the lease ran out, and run to the end by the respawned child
        assert job["status"] == "succeeded", job["error"]


def test_restarting_redis_mid_queue_loses_no_job(tmp_path, deployment, digits_csv):
    broker = own_redis(tmp_path)
    try:
        server, _ = deployment(broker.url, concurrency=1)
        with server.client() as client:
            params = {"model": {"hidden": [64]}, "epochs": 15}
            upload = {"train_data": digits_csv}
            ids = [accepted_id(submit(client, "train", upload, params)) for _ in range(4)]
            wait_for(client, ids[0], {"running", "succeeded"})
            broker.stop()  # Redis keeps nothing on disk: the queued messages are gone
            ids.append(accepted_id(submit(client, "train", upload, params)))  # broker down
            time.sleep(1)
            broker.start()
            jobs = [wait_for(client, job_id, timeout=240) for job_id in ids]
            assert [job["status"] for job in jobs] == ["succeeded"] * 5, [j["error"] for j in jobs]
    finally:
        broker.stop()
