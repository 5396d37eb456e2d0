"""The service under the conditions production brings: keys, killed workers, restarts, load,
oversized uploads, time limits and a full queue. Each test starts the servers it needs
(make_server), since most stop, kill or restart them."""

import time
from concurrent.futures import ThreadPoolExecutor

import psutil
from server import metrics_with, submit, wait_for

LONG_TRAIN = {"model": {"hidden": [1024, 1024]}, "epochs": 10000}


def test_each_key_sees_only_its_own_jobs(make_server, mlp_classifier):
    server = make_server(api_keys="key-a,key-b")
    with server.client("key-a") as a, server.client("key-b") as b, server.client() as anonymous:
        model = {"model": mlp_classifier.SerializeToString()}
        job = submit(a, "prune", model, {"sparsity": 0.5}, wait=30).json()
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
        assert submit(anonymous, "prune", {"model": b"x"}).status_code == 401
        assert anonymous.get("/livez").status_code == 200  # probes need no key


def test_a_killed_worker_fails_its_job_and_the_next_job_succeeds(
    make_server, digits_csv, mlp_classifier
):
    server = make_server()
    with server.client() as client:
        job = submit(client, "train", {"train_data": digits_csv}, LONG_TRAIN).json()
        wait_for(client, job["id"], {"running"})
        worker = server.job_process(job["id"])
        worker.kill()
        failed = wait_for(client, job["id"])
        assert failed["status"] == "failed"
        assert "killed by SIGKILL" in failed["error"]["detail"]
        assert failed["error"]["title"] == "Worker process died"
        model = {"model": mlp_classifier.SerializeToString()}
        after = submit(client, "prune", model, {"sparsity": 0.5}, wait=30)
        assert after.json()["status"] == "succeeded"


def test_cancel_stops_a_running_job(make_server, digits_csv):
    server = make_server()
    with server.client() as client:
        job = submit(client, "train", {"train_data": digits_csv}, LONG_TRAIN).json()
        wait_for(client, job["id"], {"running"})
        worker = server.job_process(job["id"])
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        worker.wait(10)
        assert not worker.is_running()
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404


def test_jobs_past_the_time_limit_fail_saying_so(make_server, digits_csv):
    server = make_server(job_timeout_s=1)
    with server.client() as client:
        submitted = submit(client, "train", {"train_data": digits_csv}, LONG_TRAIN)
        job = wait_for(client, submitted.json()["id"])
        assert job["status"] == "failed" and job["error"]["title"] == "Job time limit"
        assert "longer than 1 s" in job["error"]["detail"]


def test_a_full_queue_answers_429_with_retry_after(make_server, digits_csv):
    server = make_server(workers=1, max_queued_jobs=1)
    upload = {"train_data": digits_csv}
    with server.client() as client:
        running = submit(client, "train", upload, LONG_TRAIN).json()
        wait_for(client, running["id"], {"running"})
        assert submit(client, "train", upload, LONG_TRAIN).status_code == 202
        refused = submit(client, "train", upload, LONG_TRAIN)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert refused.headers["content-type"] == "application/problem+json"


def test_finished_jobs_survive_a_restart(make_server, tmp_path, mlp_classifier):
    data_dir = tmp_path / "data"
    server = make_server(data_dir)
    with server.client() as client:
        upload = {"model": mlp_classifier.SerializeToString()}
        job = submit(client, "prune", upload, {"sparsity": 0.5}, wait=30).json()
        model = client.get(job["links"]["model"]).content
    server.stop()
    server = make_server(data_dir)
    with server.client() as client:
        assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [job["id"]]
        assert client.get(job["links"]["self"]).json()["status"] == "succeeded"
        assert client.get(job["links"]["model"]).content == model


def test_a_job_running_at_shutdown_runs_again_after_restart(make_server, tmp_path, digits_csv):
    data_dir = tmp_path / "data"
    server = make_server(data_dir)
    with server.client() as client:
        params = {"model": {"hidden": [64]}, "epochs": 200}
        job = submit(client, "train", {"train_data": digits_csv}, params).json()
        wait_for(client, job["id"], {"running"})
    server.stop()
    assert_succeeds_after_restart(make_server(data_dir), job["id"])


def assert_succeeds_after_restart(server, job_id: str) -> None:
    with server.client() as client:
        assert wait_for(client, job_id)["status"] == "succeeded"


def test_fifty_jobs_from_ten_clients_all_succeed_once(make_server, mlp_classifier):
    server = make_server()
    model = {"model": mlp_classifier.SerializeToString()}

    def client_run(index: int) -> list[str]:
        with server.client() as client:
            return [
                submit(client, "prune", model, {"sparsity": 0.1 * (j % 9)}).json()["id"]
                for j in range(5)
            ]

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
        assert expected in metrics_with(client, expected)


def test_an_upload_over_the_limit_gets_413_and_memory_stays_flat(make_server, tmp_path):
    server = make_server(max_upload_bytes=2**20)
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


def test_the_service_runs_on_postgresql(make_server, postgres_url, mlp_classifier):
    server = make_server(database_url=postgres_url)
    with server.client() as client:
        model = {"model": mlp_classifier.SerializeToString()}
        job = submit(client, "prune", model, {"sparsity": 0.5}, wait=30).json()
        assert job["status"] == "succeeded"
        assert client.get("/readyz").json()["checks"]["database"] == "ok"
        assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [job["id"]]


def test_after_a_crash_running_jobs_are_retried_and_workers_do_not_linger(
    make_server, tmp_path, digits_csv
):
    data_dir = tmp_path / "data"
    server = make_server(data_dir)
    with server.client() as client:
        params = {"model": {"hidden": [64]}, "epochs": 300}
        job = submit(client, "train", {"train_data": digits_csv}, params).json()
        wait_for(client, job["id"], {"running"})
    workers = server.job_processes()
    assert workers
    server.process.kill()  # no graceful shutdown: the service just dies
    server.process.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "job processes outlived their service"
    assert_succeeds_after_restart(make_server(data_dir), job["id"])


def test_finished_jobs_expire_with_their_files(make_server, tmp_path, mlp_classifier):
    data_dir = tmp_path / "data"
    server = make_server(data_dir, job_ttl_s=0.5)
    with server.client() as client:
        model = {"model": mlp_classifier.SerializeToString()}
        job = submit(client, "prune", model, {"sparsity": 0.5}, wait=30)
        job_id = job.json()["id"]
    server.stop()
    time.sleep(1)
    server = make_server(data_dir, job_ttl_s=0.5)  # expiry runs at start, then every 5 minutes
    with server.client() as client:
        deadline = time.monotonic() + 10
        while client.get(f"/v1/jobs/{job_id}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert not (data_dir / "jobs" / job_id).exists()
