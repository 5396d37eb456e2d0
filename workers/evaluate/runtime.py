"""Running models in onnxruntime: sessions, the model's inputs, generated inputs, outputs as
arrays, latency.

A sample is one row of an output's first axis in one run (a scalar output is one sample per
run); the outputs of several runs are joined along that axis. Eval data in the usual layout,
[N, ...] with the batch first, gives N samples per output.
"""

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, helper

from schemas.report import LatencyReport
from workers.errors import (
    InputError,
    InvalidDataError,
    InvalidModelError,
    UnsupportedModelError,
    first_line,
    one_line,
    onnxruntime_reason,
)
from workers.evaluate.data import InputSpec

GENERATED_ROWS = 64  # a check that the model runs, not a measurement: few rows do
MAX_GENERATED_ELEMENTS = 2**24  # all generated inputs together
# Elements of the inputs of one run: a model's activations grow with its inputs' rows (a conv
# net's are tens of times its input), so an image model runs a few rows at a time where a
# 4096-wide MLP runs all 64 at once.
MAX_RUN_ELEMENTS = 2**20
LATENCY_RUNS = 30
# Below this many runs a session does not lay its weights out ahead (session's `prepack`): on
# a 270 MB model the layout took 0.45 s of a session's 1.15 s, and four runs do not win it back.
PREPACK_MIN_RUNS = 4
LATENCY_BUDGET_S = 2.0

Feeds = dict[str, np.ndarray]
# A model as onnxruntime opens it: bytes in memory, or a file it reads itself (which peaks
# lower: no Python copy of the bytes beside its own).
ModelSource = bytes | Path


class NotMeasurable(Exception):
    """Inputs cannot be generated for this model: the reason says what to send instead."""


