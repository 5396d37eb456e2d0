"""Errors say where the problem is and what was meant: the upload field a bad file came in,
the closest known key for a misspelled one, no library's wording, and a submit path is not
taken for a job id."""

import subprocess
import sys

import pytest
from helpers import ONNX_TEST_DATA
from onnx import TensorProto, helper
from server import submit

from workers.errors import MAX_MESSAGE, InvalidModelError, onnxruntime_reason
from workers.evaluate.runtime import session

PRUNE = {"sparsity": 0.5}


@pytest.mark.parametrize("field", ["eval_data", "train_data"])
def test_an_onnx_file_sent_as_data_names_the_field(client, digits_upload, field):
    model = digits_upload["model"]
    params = {**PRUNE, "fine_tune": {"epochs": 1}} if field == "train_data" else PRUNE
    job = submit(client, "prune", {"model": model, field: model}, params, wait=30).json()
    assert job["status"] == "failed"
    assert job["error"]["detail"].startswith(f"{field}: not a readable UTF-8 CSV file"), job


def test_a_train_jobs_data_errors_name_the_field(client, digits_upload, digits_csv):
    model = digits_upload["model"]
    bad_train = submit(client, "train", {"train_data": model}, {"epochs": 1}, wait=30).json()
    assert bad_train["error"]["detail"].startswith("train_data: "), bad_train
    bad_eval = submit(
        client, "train", {"train_data": digits_csv, "eval_data": model}, {"epochs": 1}, wait=30
    ).json()
    assert bad_eval["error"]["detail"].startswith("eval_data: "), bad_eval


def test_a_bad_model_names_the_model_field(client):
    job = submit(client, "prune", {"model": b"not onnx"}, PRUNE, wait=30).json()
    assert job["error"]["detail"].startswith("model: the upload is not a readable ONNX"), job


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"sparcity": 0.5}, "params.sparcity", "unknown key 'sparcity'; did you mean 'sparsity'?"),
        (
            {"sparsity": 0.5, "fine_tune": {"epocs": 3}},
            "params.fine_tune.epocs",
            "unknown key 'epocs'; did you mean 'epochs'?",
        ),
    ],
)
def test_a_misspelled_key_suggests_the_closest_known_one(client, params, field, message):
    refused = submit(client, "prune", {"model": b"x"}, params)
    assert refused.status_code == 422
    assert refused.json()["errors"] == [{"field": field, "message": message}]
    assert refused.json()["detail"] == f"{field}: {message}"


def test_a_key_like_no_known_one_lists_the_known_keys(client):
    refused = submit(client, "train", {"train_data": b"a,b\n1,2\n"}, {"zzz": 1})
    message = refused.json()["errors"][0]["message"]
    assert message.startswith("unknown key 'zzz'; known keys: model, task, label, epochs")


def test_no_library_prefix_reaches_a_message(client):
    refused = submit(client, "prune", {"model": b"x"}, {})
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "params: give exactly one of sparsity, threshold, max_accuracy_drop"
    )


@pytest.mark.parametrize("path", ["/v1/jobs/prune", "/v1/jobs/train", "/v1/jobs/prune/report"])
def test_a_submit_path_is_not_taken_for_a_job_id(client, path):
    kind = path.split("/")[3]
    answer = client.get(path)
    assert answer.status_code == 404
    detail = answer.json()["detail"]
    assert f"POST /v1/jobs/{kind}" in detail and "submit path" in detail
    assert f"no job {kind}" not in detail


def test_the_cli_suggests_the_closest_key_too(tmp_path, digits_upload):
    model = tmp_path / "m.onnx"
    model.write_bytes(digits_upload["model"])
    params = '{"sparsity": 0.5, "scpoe": "global"}'
    out = str(tmp_path / "o.onnx")
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "prune", str(model), "-o", out, "--params", params],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "clipprune: error: invalid parameters: params.scpoe: unknown key 'scpoe'; "
        "did you mean 'scope'?"
    )


def test_onnxruntimes_refusal_names_no_scratch_file(tmp_path):
    # onnxruntime starts its message with the path it loaded, a job's scratch file
    ones = [
        helper.make_tensor(name, TensorProto.FLOAT, [size], [1.0] * size)
        for name, size in (("A", 2), ("B", 3))
    ]
    graph = helper.make_graph(
        [helper.make_node("Add", ["A", "B"], ["Y"])],
        "mismatched",
        [],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        ones,
    )
    path = tmp_path / "candidate-1.dense.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(InvalidModelError) as refused:
        session(path)
    message = str(refused.value)
    assert message.startswith("onnxruntime cannot load the model: ") and "Incompatible" in message
    assert str(tmp_path) not in message and "[ONNXRuntimeError]" not in message


def test_onnxruntimes_refusal_shows_no_cpp_source_line_or_signature():
    # onnxruntime 1.2x's message for a graph it rejects while building it, as it was raised
    raised = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : Load model from /tmp/job/out.onnx failed:"
        "/onnxruntime_src/onnxruntime/core/graph/graph.cc:1483 onnxruntime::Graph::Graph("
        "const onnxruntime::Model&, onnx::GraphProto*, const std::unordered_map<std::__cxx11::"
        "basic_string<char>, int>&, onnxruntime::Version, const onnxruntime::logging::Logger&, "
        "bool) [ONNXRuntimeError] : 1 : FAIL : Output:0 [ShapeInferenceError] Mismatch between "
        "number of inferred and declared dimensions. inferred=0 declared=4"
    )
    assert onnxruntime_reason(raised) == (
        "Output:0 [ShapeInferenceError] Mismatch between number of inferred and declared "
        "dimensions. inferred=0 declared=4"
    )


def test_an_operator_at_an_opset_onnxruntime_dropped_gets_advice():
    # onnx ships early PyTorch exports as test data: AveragePool at opset 1 has no kernel now
    path = ONNX_TEST_DATA / "pytorch-converted" / "test_AvgPool2d" / "model.onnx"
    with pytest.raises(InvalidModelError) as refused:
        session(path.read_bytes())
    message = str(refused.value)
    assert message.startswith(
        "onnxruntime cannot load the model: Could not find an implementation for AveragePool(1)"
    )
    assert message.endswith(
        "convert the model to a newer opset (onnx.version_converter) or export it again"
    )
    assert len(message) <= MAX_MESSAGE
