"""A job that failed has no results: its links say so, and asking for them answers 410 Gone
with the job's own error, while a job that may still succeed answers 409."""

from server import accepted_id, submit, wait_for

RESULTS = ("model", "report", "report.html")
LONG_TRAIN = {"model": {"hidden": [256, 256]}, "epochs": 10000}


def test_a_failed_job_lists_no_result_links(client):
    job = submit(client, "prune", {"model": b"not onnx"}, {"sparsity": 0.5}, wait=30).json()
    assert job["status"] == "failed"
    assert job["links"] == {
        "self": f"/v1/jobs/{job['id']}",
        "model": None,
        "report": None,
        "report_html": None,
    }
    assert client.get(f"/v1/jobs/{job['id']}").json()["links"] == job["links"]


def test_a_failed_jobs_results_are_gone_with_its_error(client):
    job = submit(client, "prune", {"model": b"not onnx"}, {"sparsity": 0.5}, wait=30).json()
    for result in RESULTS:
        gone = client.get(f"/v1/jobs/{job['id']}/{result}")
        assert gone.status_code == 410, gone.text
        assert gone.headers["content-type"] == "application/problem+json"
        problem = gone.json()
        assert problem["title"] == "Gone"
        # the job's own error: "the job failed: model: not a readable ONNX model ..."
        assert problem["detail"] == f"the job failed: {job['error']['detail']}"
        assert len(problem["detail"]) < 300
    head = client.head(f"/v1/jobs/{job['id']}/model")
    assert head.status_code == 410 and head.content == b""


def test_a_succeeded_job_lists_its_result_links(client, digits_upload):
    job = submit(client, "prune", digits_upload, {"sparsity": 0.5}, wait=30).json()
    assert job["status"] == "succeeded"
    for link in ("model", "report", "report_html"):
        assert client.get(job["links"][link]).status_code == 200


def test_a_running_jobs_results_are_a_conflict_not_gone(client, digits_csv):
    job_id = accepted_id(submit(client, "train", {"train_data": digits_csv}, LONG_TRAIN))
    try:
        job = wait_for(client, job_id, {"running"})
        assert job["links"]["model"] == f"/v1/jobs/{job_id}/model"  # it may still succeed
        for result in RESULTS:
            pending = client.get(f"/v1/jobs/{job_id}/{result}")
            assert pending.status_code == 409, pending.text
            assert "results exist once it has succeeded" in pending.json()["detail"]
    finally:
        client.delete(f"/v1/jobs/{job_id}")
