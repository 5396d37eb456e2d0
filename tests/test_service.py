"""The REST service through a real uvicorn process: jobs, waiting, problems, files, docs."""

import hashlib
import io
import json
import statistics
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from server import metrics_with, submit, wait_for

LONG_TRAIN = {"model": {"hidden": [1024, 1024]}, "epochs": 10000}  # runs until deleted


def test_prune_job_end_to_end_with_numbers_rechecked(client, digits_upload, digits):
    response = submit(client, "prune", digits_upload, {"sparsity": 0.5})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}" == job["links"]["self"]
    assert job["status"] in {"queued", "running", "succeeded"} and job["kind"] == "prune"
    job = wait_for(client, job["id"])
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["error"] is None
    assert job["started_at"] <= job["finished_at"]

    model = client.get(job["links"]["model"])
    assert model.status_code == 200 and model.headers["content-type"] == "application/octet-stream"
    assert f"clipprune-{job['id']}.onnx" in model.headers["content-disposition"]
    digest = hashlib.sha256(model.content).hexdigest()
    assert model.headers["etag"] == f'"{digest}"'
    assert (
        client.get(job["links"]["model"], headers={"If-None-Match": f'"{digest}"'}).status_code
        == 304
    )

    report = client.get(job["links"]["report"]).json()
    features, labels = digits
    session = ort.InferenceSession(model.content, providers=["CPUExecutionProvider"])
    predicted = session.run(None, {"X": features[1200:]})[0]
    assert report["accuracy"]["compressed"] == pytest.approx(np.mean(predicted == labels[1200:]))
    assert report["size"]["compressed_bytes"] == len(model.content)
    assert report["size"]["original_bytes"] == len(digits_upload["model"])
    assert report["onnx"]["model_sha256"] == digest
    page = client.get(job["links"]["report_html"])
    assert page.status_code == 200 and "<svg" in page.text and "coefficient" in page.text
    assert "<script" not in page.text and "http" not in page.text.split("<svg")[0]


def test_train_job_from_csv(client, digits):
    features, labels = digits

    def csv_of(rows: slice) -> bytes:
        buffer = io.StringIO()
        header = ",".join([f"p{i}" for i in range(64)] + ["digit"])
        np.savetxt(
            buffer, np.c_[features[rows], labels[rows]], delimiter=",", header=header, comments=""
        )
        return buffer.getvalue().encode()

    response = submit(
        client,
        "train",
        {"train_data": csv_of(slice(0, 1200)), "eval_data": csv_of(slice(1200, None))},
        {"model": {"hidden": [32]}, "epochs": 8},
    )
    assert response.status_code == 202
    job = wait_for(client, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    model = client.get(job["links"]["model"]).content
    report = client.get(job["links"]["report"]).json()
    predicted = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(
        None, {"X": features[1200:]}
    )[0]
    assert report["accuracy"]["compressed"] == pytest.approx(np.mean(predicted == labels[1200:]))
    assert (
        len(report["training"]["loss"]) == 8 and report["training"]["clip"]["mode"] == "global_norm"
    )


def test_wait_returns_the_finished_job_in_one_round_trip(client, digits_upload):
    response = submit(client, "prune", digits_upload, {"threshold": 0.01}, wait=30)
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"


def test_wait_answers_as_the_job_ends_not_at_the_next_poll(client, digits_upload):
    """The dispatcher wakes the waiting request when the job ends. A request that read the row
    every 100 ms would answer 50 ms late on average; the median of eight stays under 30 ms
    only by luck (about 3%)."""
    lags = []
    for _ in range(8):
        response = submit(
            client, "prune", {"model": digits_upload["model"]}, {"sparsity": 0.1}, wait=30
        )
        answered = datetime.now(UTC)
        assert response.status_code == 200, response.text
        lags.append(answered - datetime.fromisoformat(response.json()["finished_at"]))
    assert statistics.median(lags).total_seconds() < 0.03, lags


def test_list_is_newest_first_and_paginated(client, digits_upload):
    ids = [
        submit(client, "prune", {"model": digits_upload["model"]}, {"sparsity": 0.1}).json()["id"]
        for _ in range(3)
    ]
    first = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in first["items"]] == ids[::-1][:2]
    second = client.get(first["next"]).json()
    assert second["items"][0]["id"] == ids[0]


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"sparsity": 1.5}, 422, "params.sparsity"),
        ({"sparsity": 0.5, "threshold": 0.1}, 422, "params"),
        ({"sparsty": 0.5}, 422, "params.sparsty"),
    ],
)
def test_bad_params_are_problems_naming_the_field(client, digits_upload, params, status, field):
    response = submit(client, "prune", digits_upload, params)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    assert any(error["field"] == field for error in problem["errors"])


