"""Models that are valid, or nearly, but unusual, through the real service (issue 14, Found 2):
each ends as a job that succeeds or fails with a 4xx problem, never a 500, and a report with
non-finite numbers reads back and renders."""

import io
import re
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from server import submit

WAIT_S = 60


def matmul_model(
    weight: np.ndarray | None = None, input_shape: list[Any] | None = None, elem_type: int = 1
) -> onnx.ModelProto:
    """X [N, 4] -> MatMul W [4, 3] -> Y."""
    weight = np.ones((4, 3), np.float32) if weight is None else weight
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "unusual",
        [helper.make_tensor_value_info("X", elem_type, input_shape or ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", weight.shape[1]])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def recursive_function() -> onnx.ModelProto:
    model = matmul_model()
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    body = [helper.make_node("F", ["a"], ["b"], domain="local")]  # F calls itself
    model.functions.append(helper.make_function("local", "F", ["a"], ["b"], body, opsets))
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.graph.node.append(helper.make_node("F", ["Y"], ["Z"], domain="local"))
    model.graph.output.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 3]))
    return model


def without_inputs() -> onnx.ModelProto:
    model = matmul_model()
    del model.graph.input[:]
    constant = numpy_helper.from_array(np.ones((2, 4), np.float32))
    model.graph.node.insert(0, helper.make_node("Constant", [], ["X"], value=constant))
    return model


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def finished(client: httpx.Client, files: dict[str, bytes]) -> dict[str, Any]:
    response = submit(client, "prune", files, {"sparsity": 0.5}, wait=WAIT_S)
    assert response.status_code == 200, response.text  # ended within the wait
    return response.json()


@pytest.mark.parametrize(
    ("model", "eval_data", "detail"),
    [
        pytest.param(
            recursive_function(), None, "model-local function references", id="recursive-function"
        ),
        pytest.param(
            matmul_model(elem_type=0), None, "element type 0", id="input-of-element-type-0"
        ),
        pytest.param(
            matmul_model(np.ones((4, 0), np.float32)),
            npz(X=np.ones((5, 4), np.float32)),
            r"output 'Y' is empty \(shape \[5, 0\]\)",
            id="zero-size-weight",
        ),
        pytest.param(
            matmul_model(input_shape=[0, 4]),
            npz(X=np.ones((5, 4), np.float32)),
            r"data for input 'X' has shape \[5, 4\]; the model declares \[0, 4\]",
            id="zero-size-input-declared",
        ),
    ],
)
def test_unusual_models_fail_with_a_problem_that_names_the_cause(client, model, eval_data, detail):
    files = {"model": model.SerializeToString()}
    if eval_data is not None:
        files["eval_data"] = eval_data
    job = finished(client, files)
    assert job["status"] == "failed", job
    problem = job["error"]
    assert problem["status"] == 422 and len(problem["detail"]) <= 300, problem
    assert re.search(detail, problem["detail"]), problem["detail"]


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(without_inputs(), id="no-graph-inputs"),
        pytest.param(matmul_model(input_shape=[0, 4]), id="zero-size-input-no-eval-data"),
        pytest.param(matmul_model(np.ones((4, 0), np.float32)), id="zero-size-weight-no-eval"),
    ],
)
def test_unusual_models_that_can_be_pruned_are(client, model):
    job = finished(client, {"model": model.SerializeToString()})
    assert job["status"] == "succeeded", job
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["accuracy"] is None
    assert any(note.startswith("accuracy not measured") for note in report["notes"])


def test_non_finite_outputs_are_reported_as_such_and_the_page_renders(client):
    model = matmul_model(np.full((4, 3), 3.4e38, np.float32))  # X @ W overflows to inf
    eval_data = npz(X=np.full((6, 4), 1e38, np.float32))
    job = finished(client, {"model": model.SerializeToString(), "eval_data": eval_data})
    assert job["status"] == "succeeded", job
    text = client.get(f"/v1/jobs/{job['id']}/report").text
    assert '"compressed":"NaN"' in text.replace(" ", "")
    page = client.get(f"/v1/jobs/{job['id']}/report.html")
    assert page.status_code == 200 and "nan" in page.text


def unused_initializers(count: int) -> onnx.ModelProto:
    model = matmul_model()
    model.graph.initializer.extend(
        numpy_helper.from_array(np.zeros(1, np.float32), f"unused{index}") for index in range(count)
    )
    return model


def many_inputs(count: int) -> onnx.ModelProto:
    model = matmul_model()
    model.graph.input.extend(
        helper.make_tensor_value_info(f"extra{index}", TensorProto.FLOAT, [1])
        for index in range(count)
    )
    return model


@pytest.mark.parametrize(
    ("model", "detail"),
    [
        pytest.param(
            unused_initializers(100_000),
            "the model has 100001 initializers; the limit is 20000",
            id="100000-unused-initializers",
        ),
        pytest.param(
            many_inputs(100_000),
            "the model has 100001 graph inputs; the limit is 1000",
            id="inputs",
        ),
    ],
)
def test_models_that_would_hold_a_worker_for_minutes_are_refused_at_once(client, model, detail):
    job = finished(client, {"model": model.SerializeToString()})
    assert job["status"] == "failed" and job["error"]["status"] == 422, job
    assert detail in job["error"]["detail"]


def test_an_output_whose_shape_changes_between_runs_is_refused_by_name(client):
    model = matmul_model()
    model.graph.node.append(helper.make_node("NonZero", ["X"], ["found"]))  # [2, nonzeros]
    model.graph.output.append(helper.make_tensor_value_info("found", TensorProto.INT64, [2, "k"]))
    runs = np.ones((2, 3, 4), np.float32)  # two runs of [3, 4]
    runs[1, 0, :] = 0  # the second run has fewer nonzeros
    job = finished(client, {"model": model.SerializeToString(), "eval_data": npz(X=runs)})
    assert job["status"] == "failed" and job["error"]["status"] == 422, job
    assert "output 'found' changes shape between runs" in job["error"]["detail"]
