"""A corpus of hostile and broken inputs sent through the real HTTP service.

Every one is answered with a 4xx problem whose detail says what is wrong: cheap checks (params,
HTTP) at the edge at once; models and data, which only the worker processes parse, as a job that
ends `failed` with a 422 problem. Afterwards the service is still healthy: ready, no job left
running, and a normal prune job succeeds.
"""

import io
import json
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from graphs import constant_node_mlp, gemm_mlp, make_model
from onnx import TensorProto, helper, numpy_helper
from server import FINISHED, Server, accepted_id, submit, wait_for

UPLOAD_LIMIT = 4 * 2**20
JOB_TIMEOUT_S = 20  # a job hung on hostile input fails in 20 s instead of the default hour
WAIT_S = 30


@pytest.fixture(scope="module")
def server_settings() -> dict[str, Any]:
    return {"max_upload_bytes": UPLOAD_LIMIT, "job_timeout_s": JOB_TIMEOUT_S}


@dataclass(frozen=True)
class Uploads:
    digits: bytes  # 64-48-24-10 digits MLP from skl2onnx: input X [N, 64], classes 0..9
    features: np.ndarray
    labels: np.ndarray

    def csv(self, rows: slice = slice(1200, 1300), labels: np.ndarray | None = None) -> bytes:
        """Digits rows as CSV with a header, label last."""
        y = self.labels[rows] if labels is None else labels
        buffer = io.StringIO()
        header = ",".join([f"p{i}" for i in range(64)] + ["digit"])
        np.savetxt(buffer, np.c_[self.features[rows], y], delimiter=",", header=header, comments="")
        return buffer.getvalue().encode()


@pytest.fixture(scope="module")
def uploads(_mlp_classifier: onnx.ModelProto, digits) -> Uploads:
    features, labels = digits
    return Uploads(_mlp_classifier.SerializeToString(), features, labels)


def assert_clear(problem: dict[str, Any], status: int, detail: str) -> None:
    """A problem with the status and a detail that says what is wrong: no raw internals."""
    assert problem["status"] == status and problem["title"], problem
    assert re.search(detail, problem["detail"]), problem["detail"]
    for internal in ("Traceback", "[ONNXRuntimeError]", "onnxruntime_src", "this is a bug"):
        assert internal not in problem["detail"], problem["detail"]


# --- models ---------------------------------------------------------------------------------


def _small() -> onnx.ModelProto:
    """X [N, 4] -> Gemm -> Tanh -> Gemm -> [N, 2]: initializers W0, b0, W1, b1."""
    return gemm_mlp([4, 3, 2], trans_b=0)


def _external(location: str, flagged: bool = True, **entries: str) -> bytes:
    model = _small()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    if flagged:
        tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def _external_constant() -> bytes:
    model = constant_node_mlp()
    tensor = model.graph.node[0].attribute[0].t
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    return model.SerializeToString()


def _sparse(indices: list[int], dims: list[int]) -> bytes:
    model = _small()
    values = numpy_helper.from_array(np.ones(len(indices[:2]), np.float32), "S")
    index = numpy_helper.from_array(np.array(indices, np.int64), "")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, index, dims))
    return model.SerializeToString()


def _huge_shape(op: str, shape: list[int]) -> bytes:
    """A second output made from a constant shape: 2 GiB of float32 if anything ran it."""
    model = _small()
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), "big_shape"))
    if op == "ConstantOfShape":
        graph.node.append(helper.make_node(op, ["big_shape"], ["big"], name="inflate"))
    else:
        graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), "one"))
        graph.node.append(helper.make_node(op, ["one", "big_shape"], ["big"], name="inflate"))
    graph.output.append(
        helper.make_tensor_value_info("big", TensorProto.FLOAT, [f"d{i}" for i in shape])
    )
    return model.SerializeToString()


def _unknown_domain() -> bytes:
    model = _small()
    model.graph.node[1].domain = "com.evil"
    model.opset_import.append(helper.make_opsetid("com.evil", 1))
    return model.SerializeToString()


