"""The service under the conditions production brings: keys, killed workers, restarts, load,
oversized uploads, time limits and a full queue."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
from server import start_server, wait_for

LONG_TRAIN = {"model": {"hidden": [1024, 1024]}, "epochs": 10000}


@pytest.fixture(scope="module")
def digits_csv(digits) -> bytes:
    features, labels = digits
    rows = "\n".join(",".join(f"{v:g}" for v in row) for row in np.c_[features, labels])
    return (",".join([f"p{i}" for i in range(64)] + ["digit"]) + "\n" + rows).encode()


def submit_prune(
    client: httpx.Client, model: bytes, params: dict, wait: float = 0
) -> httpx.Response:
    return client.post(
        "/v1/jobs/prune",
        params={"wait": wait},
        files={"model": ("model.onnx", model)},
        data={"params": json.dumps(params)},
    )


def submit_train(client: httpx.Client, data: bytes, params: dict) -> httpx.Response:
    return client.post(
        "/v1/jobs/train", files={"train_data": ("d.csv", data)}, data={"params": json.dumps(params)}
    )


def test_each_key_sees_only_its_own_jobs(tmp_path, mlp_classifier):
    server = start_server(tmp_path / "data", api_keys="key-a,key-b")
    try:
        with server.client("key-a") as a, server.client("key-b") as b, server.client() as anonymous:
            job = submit_prune(
                a, mlp_classifier.SerializeToString(), {"sparsity": 0.5}, wait=30
            ).json()
            assert job["status"] == "succeeded"
            for path in (job["links"]["self"], job["links"]["model"], job["links"]["report"]):
                assert a.get(path).status_code == 200
                assert b.get(path).status_code == 404
                unauthorized = anonymous.get(path)
                assert unauthorized.status_code == 401
                assert unauthorized.headers["content-type"] == "application/problem+json"
            assert b.delete(job["links"]["self"]).status_code == 404
            assert [j["id"] for j in a.get("/v1/jobs").json()["items"]] == [job["id"]]
            assert b.get("/v1/jobs").json()["items"] == []
            with server.client("key-c") as wrong:
                assert wrong.get("/v1/jobs").status_code == 401
            assert anonymous.post("/v1/jobs/prune", files={"model": ("m", b"x")}).status_code == 401
            assert anonymous.get("/livez").status_code == 200  # probes need no key
    finally:
        server.stop()


def test_a_killed_worker_fails_its_job_and_the_next_job_succeeds(
    tmp_path, digits_csv, mlp_classifier
):
    server = start_server(tmp_path / "data")
    try:
        with server.client() as client:
            job = submit_train(client, digits_csv, LONG_TRAIN).json()
            wait_for(client, job["id"], {"running"})
            worker = server.job_process(job["id"])
            worker.kill()
            failed = wait_for(client, job["id"])
            assert failed["status"] == "failed"
            assert "killed by SIGKILL" in failed["error"]["detail"]
            assert failed["error"]["title"] == "Worker process died"
            after = submit_prune(
                client, mlp_classifier.SerializeToString(), {"sparsity": 0.5}, wait=30
            )
            assert after.json()["status"] == "succeeded"
    finally:
        server.stop()


def test_cancel_stops_a_running_job(tmp_path, digits_csv):
    server = start_server(tmp_path / "data")
    try:
        with server.client() as client:
            job = submit_train(client, digits_csv, LONG_TRAIN).json()
            wait_for(client, job["id"], {"running"})
            worker = server.job_process(job["id"])
            assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
            worker.wait(10)
            assert not worker.is_running()
            assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    finally:
        server.stop()


def test_jobs_past_the_time_limit_fail_saying_so(tmp_path, digits_csv):
    server = start_server(tmp_path / "data", job_timeout_s=1)
    try:
        with server.client() as client:
            job = wait_for(client, submit_train(client, digits_csv, LONG_TRAIN).json()["id"])
            assert job["status"] == "failed" and job["error"]["title"] == "Job time limit"
            assert "longer than 1 s" in job["error"]["detail"]
    finally:
        server.stop()


def test_a_full_queue_answers_429_with_retry_after(tmp_path, digits_csv):
    server = start_server(tmp_path / "data", workers=1, max_queued_jobs=1)
    try:
        with server.client() as client:
            running = submit_train(client, digits_csv, LONG_TRAIN).json()
            wait_for(client, running["id"], {"running"})
            assert submit_train(client, digits_csv, LONG_TRAIN).status_code == 202
            refused = submit_train(client, digits_csv, LONG_TRAIN)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
            assert refused.headers["content-type"] == "application/problem+json"
    finally:
        server.stop()


def test_finished_jobs_survive_a_restart(tmp_path, mlp_classifier):
    data_dir = tmp_path / "data"
    server = start_server(data_dir)
    with server.client() as client:
        job = submit_prune(
            client, mlp_classifier.SerializeToString(), {"sparsity": 0.5}, wait=30
        ).json()
        model = client.get(job["links"]["model"]).content
    server.stop()
    server = start_server(data_dir)
    try:
        with server.client() as client:
            assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [job["id"]]
            assert client.get(job["links"]["self"]).json()["status"] == "succeeded"
            assert client.get(job["links"]["model"]).content == model
    finally:
        server.stop()


def test_a_job_running_at_shutdown_runs_again_after_restart(tmp_path, digits_csv):
    data_dir = tmp_path / "data"
    server = start_server(data_dir)
    with server.client() as client:
        params = {"model": {"hidden": [64]}, "epochs": 200}
        job = submit_train(client, digits_csv, params).json()
        wait_for(client, job["id"], {"running"})
    server.stop()
    assert_succeeds_after_restart(data_dir, job["id"])


def assert_succeeds_after_restart(data_dir, job_id: str) -> None:
    server = start_server(data_dir)
    try:
        with server.client() as client:
            assert wait_for(client, job_id)["status"] == "succeeded"
    finally:
        server.stop()


def test_fifty_jobs_from_ten_clients_all_succeed_once(tmp_path, mlp_classifier):
    server = start_server(tmp_path / "data")
    model = mlp_classifier.SerializeToString()

    def client_run(index: int) -> list[str]:
        with server.client() as client:
            return [
                submit_prune(client, model, {"sparsity": 0.1 * (j % 9)}).json()["id"]
                for j in range(5)
            ]

    try:
        with ThreadPoolExecutor(10) as pool:
            ids = [job_id for batch in pool.map(client_run, range(10)) for job_id in batch]
        assert len(ids) == len(set(ids)) == 50
        with server.client() as client:
            finished = [wait_for(client, job_id, timeout=300) for job_id in ids]
            assert all(job["status"] == "succeeded" for job in finished)
            listed, url = [], "/v1/jobs?limit=100"
            while url:
                page = client.get(url).json()
                listed += [job["id"] for job in page["items"]]
                url = page["next"]
            assert sorted(listed) == sorted(ids)
            # the counter moves when the dispatcher reaps the finished process, a tick later
            expected = 'clipprune_jobs_total{kind="prune",status="succeeded"} 50.0'
            deadline = time.monotonic() + 10
            while expected not in client.get("/metrics").text and time.monotonic() < deadline:
                time.sleep(0.1)
            assert expected in client.get("/metrics").text
    finally:
        server.stop()


def test_an_upload_over_the_limit_gets_413_and_memory_stays_flat(tmp_path):
    server = start_server(tmp_path / "data", max_upload_bytes=2**20)
    try:
        process = psutil.Process(server.process.pid)
        with server.client() as client:
            client.get("/readyz")
            before = process.memory_info().rss
            boundary = "clipprune-boundary"
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="model"; '
                'filename="big.onnx"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            tail = f"\r\n--{boundary}--\r\n".encode()
            chunk = b"\0" * 2**20

            def body():  # a valid multipart upload of 256 MiB, streamed without Content-Length
                yield head
                for _ in range(256):
                    yield chunk
                yield tail

            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            chunked = client.post("/v1/jobs/prune", content=body(), headers=headers)
            sized_body = head + b"\0" * (64 * 2**20) + tail
            sized = client.post("/v1/jobs/prune", content=sized_body, headers=headers)
            after = process.memory_info().rss
        for response in (chunked, sized):
            assert response.status_code == 413
            assert response.headers["content-type"] == "application/problem+json"
            assert "CLIPPRUNE_MAX_UPLOAD_BYTES" in response.json()["detail"]
        assert after - before < 32 * 2**20, f"RSS grew by {(after - before) / 2**20:.0f} MiB"
        assert not list((tmp_path / "data" / "jobs").iterdir())
    finally:
        server.stop()


def test_the_service_runs_on_postgresql(tmp_path, postgres_url, mlp_classifier):
    server = start_server(tmp_path / "data", database_url=postgres_url)
    try:
        with server.client() as client:
            model = mlp_classifier.SerializeToString()
            job = submit_prune(client, model, {"sparsity": 0.5}, wait=30).json()
            assert job["status"] == "succeeded"
            assert client.get("/readyz").json()["checks"]["database"] == "ok"
            assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [job["id"]]
    finally:
        server.stop()


def test_after_a_crash_running_jobs_are_retried_and_workers_do_not_linger(tmp_path, digits_csv):
    data_dir = tmp_path / "data"
    server = start_server(data_dir)
    with server.client() as client:
        job = submit_train(client, digits_csv, {"model": {"hidden": [64]}, "epochs": 300}).json()
        wait_for(client, job["id"], {"running"})
    workers = server.job_processes()
    assert workers
    server.process.kill()  # no graceful shutdown: the service just dies
    server.process.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "job processes outlived their service"
    assert_succeeds_after_restart(data_dir, job["id"])


def test_finished_jobs_expire_with_their_files(tmp_path, mlp_classifier):
    data_dir = tmp_path / "data"
    server = start_server(data_dir, job_ttl_s=0.5)
    with server.client() as client:
        job = submit_prune(client, mlp_classifier.SerializeToString(), {"sparsity": 0.5}, wait=30)
        job_id = job.json()["id"]
    server.stop()
    time.sleep(1)
    server = start_server(data_dir, job_ttl_s=0.5)  # expiry runs at start, then every 5 minutes
    try:
        with server.client() as client:
            deadline = time.monotonic() + 10
            while client.get(f"/v1/jobs/{job_id}").status_code != 404:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert not (data_dir / "jobs" / job_id).exists()
    finally:
        server.stop()