def model_inputs(model: ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds (initializers listed as inputs are defaults, not inputs)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise UnsupportedModelError(f"input {value.name!r} is not a tensor")
        tensor_type = value.type.tensor_type
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(
                dim.dim_value if dim.HasField("dim_value") and dim.dim_value >= 0 else None
                for dim in tensor_type.shape.dim
            )
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedModelError(
                f"input {value.name!r} has element type {tensor_type.elem_type}, which has no "
                "NumPy equivalent"
            ) from exc
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


NO_KERNEL = "Could not find an implementation for"
NO_KERNEL_ADVICE = (
    "this onnxruntime has no kernel for that operator at the model's opset: convert the model "
    "to a newer opset (onnx.version_converter) or export it again"
)


def session(model: ModelSource, prepack: bool = True) -> ort.InferenceSession:
    """`prepack`: onnxruntime lays MatMul and Gemm weights out for its kernels once, when the
    session is built, which pays off over many runs and is what a deployment does; for a few
    runs it costs more than it saves, and holds a second copy of the weights meanwhile."""
    options = ort.SessionOptions()
    # One thread: latency figures compare the two models, not the machine's load.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors on a bad model
        reason = first_line(onnxruntime_reason(exc))
        if reason.startswith(NO_KERNEL):  # an operator at an opset onnxruntime dropped
            reason += f"; {NO_KERNEL_ADVICE}"
        raise InvalidModelError(one_line(f"onnxruntime cannot load the model: {reason}")) from exc


@dataclass(frozen=True)
class Generated:
    """How many rows the generated inputs have in all, and per run."""

    rows: int
    batch: int


def _generated_size(inputs: list[InputSpec]) -> Generated:
    """Every dim known but at most one (the batch), which gets as many rows as fit the cap on
    all the generated inputs together, run `batch` rows at a time (MAX_RUN_ELEMENTS); inputs
    without a batch dim run once."""
    per_row = fixed = 0
    for spec in inputs:
        if spec.shape is None:
            raise NotMeasurable(f"input {spec.name!r} declares no shape")
        if 0 in spec.shape:
            raise NotMeasurable(f"input {spec.name!r} declares a zero-size dim {spec.described}")
        unknown = sum(dim is None for dim in spec.shape)
        if unknown > 1:
            raise NotMeasurable(f"input {spec.name!r} has {unknown} unknown dims {spec.described}")
        known = math.prod(dim for dim in spec.shape if dim is not None)
        if unknown:
            per_row += known
        else:
            fixed += known
    rows = min(GENERATED_ROWS, (MAX_GENERATED_ELEMENTS - fixed) // max(per_row, 1))
    if rows < 1:
        raise NotMeasurable(f"the inputs need more than {MAX_GENERATED_ELEMENTS} elements together")
    if not per_row:
        return Generated(rows=rows, batch=rows)
    return Generated(rows=rows, batch=max(1, min(rows, (MAX_RUN_ELEMENTS - fixed) // per_row)))


def _generated_feeds(inputs: list[InputSpec], rows: int, rng: np.random.Generator) -> Feeds:
    feeds = {}
    for spec in inputs:
        shape = tuple(rows if dim is None else dim for dim in spec.shape or ())
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iub":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        else:
            raise NotMeasurable(f"input {spec.name!r} has type {spec.dtype}")
    return feeds


def generated_runs(inputs: list[InputSpec], seed: int = 0) -> list[Feeds]:
    """Random inputs where they mean something: floats standard normal, integers and booleans
    0 or 1 (an integer may be an index or a length: larger values may be out of range), every
    dim declared but one batch dim; in runs sized from the inputs (_generated_size). Else
    NotMeasurable."""
    size = _generated_size(inputs)
    rng = np.random.default_rng(seed)
    return [
        _generated_feeds(inputs, min(size.batch, size.rows - start), rng)
        for start in range(0, size.rows, size.batch)
    ]


def _as_array(output: object) -> tuple[np.ndarray, np.ndarray | None]:
    """An onnxruntime output as an array, and ZipMap's class keys: its [{class: probability}]
    becomes [N, classes]."""
    if isinstance(output, list) and output and isinstance(output[0], dict):
        keys = sorted(output[0])
        rows = [[row[key] for key in keys] for row in output]
        return np.array(rows, dtype=np.float64), np.array(keys)
    return np.asarray(output), None


@dataclass
class Outputs:
    """A model's outputs by name, each [samples, ...] over every run (module docstring)."""

    values: dict[str, np.ndarray]
    classes: np.ndarray | None = None  # every class the model can answer, when ZipMap tells


def outputs(model: ModelSource, runs: list[Feeds]) -> Outputs:
    """The model's outputs on `runs`, from a session built for that many runs and let go."""
    return run(session(model, prepack=len(runs) >= PREPACK_MIN_RUNS), runs)


def compressed_outputs(model: ModelSource, runs: list[Feeds]) -> Outputs:
    """`outputs` of a model clipprune wrote, on inputs its original ran on: one that does not
    load or run there is clipprune's defect, never the caller's, so it fails the job as one (a
    RuntimeError) rather than as a 4xx blaming the caller's file, or a note beside a broken
    file in the check on generated inputs."""
    try:
        return outputs(model, runs)
    except InputError as exc:
        raise RuntimeError(f"the compressed model fails where the original runs: {exc}") from exc


def run(sess: ort.InferenceSession, runs: list[Feeds]) -> Outputs:
    names = [output.name for output in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    classes = None
    for feeds in runs:
        try:
            raw = sess.run(None, feeds)
        except Exception as exc:  # onnxruntime's errors are untyped; the message says what failed
            raise InvalidDataError(
                f"onnxruntime could not run the model on this data: {first_line(exc)}"
            ) from exc
        for name, output in zip(names, raw, strict=True):
            value, keys = _as_array(output)
            classes = keys if keys is not None else classes
            parts[name].append(value.reshape(1) if value.ndim == 0 else value)
    values = {}
    for name, arrays in parts.items():
        shapes = {array.shape[1:] for array in arrays}
        if len(shapes) > 1:  # a detector's box count, say: runs cannot be joined sample-wise
            raise UnsupportedModelError(
                f"output {name!r} changes shape between runs ({len(shapes)} shapes); send the "
                "eval data as one run"
            )
        values[name] = np.concatenate(arrays)
    return Outputs(values, classes)


def _run_ms(sess: ort.InferenceSession, feeds: Feeds) -> float:
    start = time.perf_counter()
    sess.run(None, feeds)
    return (time.perf_counter() - start) * 1000


def latency_p50_ms(
    sess: ort.InferenceSession, feeds: Feeds, runs: int | None = None
) -> tuple[float, int]:
    """Median wall time of sess.run on `feeds` after one warm-up run, and the runs timed:
    `runs` of them, or up to LATENCY_RUNS within LATENCY_BUDGET_S (at least 3)."""
    sess.run(None, feeds)
    if runs is not None:
        times = [_run_ms(sess, feeds) for _ in range(runs)]
    else:
        times = []
        deadline = time.perf_counter() + LATENCY_BUDGET_S
        while len(times) < LATENCY_RUNS and (len(times) < 3 or time.perf_counter() < deadline):
            times.append(_run_ms(sess, feeds))
    return statistics.median(times), len(times)


def latency(original: ModelSource, compressed: ModelSource, feeds: Feeds) -> LatencyReport:
    """Both models on the same feeds (the first run of the eval inputs), the compressed one
    timed as many runs as the original was; one session at a time, each let go before the
    next is built."""
    original_ms, runs = latency_p50_ms(session(original), feeds)
    compressed_ms, _ = latency_p50_ms(session(compressed), feeds, runs)
    first = next(iter(feeds.values()), np.empty(()))
    return LatencyReport(
        original=original_ms,
        compressed=compressed_ms,
        batch=len(first) if first.ndim else 1,
        runs=runs,
    )
