"""Issue 14, Found 1 and 5, through the real service and its workers: each hostile upload ends
within a minute, refused with a 4xx problem that names the cause (or succeeds, where that is
right), no worker grows past the memory limit set here, and the service stays ready and runs a
normal job afterwards. The limit and the stage budget are set low so that a miss shows quickly."""

import re
from typing import Any

import bombs
import psutil
import pytest
from server import accepted_id, finish_watching_memory, submit, wait_for
from test_memory_limit import LIMIT
from test_unusual_models import matmul_model, unused_initializers

STAGE_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def server_settings() -> dict[str, Any]:
    return {"worker_memory_bytes": LIMIT, "stage_timeout_s": STAGE_TIMEOUT_S}


def wide_csv(columns: int = 10_000, megabytes: int = 90) -> bytes:
    """A 90 MB CSV of 10,000 columns: 2.9 GiB of Python strings if read whole."""
    row = ",".join(["0.5"] * columns) + "\n"
    header = ",".join(f"c{index}" for index in range(columns)) + "\n"
    return (header + row * (megabytes * 2**20 // len(row))).encode()


REFUSED = {
    "reduce-prod-shape": (
        {"model": bombs.reduce_prod_shape()},
        "Model refused",
        r"ConstantOfShape node '' allocates a tensor whose size is computed from constants by "
        r"ReduceProd node ''",
    ),
    "resize-by-reduce-max": (
        {"model": bombs.resize_by_reduce_max()},
        "Model refused",
        r"Resize node '' allocates a tensor .* by ReduceMax node ''",
    ),
    "loop-scan-2^62": (
        {"model": bombs.endless_loop(scan=True)},
        "Model refused",
        r"Loop node '' would stack 4611686018427387904 iterations of its scan outputs",
    ),
    "three-outputs-at-the-tensor-cap": (
        {"model": bombs.outputs_at_the_tensor_cap()},
        "Model refused",
        r"the model would compute 805306371 elements in its tensors",
    ),
    "int64-doubled-by-8-concats": (
        {"model": bombs.doubling_concats()},
        "Model refused",
        r"Concat node '' would make 'v7' of shape \[536870912\]",
    ),
    "20M-empty-strings": (
        # parsed, 20M empty strings take about 1 GiB: they fit the limit, then the cap refuses
        # them before onnx's checker or onnxruntime copies them again
        {"model": bombs.empty_strings()},
        "Model refused",
        r"the model holds 20000000 strings in its tensors and attributes; the limit is 1048576",
    ),
    "90MB-csv-of-10000-columns": (
        {"model": matmul_model().SerializeToString(), "eval_data": wide_csv()},
        "Invalid data file",
        r"the CSV holds more than 16777216 cells \(rows x columns, 10000 columns in line 1678\)",
    ),
    "loop-of-2^62-empty-iterations": (
        {"model": bombs.endless_loop(scan=False)},
        "Stage time limit",
        rf"the job's stage 'evaluating' ran longer than {STAGE_TIMEOUT_S} s",
    ),
}


@pytest.mark.parametrize("bomb", list(REFUSED))
def test_a_hostile_upload_is_refused_within_a_minute_and_within_the_limit(server, client, bomb):
    files, title, detail = REFUSED[bomb]
    job, peak = finish_watching_memory(
        server, client, accepted_id(submit(client, "prune", files, {"sparsity": 0.5}))
    )
    assert job["status"] == "failed", job
    problem = job["error"]
    assert problem["status"] == 422 and problem["title"] == title, problem
    assert len(problem["detail"]) <= 300
    assert re.search(detail, problem["detail"]), problem["detail"]
    assert peak < LIMIT, peak
    # what the attempt wrote on its way (candidates, the staged model) went with its end, the
    # stage watchdog's included, which ends the worker's process
    assert not list((server.data_dir / "jobs" / job["id"]).glob(".*"))


def test_inputs_too_large_to_generate_are_not_generated(server, client):
    """100 inputs of [256, 65536] and no eval data: 6.7 GB if generated. The job prunes and
    says why it measured nothing."""
    job, peak = finish_watching_memory(
        server,
        client,
        accepted_id(
            submit(client, "prune", {"model": bombs.many_large_inputs()}, {"sparsity": 0.5})
        ),
    )
    assert job["status"] == "succeeded", job
    notes = client.get(f"/v1/jobs/{job['id']}/report").json()["notes"]
    assert any("the inputs need more than 16777216 elements together" in n for n in notes), notes
    assert peak < LIMIT, peak


def test_unused_initializers_are_dropped_before_onnxruntime_sees_them(server, client):
    model = unused_initializers(15_000).SerializeToString()
    job, _ = finish_watching_memory(
        server, client, accepted_id(submit(client, "prune", {"model": model}, {"sparsity": 0.5}))
    )
    assert job["status"] == "succeeded", job
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert "removed 15000 initializers that no node reads" in report["notes"]
    assert report["size"]["compressed_bytes"] < report["size"]["original_bytes"] / 10


def test_a_training_step_past_the_activation_cap_is_refused_at_submit(client, digits_csv):
    params = {"batch_size": 65536, "model": {"hidden": [16384]}}
    refused = submit(client, "train", {"train_data": digits_csv}, params)
    assert refused.status_code == 422, refused.text
    assert "batch_size x the sum of model.hidden is 1073741824 activations" in refused.text


def test_afterwards_the_service_is_ready_and_runs_a_normal_job(server, client, digits_upload):
    assert client.get("/readyz").status_code == 200
    assert len(server.job_processes()) == 2
    for process in server.job_processes():
        assert process.rlimit(psutil.RLIMIT_DATA) == (LIMIT, LIMIT)
    normal = wait_for(
        client, accepted_id(submit(client, "prune", digits_upload, {"sparsity": 0.5}))
    )
    assert normal["status"] == "succeeded", normal