def test_request_problems(client, digits_upload):
    not_json = client.post("/v1/jobs/prune", files={"model": ("m", b"x")}, data={"params": "{oops"})
    assert not_json.status_code == 400 and "params is not valid JSON" in not_json.json()["detail"]
    not_multipart = client.post("/v1/jobs/prune", json={"sparsity": 0.5})
    assert not_multipart.status_code == 415
    no_model = submit(client, "prune", {"eval_data": b"a\n1\n"}, {})
    assert no_model.status_code == 422 and "model file is required" in no_model.json()["detail"]
    unknown = submit(client, "prune", {"modle": b"x"})
    assert unknown.status_code == 422 and "modle" in unknown.json()["detail"]
    missing = client.get("/v1/jobs/0123456789abcdef0123456789abcdef")
    assert (
        missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    )
    assert client.get("/v1/jobs?cursor=nonsense").status_code == 400
    assert client.get("/nowhere").json()["status"] == 404


def test_a_bad_model_fails_the_job_with_the_compute_layers_message(client):
    response = submit(
        client, "prune", {"model": b"this is not an onnx model"}, {"sparsity": 0.5}, wait=30
    )
    job = response.json()
    assert job["status"] == "failed"
    assert job["error"]["status"] == 422 and "not a readable ONNX model" in job["error"]["detail"]
    assert job["links"]["model"] is None and job["links"]["report"] is None
    assert client.get(f"/v1/jobs/{job['id']}/model").status_code == 410
    assert client.get(f"/v1/jobs/{job['id']}/report").status_code == 410


def test_delete_removes_the_job_and_its_files(client, server, digits_upload):
    job = submit(client, "prune", digits_upload, {"sparsity": 0.3}, wait=30).json()
    assert (Path(server.data_dir) / "jobs" / job["id"]).exists()
    assert client.delete(job["links"]["self"]).status_code == 204
    assert client.get(job["links"]["self"]).status_code == 404
    assert not (Path(server.data_dir) / "jobs" / job["id"]).exists()


def test_operations_endpoints_and_offline_docs(client, digits_upload):
    submit(client, "prune", digits_upload, {"sparsity": 0.2}, wait=30)
    assert client.get("/livez").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ok" and set(ready["checks"]) == {"database", "workers", "disk"}
    succeeded = 'clipprune_jobs_total{kind="prune",status="succeeded"}'
    metrics = metrics_with(client, succeeded)  # not a count an earlier test's jobs made
    assert succeeded in metrics
    assert "clipprune_queue_depth" in metrics and "clipprune_http_requests_total" in metrics
    docs = client.get("/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/v1/jobs/prune", "/v1/jobs/train", "/v1/jobs/{job_id}/model"} <= set(schema["paths"])
    assert {"PruneParams", "TrainParams", "Report", "Job", "Problem"} <= set(
        schema["components"]["schemas"]
    )
    form = schema["paths"]["/v1/jobs/prune"]["post"]["requestBody"]["content"][
        "multipart/form-data"
    ]
    assert json.loads(form["schema"]["properties"]["params"]["example"])["sparsity"] == 0.8


def test_request_ids_are_echoed(client):
    response = client.get("/livez", headers={"X-Request-ID": "abc123"})
    assert response.headers["x-request-id"] == "abc123"
    assert len(client.get("/livez").headers["x-request-id"]) == 32


