"""Running models in onnxruntime: sessions, the model's inputs, generated feeds, outputs as
arrays, latency."""

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, helper

from schemas.report import LatencyReport
from workers.errors import InvalidDataError, InvalidModelError, UnsupportedModelError
from workers.evaluate.data import InputSpec

GENERATED_ROWS = 256
MAX_GENERATED_ELEMENTS = 2**24
LATENCY_BATCH = 256


def model_inputs(model: ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds (initializers listed as inputs are defaults, not inputs)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise UnsupportedModelError(f"input {value.name!r} is not a tensor")
        dims = [
            dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim
        ]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One thread: latency figures compare the two models, not the machine's load.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors on a bad model
        raise InvalidModelError(f"onnxruntime cannot load the model: {exc}") from exc


def generated_feeds(inputs: list[InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the signature: the first symbolic dimension is the batch."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = [
            dim if dim is not None else (GENERATED_ROWS if axis == 0 else 1)
            for axis, dim in enumerate(spec.shape)
        ]
        if math.prod(shape) > MAX_GENERATED_ELEMENTS:
            raise UnsupportedModelError(
                f"input {spec.name!r} of shape {shape} is too large to generate; send eval_data"
            )
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 10, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise UnsupportedModelError(
                f"input {spec.name!r} has type {spec.dtype}; inputs cannot be generated for it, "
                "send eval_data"
            )
    return feeds


def _as_array(output: object) -> np.ndarray:
    """An onnxruntime output as an array; ZipMap's [{class: probability}] becomes [N, classes]."""
    if isinstance(output, list) and output and isinstance(output[0], dict):
        keys = sorted(output[0])
        return np.array([[row[key] for key in keys] for row in output], dtype=np.float64)
    return np.asarray(output)


@dataclass
class Outputs:
    scores: np.ndarray | None  # first float output, [N, k]
    labels: np.ndarray | None  # first integer or string output, [N]
    classes: np.ndarray | None = None  # every class the model can answer, when it tells

    def known_classes(self) -> np.ndarray | None:
        """ZipMap's keys; else, for a model whose class is the top score, the column indices."""
        if self.classes is not None or self.labels is not None or self.scores is None:
            return self.classes
        return np.arange(max(2, self.scores.shape[1]))


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Outputs:
    try:
        raw = sess.run(None, feeds)
    except Exception as exc:  # onnxruntime's errors are untyped; the message says what failed
        raise InvalidDataError(f"onnxruntime could not run the model on this data: {exc}") from exc
    scores = labels = classes = None
    for output in raw:
        if isinstance(output, list) and output and isinstance(output[0], dict):
            classes = np.array(sorted(output[0]))
        value = np.atleast_1d(_as_array(output))
        if value.dtype.kind == "f" and scores is None:
            scores = value.reshape(len(value), -1).astype(np.float64)
        elif value.dtype.kind in "iuUSO" and labels is None and value.size == len(value):
            labels = value.reshape(-1)
    if scores is None and labels is None:
        raise UnsupportedModelError("the model has no tensor output to compare")
    return Outputs(scores, labels, classes)


def latency_p50_ms(
    sess: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int = 30, budget_s: float = 2.0
) -> float:
    """Median wall time of sess.run on `feeds`, after one warm-up run."""
    sess.run(None, feeds)
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < runs and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def latency(
    original: ort.InferenceSession, compressed: ort.InferenceSession, feeds: dict[str, np.ndarray]
) -> LatencyReport:
    batch = {name: array[:LATENCY_BATCH] for name, array in feeds.items()}
    return LatencyReport(
        original=latency_p50_ms(original, batch),
        compressed=latency_p50_ms(compressed, batch),
        batch=len(next(iter(batch.values()))),
    )