def _nested(op: str, attribute: str, depth: int) -> bytes:
    """`depth` levels of `op`, each holding the next in its `attribute` subgraph."""
    out = helper.make_tensor_value_info("o0", TensorProto.FLOAT, ["N", 4])
    inner = helper.make_graph([helper.make_node("Identity", ["X"], ["o0"])], "g0", [], [out])
    for level in range(1, depth + 1):
        node = helper.make_node(op, ["c"], [f"o{level}"], **{attribute: inner})
        out = helper.make_tensor_value_info(f"o{level}", TensorProto.FLOAT, ["N", 4])
        inner = helper.make_graph([node], f"g{level}", [], [out])
    graph = helper.make_graph(
        list(inner.node),
        "nested",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [out],
        [numpy_helper.from_array(np.array(True), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _varint(value: int) -> bytes:
    out = b""
    while value > 0x7F:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _nested_past_protobuf(depth: int) -> bytes:
    """If nodes nested deeper than protobuf parses (onnx.helper cannot even build it), written
    as wire format: GraphProto.node=1, NodeProto.op_type=4/attribute=5, AttributeProto.name=1/
    g=6/type=20, ModelProto.ir_version=1/graph=7/opset_import=8."""
    graph = b""
    for _ in range(depth):
        attribute = _field(1, b"then_branch") + _varint(20 << 3) + _varint(5) + _field(6, graph)
        graph = _field(1, _field(4, b"If") + _field(5, attribute))
    opset = _field(1, b"") + _varint(2 << 3) + _varint(17)
    return _varint(1 << 3) + _varint(8) + _field(7, graph) + _field(8, opset)


def _versions(ir: int | None = None, opset: int | None = None) -> bytes:
    model = _small()
    if ir is not None:
        model.ir_version = ir
    if opset is not None:
        model.opset_import[0].version = opset
    return model.SerializeToString()


def _no_graph() -> bytes:
    model = onnx.ModelProto(ir_version=8)
    model.opset_import.append(helper.make_opsetid("", 17))
    return model.SerializeToString()


def _rewired(change: Callable[[onnx.ModelProto], None]) -> bytes:
    model = _small()
    change(model)
    return model.SerializeToString()


def _cycle(model: onnx.ModelProto) -> None:
    model.graph.node[0].input[0] = model.graph.node[1].output[0]


def _duplicate_output(model: onnx.ModelProto) -> None:
    model.graph.node[1].output[0] = model.graph.node[0].output[0]


def _duplicate_initializer(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(model.graph.initializer[0])


def _weights_with(value: float) -> bytes:
    model = _small()
    weight = numpy_helper.to_array(model.graph.initializer[2]).copy()
    weight[0, 0] = value
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(weight, "W1"))
    return model.SerializeToString()


def _relu_only() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["Y"])],
        "relu",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
    )
    return make_model(graph).SerializeToString()


def _double_weights() -> bytes:
    weight = numpy_helper.from_array(np.ones((4, 2), np.float64), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "double",
        [helper.make_tensor_value_info("X", TensorProto.DOUBLE, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, ["N", 2])],
        [weight],
    )
    return make_model(graph).SerializeToString()


def _bias_named(name: str) -> bytes:
    """The small MLP with its first bias renamed: not a default weight, so include's patterns
    are searched in its name."""
    model = _small()
    model.graph.initializer[1].name = name
    model.graph.node[0].input[2] = name
    return model.SerializeToString()


# --- data -----------------------------------------------------------------------------------


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npz_declaring(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f8", "fortran_order": False, "shape": shape}
    )
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("X.npy", buffer.getvalue() + b"\0" * 64)
    return archive.getvalue()