def test_hostile_ids_cursors_params_and_headers_are_4xx(client, digits_upload):
    assert client.get("/v1/jobs/a%00b").status_code == 404
    assert client.delete("/v1/jobs/..%2f..%2fetc").status_code == 404
    assert client.get("/v1/jobs/" + "f" * 5000).status_code == 404
    import base64

    bad_cursor = base64.urlsafe_b64encode(b"2020-01-01T00:00:00|a\0b").decode()
    assert client.get("/v1/jobs", params={"cursor": bad_cursor}).status_code == 400
    for params in ("[" * 100_000, '{"epochs": ' + "9" * 5000 + "}"):
        response = client.post(
            "/v1/jobs/train",
            files={"train_data": ("d.csv", b"a,b\n1,2\n")},
            data={"params": params},
        )
        assert response.status_code == 400, response.text
    response = client.get("/livez", headers={"X-Request-ID": b"\xff\xfe"})
    assert response.status_code == 200 and len(response.headers["x-request-id"]) == 32
    twice = client.post(
        "/v1/jobs/prune",
        files=[("model", ("a", digits_upload["model"])), ("model", ("b", digits_upload["model"]))],
    )
    assert twice.status_code == 422 and "more than once" in twice.json()["detail"]


def test_files_gone_under_a_finished_row_read_as_404_not_500(client, server, digits_upload):
    import shutil

    job = submit(client, "prune", digits_upload, {"sparsity": 0.4}, wait=30).json()
    shutil.rmtree(Path(server.data_dir) / "jobs" / job["id"])  # as a racing DELETE or expiry
    for link in ("model", "report", "report_html"):
        response = client.get(job["links"][link])
        assert response.status_code == 404, (link, response.text)
        assert response.headers["content-type"] == "application/problem+json"


def test_waiting_on_a_job_that_gets_deleted_answers_404_at_once(client, digits_csv):
    import threading
    import time

    answer = {}

    def submit_and_wait() -> None:
        answer["response"] = submit(
            client, "train", {"train_data": digits_csv}, LONG_TRAIN, wait=30
        )
        answer["answered"] = time.monotonic()

    thread = threading.Thread(target=submit_and_wait)
    started = time.monotonic()
    thread.start()
    while True:
        page = client.get("/v1/jobs", params={"limit": 1}).json()["items"]
        if page and page[0]["status"] == "running" and page[0]["kind"] == "train":
            break
        time.sleep(0.05)
    assert client.delete(page[0]["links"]["self"]).status_code == 204
    deleted = time.monotonic()
    thread.join(20)
    assert answer["response"].status_code == 404
    # the DELETE wakes the waiting request; it does not wait for its next read of the row
    assert answer["answered"] - deleted < 0.3
    assert time.monotonic() - started < 25


def test_a_delete_wakes_a_request_waiting_on_a_queued_job(client, digits_upload, digits_csv):
    """No worker ever had this job, so only the DELETE can say it ended: the waiting request
    answers 404 then, not at its next read of the row (up to a second later)."""
    import threading
    import time

    busy = [  # both workers, so the next job stays queued
        submit(client, "train", {"train_data": digits_csv}, LONG_TRAIN).json()["id"]
        for _ in range(2)
    ]
    answer = {}

    def submit_and_wait() -> None:
        model = {"model": digits_upload["model"]}
        answer["response"] = submit(client, "prune", model, {"sparsity": 0.1}, wait=30)
        answer["answered"] = time.monotonic()

    try:
        for job_id in busy:
            wait_for(client, job_id, {"running"})
        thread = threading.Thread(target=submit_and_wait)
        thread.start()
        for _ in range(500):
            page = client.get("/v1/jobs", params={"limit": 1}).json()["items"]
            if page and page[0]["kind"] == "prune" and page[0]["id"] not in busy:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"the waiting submit never made its job: {answer}")
        assert page[0]["status"] == "queued"
        time.sleep(0.1)  # the request is waiting by now
        assert client.delete(page[0]["links"]["self"]).status_code == 204
        deleted = time.monotonic()
        thread.join(20)
        assert answer["response"].status_code == 404
        assert answer["answered"] - deleted < 0.2
    finally:
        for job_id in busy:
            client.delete(f"/v1/jobs/{job_id}")