def _zip_bomb(rows: int = 2**18) -> bytes:
    """An NPZ of about 130 KB whose X [rows, 64] float64 decompresses to 128 MiB of zeros."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (rows, 64)}
    )
    archive = io.BytesIO()
    with (
        zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out,
        out.open("X.npy", "w", force_zip64=True) as member,
    ):
        member.write(header.getvalue())
        chunk = bytes(2**20)
        for _ in range(rows * 64 * 8 // len(chunk)):
            member.write(chunk)
    return archive.getvalue()


def _not_an_array() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("X.txt", b"hello")
    return archive.getvalue()


def _replace_cell(csv: bytes, line: int, column: int, value: str) -> bytes:
    lines = csv.decode().splitlines()
    cells = lines[line - 1].split(",")
    cells[column] = value
    lines[line - 1] = ",".join(cells)
    return "\n".join(lines).encode()


def _drop_cell(csv: bytes, line: int) -> bytes:
    lines = csv.decode().splitlines()
    lines[line - 1] = lines[line - 1].rsplit(",", 1)[0]
    return "\n".join(lines).encode()


def _train_csv(rows: int, label: Callable[[int], str] = lambda i: str(i % 2)) -> bytes:
    return ("a,b,label\n" + "".join(f"{i},{i * 2},{label(i)}\n" for i in range(rows))).encode()


# --- jobs that must fail: the worker parses the upload --------------------------------------

Build = Callable[[Uploads], tuple[dict[str, bytes], dict[str, Any]]]


def _prune(model: Callable[[Uploads], bytes], **params: Any) -> Build:
    return lambda u: ({"model": model(u)}, {"sparsity": 0.5, **params})


def _prune_eval(eval_data: Callable[[Uploads], bytes], **params: Any) -> Build:
    return lambda u: ({"model": u.digits, "eval_data": eval_data(u)}, {"sparsity": 0.5, **params})


def _train(train_data: Callable[[Uploads], bytes], **params: Any) -> Build:
    return lambda u: ({"train_data": train_data(u)}, {"epochs": 1, **params})


EXTERNAL = r"stores its data in an external file \({!r}\)"
CHECKER = "the ONNX checker rejected the model: "

FAILED_JOBS = [
    # models
    pytest.param(
        _prune(lambda u: b"\x08\x07" + bytes(range(256)) * 8),
        "not a readable ONNX model",
        id="model-random-bytes",
    ),
    pytest.param(
        _prune(lambda u: u.digits[: len(u.digits) // 2]),
        "not a readable ONNX model|checker rejected",
        id="model-truncated-protobuf",
    ),
    pytest.param(
        _prune(lambda u: _external("../../etc/passwd")),
        EXTERNAL.format("../../etc/passwd"),
        id="model-external-data-dotdot",
    ),
    pytest.param(
        _prune(lambda u: _external("/etc/passwd")),
        EXTERNAL.format("/etc/passwd"),
        id="model-external-data-absolute",
    ),
    pytest.param(
        _prune(lambda u: _external("*/_ORT_MEM_ADDR_/*", offset="140000000000", length="48")),
        EXTERNAL.format("*/_ORT_MEM_ADDR_/*").replace("*", r"\*"),
        id="model-external-data-ort-memory-address",
    ),
    pytest.param(
        _prune(lambda u: _external("weights.bin", flagged=False)),
        EXTERNAL.format("weights.bin"),
        id="model-external-data-entries-without-the-flag",
    ),
    pytest.param(
        _prune(lambda u: _external_constant()),
        "Constant node .* external file",
        id="model-external-data-in-a-constant-node",
    ),
    pytest.param(
        _prune(lambda u: _sparse([0], [200_000, 200_000])),
        r"sparse initializer 'S' \(dense shape\) has 40000000000 elements; the limit is",
        id="model-sparse-huge-dense-shape",
    ),
    pytest.param(
        _prune(lambda u: _sparse([0, 100], [3, 4])),
        CHECKER + r"Sparse tensor .*index value .* out of range",
        id="model-sparse-index-out-of-range",
    ),
    pytest.param(
        _prune(lambda u: _sparse([-1, 2], [3, 4])),
        CHECKER + r"Sparse tensor .*index value .* out of range",
        id="model-sparse-negative-index",
    ),
    pytest.param(
        _prune(lambda u: _sparse([0, 1, 2], [3, 4])),
        CHECKER + "Sparse tensor indices .* has 3 values, but NNZ is 2",
        id="model-sparse-more-indices-than-values",
    ),
    pytest.param(
        _prune(lambda u: _huge_shape("ConstantOfShape", [2**15, 2**14])),
        r"ConstantOfShape node 'inflate' would make 'big' of shape \[32768, 16384\] "
        r"\(536870912 elements\); the limit is 268435456",
        id="model-constantofshape-2gib",
    ),
    pytest.param(
        _prune(lambda u: _huge_shape("Expand", [2**15, 2**14])),
        r"Expand node 'inflate' would make 'big' of shape \[32768, 16384\]",
        id="model-expand-2gib",
    ),
    pytest.param(
        _prune(lambda u: _huge_shape("ConstantOfShape", [2**20, 2**20, 2**20])),
        r"ConstantOfShape node 'inflate' would make 'big' of shape \[1048576, 1048576, 1048576\]",
        id="model-constantofshape-exabytes",
    ),
    pytest.param(
        _prune(lambda u: _unknown_domain()),
        r"uses the unknown operator domain 'com\.evil'",
        id="model-unknown-op-domain",
    ),
    pytest.param(
        _prune(lambda u: _nested("If", "then_branch", 12)),
        "subgraphs are nested 9 deep; the limit is 8",
        id="model-if-nested-12-deep",
    ),
    pytest.param(
        _prune(lambda u: _nested("Loop", "body", 12)),
        "subgraphs are nested 9 deep; the limit is 8",
        id="model-loop-nested-12-deep",
    ),
    pytest.param(
        _prune(lambda u: _nested_past_protobuf(300)),
        "not a readable ONNX model",
        id="model-if-nested-300-deep",
    ),
    pytest.param(
        _prune(lambda u: _versions(ir=99)),
        CHECKER + "Your model ir_version 99 is higher than the checker's",
        id="model-ir-version-99",
    ),
    pytest.param(
        _prune(lambda u: _versions(opset=99)),
        r"imports opset 99 of domain 'ai\.onnx'; the newest this service knows is \d+",
        id="model-opset-99",
    ),
    pytest.param(
        _prune(lambda u: _no_graph()),
        "the upload has no ONNX graph with nodes",
        id="model-missing-graph",
    ),
    pytest.param(
        _prune(lambda u: _rewired(_cycle)),
        CHECKER + "Nodes in a graph must be topologically sorted",
        id="model-cycle",
    ),
    pytest.param(
        _prune(lambda u: _rewired(_duplicate_output)),
        CHECKER + "Graph must be in single static assignment",
        id="model-duplicate-output-names",
    ),
    pytest.param(
        _prune(lambda u: _rewired(_duplicate_initializer)),
        CHECKER + "W0 initializer name is not unique",
        id="model-duplicate-initializer-names",
    ),
    pytest.param(
        _prune(lambda u: _weights_with(np.nan)),
        "weight 'W1' holds NaN or infinite values",
        id="model-nan-weights",
    ),
    pytest.param(
        _prune(lambda u: _weights_with(np.inf)),
        "weight 'W1' holds NaN or infinite values",
        id="model-inf-weights",
    ),
    pytest.param(
        _prune(lambda u: _relu_only()),
        "the model has no prunable weights",
        id="model-nothing-prunable",
    ),
    pytest.param(
        _prune(lambda u: u.digits, exclude=[".*"]),
        "the model has no prunable weights",
        id="model-everything-excluded",
    ),
    pytest.param(
        # one layer, straight to the output: its channels are the model's outputs, which stay
        _prune(lambda u: gemm_mlp([4, 2], trans_b=0).SerializeToString(), granularity="structured"),
        "structured pruning found no channel group it can remove channels from safely",
        id="model-structured-without-a-hidden-layer",
    ),
    pytest.param(
        _prune(lambda u: _double_weights(), encoding="int8"),
        "encoding int8 quantizes float32 weights; weight 'W' is double",
        id="model-int8-with-double-weights",
    ),
    # eval data that does not fit the model
    pytest.param(
        _prune_eval(lambda u: b"a,b,c\n1,2,3\n"),
        "the CSV has 3 columns but input 'X' takes 64 features",
        id="eval-csv-wrong-width",
    ),
    pytest.param(
        _prune_eval(lambda u: _npz(inputs=u.features[:10], y=u.labels[:10])),
        r"needs arrays named after the model's inputs \(X\)",
        id="eval-npz-wrong-names",
    ),
    pytest.param(
        _prune_eval(lambda u: _npz(X=u.features[:10, :5], y=u.labels[:10])),
        r"data for input 'X' has shape \[10, 5\]; the model declares \[\?, 64\]",
        id="eval-npz-wrong-shape",
    ),
    pytest.param(
        _prune_eval(lambda u: u.csv(labels=u.labels[1200:1300] + 100)),
        r"eval_data labels 100, 101, .* are not among the model's classes 0, 1, .*9",
        id="eval-labels-not-the-models-classes",
    ),
    # eval data files
    pytest.param(
        _prune_eval(lambda u: _replace_cell(u.csv(), 3, 5, "nan")),
        "column 'p5', line 3: 'nan' is not finite",
        id="eval-csv-nan",
    ),
    pytest.param(
        _prune_eval(lambda u: _replace_cell(u.csv(), 4, 0, "-inf")),
        "column 'p0', line 4: '-inf' is not finite",
        id="eval-csv-inf",
    ),
    pytest.param(
        _prune_eval(lambda u: _replace_cell(u.csv(), 2, 7, "seven")),
        "column 'p7', line 2: 'seven' is not a number",
        id="eval-csv-string-in-a-number-column",
    ),
    pytest.param(
        _prune_eval(lambda u: _drop_cell(u.csv(), 5)),
        "line 5 has 64 fields but the header has 65",
        id="eval-csv-ragged-row",
    ),
    pytest.param(
        _prune_eval(lambda u: u.csv().splitlines()[0] + b"\n"),
        "the CSV file needs a header line and at least one data row",
        id="eval-csv-header-only",
    ),
    pytest.param(
        _prune_eval(
            lambda u: (
                ",".join(f"c{i}" for i in range(20001)) + "\n" + "0," * 20000 + "0\n"
            ).encode()
        ),
        "20001 columns; the limit is 10000",
        id="eval-csv-huge-header",
    ),
    pytest.param(
        _prune_eval(lambda u: b"a" * 200_000 + b"\n1\n"),
        r"not a readable UTF-8 CSV file: field larger than field limit",
        id="eval-csv-giant-field",
    ),
    pytest.param(
        _prune_eval(lambda u: b"p0,p1\n\xff\xfe,1\n"),
        "not a readable UTF-8 CSV file",
        id="eval-csv-not-utf8",
    ),
    pytest.param(
        _prune_eval(lambda u: _npz(X=np.array([{"a": 1}] * 10, dtype=object))),
        r"array 'X' holds objects \(pickles\), which are refused",
        id="eval-npz-pickled-objects",
    ),
    pytest.param(
        _prune_eval(lambda u: _npz(X=u.features[:10], y=u.labels[:10])[:100]),
        "not a readable NPZ file",
        id="eval-npz-truncated",
    ),
    pytest.param(
        _prune_eval(lambda u: _npz_declaring((10**6, 10**6))),
        "the NPZ arrays would take 8000000000000 bytes in memory; the limit is",
        id="eval-npz-declaring-terabytes",
    ),
    pytest.param(
        _prune_eval(lambda u: _zip_bomb()),
        r"the NPZ arrays would take 134217728 bytes in memory, \d+ times the \d+-byte file",
        id="eval-npz-zip-bomb",
    ),
    pytest.param(
        _prune_eval(lambda u: _not_an_array()),
        r"'X\.txt' in the NPZ file is not an array",
        id="eval-npz-member-not-an-array",
    ),
    pytest.param(
        _prune_eval(lambda u: _npz(X=np.where(u.features[:10] > 0.5, np.inf, 0.0))),
        "array 'X' holds NaN or infinite values",
        id="eval-npz-inf",
    ),
    # fine-tuning and training data
    pytest.param(
        lambda u: (
            {"model": u.digits, "train_data": u.csv(labels=u.labels[1200:1300] + 100)},
            {"sparsity": 0.5, "fine_tune": {"epochs": 1}},
        ),
        r"labels 100, 101, .* are not among the model's classes",
        id="train-data-labels-not-the-models-classes",
    ),
    pytest.param(
        _train(lambda u: _train_csv(5)),
        "5 rows is too few to train on; send at least 10",
        id="train-csv-too-few-rows",
    ),
    pytest.param(
        _train(lambda u: _train_csv(20), label="target"),
        r"label column 'target' is not in the header; columns: a, b, label",
        id="train-csv-label-column-missing",
    ),
    pytest.param(
        _train(lambda u: _npz(X=np.zeros((20, 2)))),
        "the NPZ file needs arrays X and y; it has X",
        id="train-npz-without-y",
    ),
    pytest.param(
        _train(lambda u: _npz(X=np.zeros((20, 2)), y=np.full(20, np.nan))),
        "array 'y' holds NaN or infinite values",
        id="train-npz-nan-labels",
    ),
    pytest.param(
        lambda u: (
            {"train_data": _train_csv(20), "eval_data": b"a,b,c,d\n1,2,3,4\n"},
            {"epochs": 1},
        ),
        "the CSV has 4 columns but input 'X' takes 2 features",
        id="train-eval-csv-wrong-width",
    ),
]


def _kind(files: dict[str, bytes]) -> str:
    return "prune" if "model" in files else "train"


@pytest.mark.parametrize(("build", "detail"), FAILED_JOBS)
def test_the_job_fails_with_a_problem_naming_the_cause(
    client: httpx.Client, uploads: Uploads, build: Build, detail: str
) -> None:
    files, params = build(uploads)
    response = submit(client, _kind(files), files, params, wait=WAIT_S)
    assert response.status_code == 200, response.text  # the job ended within the wait
    job = response.json()
    assert job["status"] == "failed", job
    assert_clear(job["error"], 422, detail)


# --- refused at the edge: params and HTTP ---------------------------------------------------

Request = Callable[[Uploads], dict[str, Any]]


def _form(kind: str = "prune", params: Any = None, **files: bytes | None) -> Request:
    """A submit with these files (None: the digits model) and params (a dict is sent as JSON,
    a string as it is)."""

    def request(u: Uploads) -> dict[str, Any]:
        sent = {name: (name, u.digits if data is None else data) for name, data in files.items()}
        data = (
            {}
            if params is None
            else {"params": params if isinstance(params, str) else json.dumps(params)}
        )
        return {"method": "POST", "url": f"/v1/jobs/{kind}", "files": sent, "data": data}

    return request


def _prune_with(params: Any) -> Request:
    return _form("prune", params, model=None)


def _train_with(params: Any) -> Request:
    return _form("train", params, train_data=_train_csv(20))


def _raw(method: str, url: str, **kwargs: Any) -> Request:
    return lambda u: {"method": method, "url": url, **kwargs}


MULTIPART = "multipart/form-data; boundary=x"

REFUSED = [
    # params
    pytest.param(_prune_with("{oops"), 400, "params is not valid JSON", id="params-invalid-json"),
    pytest.param(
        _prune_with("[0.5]"), 400, "params must be a JSON object", id="params-not-an-object"
    ),
    pytest.param(
        _prune_with('{"sparsity": 0.5, "label": "' + "x" * 70_000 + '"}'),
        400,
        "params is 70030 characters; the limit is 65536",
        id="params-too-long",
    ),
    pytest.param(
        _prune_with("[" * 50_000), 400, "params is not valid JSON", id="params-nested-50000-deep"
    ),
    pytest.param(
        _prune_with('{"threshold": NaN}'), 400, "NaN is not a JSON number", id="params-nan"
    ),
    pytest.param(
        _prune_with('{"threshold": Infinity}'),
        400,
        "Infinity is not a JSON number",
        id="params-infinity",
    ),
    pytest.param(
        _prune_with('{"threshold": 1e999}'), 400, "1e999 is out of range", id="params-1e999"
    ),
    pytest.param(
        _prune_with({"sparsty": 0.5}),
        422,
        "params.sparsty: unknown key 'sparsty'; did you mean 'sparsity'?",
        id="params-unknown-key",
    ),
    pytest.param(
        _prune_with({"sparsity": 1.5}),
        422,
        "params.sparsity: Input should be less than 1",
        id="params-sparsity-1.5",
    ),
    pytest.param(
        _prune_with({"threshold": -1}),
        422,
        "params.threshold: Input should be greater than or equal to 0",
        id="params-negative-threshold",
    ),
    pytest.param(
        _prune_with({"max_accuracy_drop": 2}),
        422,
        "params.max_accuracy_drop",
        id="params-accuracy-drop-2",
    ),
    pytest.param(
        _prune_with({"sparsity": 0.5, "threshold": 0.1}),
        422,
        "give exactly one of sparsity, threshold, max_accuracy_drop",
        id="params-sparsity-and-threshold",
    ),
    pytest.param(
        _prune_with({"sparsity": 0.5, "scope": "galaxy"}),
        422,
        "params.scope",
        id="params-unknown-scope",
    ),
    pytest.param(
        _prune_with({"sparsity": 0.5, "fine_tune": {"epochs": 1001}}),
        422,
        "params.fine_tune.epochs: Input should be less than or equal to 1000",
        id="params-fine-tune-epochs-1001",
    ),
    pytest.param(
        _form(
            "prune",
            {"sparsity": 0.5, "granularity": "structured", "fine_tune": {"schedule": "gradual"}},
            model=None,
            train_data=b"a\n1\n",
        ),
        422,
        "fine_tune.schedule gradual .* granularity unstructured",
        id="params-gradual-fine-tune-with-structured",
    ),
    pytest.param(
        _form(
            "prune",
            {"threshold": 0.1, "fine_tune": {"schedule": "gradual"}},
            model=None,
            train_data=b"a\n1\n",
        ),
        422,
        "fine_tune.schedule gradual .* sparsity",
        id="params-gradual-fine-tune-with-threshold",
    ),
    pytest.param(
        _prune_with({"sparsity": 0.5, "fine_tune": {}}),
        422,
        "fine_tune needs a train_data file",
        id="params-fine-tune-without-train-data",
    ),
    pytest.param(
        _prune_with({"sparsity": 0.5, "criterion": "activation"}),
        422,
        "params.criterion needs an eval_data file: its rows are the calibration inputs",
        id="params-activation-criterion-without-eval-data",
    ),
    pytest.param(
        _prune_with({"sparsity": 0.5, "reconstruct": True}),
        422,
        "params.reconstruct needs an eval_data file",
        id="params-reconstruct-without-eval-data",
    ),
    pytest.param(
        _prune_with({"sparsity": 0.5, "include": ["("]}),
        422,
        r"params.include: .*'\(' is not a valid regular expression",
        id="params-include-invalid-regex",
    ),
    pytest.param(
        _prune_with({"sparsity": 0.5, "exclude": [r"(W)\1"]}),
        422,
        r"params.exclude: .*backreferences",
        id="params-exclude-backreference",
    ),
    pytest.param(
        _prune_with({"sparsity": 0.5, "include": ["a{1001}"]}),
        422,
        r"params.include: .*'a\{1001\}' is not a valid regular expression",
        id="params-include-huge-repetition",
    ),
    pytest.param(_train_with({"epochs": 10001}), 422, "params.epochs", id="params-epochs-10001"),
    pytest.param(_train_with({"epochs": 1.5}), 422, "params.epochs", id="params-fractional-epochs"),
    pytest.param(
        _train_with({"model": {"hidden": [100_000]}}),
        422,
        "hidden takes at most 16 layers, each of width 1..16384",
        id="params-hidden-too-wide",
    ),
    pytest.param(
        _train_with({"model": {"hidden": [8] * 17}}),
        422,
        "hidden takes at most 16 layers",
        id="params-hidden-too-deep",
    ),
    pytest.param(
        _train_with({"model": {"hidden": [16384, 16384]}}),
        422,
        "would hold 268435456 weights between them; the limit is 67108864",
        id="params-hidden-too-many-weights",
    ),
    pytest.param(
        _train_with({"batch_size": 0}), 422, "params.batch_size", id="params-batch-size-0"
    ),
    pytest.param(
        _train_with({"validation_split": 1}),
        422,
        "params.validation_split",
        id="params-validation-split-1",
    ),
    pytest.param(
        _train_with({"prune": {"threshold": 0.1, "schedule": "gradual"}}),
        422,
        "schedule gradual ramps up a sparsity",
        id="params-train-gradual-with-threshold",
    ),
    pytest.param(
        _train_with({"learning_rate": 0}), 422, "params.learning_rate", id="params-learning-rate-0"
    ),
    pytest.param(_train_with({"seed": -1}), 422, "params.seed", id="params-negative-seed"),
    pytest.param(
        _train_with({"clip": {"mode": "value", "threshold": 0}}),
        422,
        "params.clip.threshold: Input should be greater than 0",
        id="params-clip-threshold-0",
    ),
    # the form
    pytest.param(
        _raw("POST", "/v1/jobs/prune", json={"sparsity": 0.5}),
        415,
        "send multipart/form-data \\(got application/json\\)",
        id="http-json-body",
    ),
    pytest.param(
        _raw("POST", "/v1/jobs/prune", content=b"hello", headers={"content-type": "text/plain"}),
        415,
        "got text/plain",
        id="http-text-body",
    ),
    pytest.param(
        _raw("POST", "/v1/jobs/train", content=b"hello"),
        415,
        "no content type",
        id="http-no-content-type",
    ),
    pytest.param(
        _raw(
            "POST",
            "/v1/jobs/prune",
            content=b"garbage",
            headers={"content-type": "multipart/form-data"},
        ),
        400,
        "boundary",
        id="http-multipart-without-boundary",
    ),
    pytest.param(
        _raw(
            "POST",
            "/v1/jobs/prune",
            content=b'--x\r\nContent-Disposition: form-data; name="model"; filename="m"\r\n\r\nabc',
            headers={"content-type": MULTIPART},
        ),
        422,
        "the model file is required",  # python-multipart drops a part the body cuts short
        id="http-multipart-cut-short",
    ),
    pytest.param(
        _form("prune", {"sparsity": 0.5}, eval_data=b"a\n1\n"),
        422,
        "the model file is required",
        id="http-missing-model",
    ),
    pytest.param(
        _form("train", {}, eval_data=b"a\n1\n"),
        422,
        "the train_data file is required",
        id="http-missing-train-data",
    ),
    pytest.param(
        _form("prune", {"sparsity": 0.5}, model=None, weights=b"x"),
        422,
        "unknown form field\\(s\\) weights; this endpoint takes model, eval_data, train_data",
        id="http-unknown-field",
    ),
    pytest.param(
        _form("train", {}, train_data=b"a\n1\n", model=b"x"),
        422,
        "unknown form field\\(s\\) model",
        id="http-model-sent-to-train",
    ),
    pytest.param(
        _raw(
            "POST",
            "/v1/jobs/prune",
            data={"model": "not a file", "params": "{}"},
            files={"eval_data": ("e", b"a\n1\n")},
        ),
        422,
        "model must be a file upload, not a text field",
        id="http-model-as-text-field",
    ),
    pytest.param(
        lambda u: {
            "method": "POST",
            "url": "/v1/jobs/prune",
            "files": {"model": ("m", u.digits), "params": ("p.json", b"{}")},
        },
        422,
        "params must be a text field holding JSON, not a file",
        id="http-params-as-file",
    ),
    pytest.param(
        lambda u: {
            "method": "POST",
            "url": "/v1/jobs/prune",
            "files": [("model", ("a", u.digits)), ("model", ("b", u.digits))],
        },
        422,
        "form field\\(s\\) model sent more than once",
        id="http-model-twice",
    ),
    pytest.param(
        lambda u: {
            "method": "POST",
            "url": "/v1/jobs/prune",
            "files": [
                (name, (name, b"x")) for name in ("model", "eval_data", "train_data", "extra")
            ],
        },
        400,
        "Too many files",
        id="http-too-many-files",
    ),
    pytest.param(
        _form("prune", {"sparsity": 0.5}, model=b""),
        422,
        "the model file is empty",
        id="http-empty-model",
    ),
    pytest.param(
        _form("prune", {"sparsity": 0.5}, model=None, eval_data=b""),
        422,
        "the eval_data file is empty",
        id="http-empty-eval-data",
    ),
    pytest.param(
        _form("prune", {"sparsity": 0.5}, model=bytes(UPLOAD_LIMIT + 2**20)),
        413,
        f"larger than {UPLOAD_LIMIT} bytes \\(CLIPPRUNE_MAX_UPLOAD_BYTES\\)",
        id="http-body-over-the-upload-limit",
    ),
    # query strings and paths
    pytest.param(
        _raw("POST", "/v1/jobs/prune?wait=nan", files={"model": ("m", b"x")}),
        422,
        "wait",
        id="http-wait-nan",
    ),
    pytest.param(
        _raw("POST", "/v1/jobs/prune?wait=61", files={"model": ("m", b"x")}),
        422,
        "wait: Input should be less than or equal to 60",
        id="http-wait-61",
    ),
    pytest.param(_raw("GET", "/v1/jobs?limit=0"), 422, "limit", id="http-limit-0"),
    pytest.param(_raw("GET", "/v1/jobs?limit=abc"), 422, "limit", id="http-limit-not-a-number"),
    pytest.param(
        _raw("GET", "/v1/jobs?cursor=Li4vLi4v"),
        400,
        "cursor is not one this service handed out",
        id="http-forged-cursor",
    ),
    pytest.param(
        _raw("GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd"),
        404,
        "Not Found",  # decoded, the path has slashes: no route, not even the job route
        id="http-id-encoded-dotdot",
    ),
    pytest.param(_raw("GET", "/v1/jobs/%2e%2e/report"), 404, "", id="http-id-dotdot-report"),
    pytest.param(
        _raw("DELETE", "/v1/jobs/..%2f..%2f..%2ftmp"),
        404,
        "Not Found",
        id="http-delete-encoded-slashes",
    ),
    pytest.param(
        _raw("GET", "/v1/jobs/%252e%252e%252f/model"), 404, "no job", id="http-id-double-encoded"
    ),
    pytest.param(_raw("GET", "/v1/jobs/" + "a" * 8000), 404, "no job", id="http-id-8000-chars"),
    pytest.param(
        _raw("GET", "/v1/jobs/0123456789ABCDEF0123456789ABCDEF"),
        404,
        "no job",
        id="http-id-uppercase-hex",
    ),
    pytest.param(_raw("GET", "/v1/jobs/a%00b/report.html"), 404, "no job", id="http-id-nul"),
    pytest.param(_raw("PUT", "/v1/jobs/prune"), 405, "Method Not Allowed", id="http-wrong-method"),
]


@pytest.mark.parametrize(("request_of", "status", "detail"), REFUSED)
def test_refused_at_the_edge_with_a_problem(
    client: httpx.Client, uploads: Uploads, request_of: Request, status: int, detail: str
) -> None:
    before = _job_count(client)
    response = client.request(**request_of(uploads))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert_clear(response.json(), status, detail)
    assert _job_count(client) == before  # refused before any job was made


def _job_count(client: httpx.Client) -> int:
    count, url = 0, "/v1/jobs?limit=100"
    while url:
        page = client.get(url).json()
        count += len(page["items"])
        url = page["next"]
    return count


# --- filenames: never a header, never a path ------------------------------------------------


def _multipart(disposition: bytes, content: bytes) -> dict[str, Any]:
    body = (
        b"--x\r\nContent-Disposition: form-data; " + disposition + b"\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n--x--\r\n"
    )
    return {"content": body, "headers": {"content-type": MULTIPART}}


FILENAMES = [
    pytest.param(
        b'name="model"; filename="m.onnx\r\nX-Injected: yes\r\nSet-Cookie: a=b"', id="crlf"
    ),
    pytest.param(b'name="model"; filename="m%0D%0AX-Injected: yes%0D%0A.onnx"', id="percent-crlf"),
    pytest.param(b"name=\"model\"; filename*=UTF-8''m%0D%0AX-Injected%3A%20yes", id="rfc5987-crlf"),
    pytest.param(b'name="model"; filename="../../../../../../tmp/clipprune-pwned"', id="dotdot"),
    pytest.param(b'name="model"; filename="/tmp/clipprune-pwned"', id="absolute"),
    pytest.param(b'name="model"; filename="m\x00.onnx"', id="nul"),
]


@pytest.mark.parametrize("disposition", FILENAMES)
def test_a_crafted_filename_reaches_no_header_and_no_path(
    client: httpx.Client, server: Server, uploads: Uploads, disposition: bytes
) -> None:
    response = client.post(
        "/v1/jobs/prune", params={"wait": WAIT_S}, **_multipart(disposition, uploads.digits)
    )
    assert response.status_code in {200, 400, 422}, response.text
    for name in response.headers:
        assert name.lower() not in {"x-injected", "set-cookie"}
    assert all("\r" not in value and "\n" not in value for value in response.headers.values())
    assert not Path("/tmp/clipprune-pwned").exists()
    if response.status_code == 200:
        job = response.json()
        assert response.headers["location"] == f"/v1/jobs/{job['id']}"
        assert re.fullmatch(r"[0-9a-f]{32}", job["id"])
        inputs = server.data_dir / "jobs" / job["id"] / "input"
        assert [path.name for path in inputs.iterdir()] == ["model.onnx"]
        if job["status"] == "failed":
            assert_clear(job["error"], 422, "ONNX")
        else:
            assert job["status"] == "succeeded", job
            download = client.get(job["links"]["model"])
            assert download.headers["content-disposition"] == (
                f'attachment; filename="clipprune-{job["id"]}.onnx"'
            )
    else:
        assert response.headers["content-type"] == "application/problem+json"


# --- regexes that backtrack catastrophically in Python's re ---------------------------------


@pytest.mark.parametrize(
    "pattern", [r"(a+)+$", r"(a|a)*$", r"(a|aa)+$", r"^(([a-z])+.)+[A-Z]([a-z])+$"]
)
def test_a_backtracking_regex_does_not_hang_a_worker(client: httpx.Client, pattern: str) -> None:
    model = _bias_named("a" * 60 + "!")  # 2^60 paths for a backtracking matcher
    started = time.monotonic()
    params = {"sparsity": 0.5, "include": [pattern]}
    response = submit(client, "prune", {"model": model}, params, wait=WAIT_S)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded", job["error"]
    assert time.monotonic() - started < 10


# --- and the service is still well ---------------------------------------------------------


def test_afterwards_the_service_is_ready_nothing_runs_and_a_normal_job_succeeds(
    client: httpx.Client, server: Server, uploads: Uploads
) -> None:
    # The corpus's failing jobs again, all queued at once: this test checks what they leave
    # behind whether or not the tests above ran before it.
    queued = []
    for case in FAILED_JOBS:
        files, params = case.values[0](uploads)
        queued.append(accepted_id(submit(client, _kind(files), files, params)))
    for job_id in queued:
        wait_for(client, job_id, timeout=JOB_TIMEOUT_S + WAIT_S)
    assert server.process.poll() is None
    assert client.get("/readyz").status_code == 200
    url, statuses = "/v1/jobs?limit=100", []
    while url:
        page = client.get(url).json()
        statuses += [job["status"] for job in page["items"]]
        url = page["next"]
    assert statuses and set(statuses) <= FINISHED
    files = {"model": uploads.digits, "eval_data": uploads.csv()}
    response = submit(client, "prune", files, {"sparsity": 0.5}, wait=WAIT_S)
    job = response.json()
    assert response.status_code == 200 and job["status"] == "succeeded", job
    report = client.get(job["links"]["report"]).json()
    assert report["accuracy"]["metric"] == "accuracy" and report["accuracy"]["samples"] == 100
