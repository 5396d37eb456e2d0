"""Original against compressed, in onnxruntime: a metric on labelled data, or agreement on inputs.

With labels the metric is accuracy (classification) or r2 (regression). Without labels, inputs
are generated from the model's input signature and the report measures how often the compressed
model agrees with the original.
"""

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, helper

from schemas.report import AccuracyReport, LatencyReport
from schemas.vocabulary import Task
from workers.errors import InvalidDataError, InvalidModelError, UnsupportedModelError
from workers.evaluate.data import Table, is_npz, read_csv, read_npz

GENERATED_ROWS = 256
MAX_GENERATED_ELEMENTS = 2**24
LATENCY_BATCH = 256
# Regression outputs "agree" when they differ by at most this share of the original's spread.
REGRESSION_AGREEMENT_TOLERANCE = 0.01


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list[int | None]  # None for a symbolic or missing dimension


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


def load_eval_data(path: Path, inputs: list[InputSpec], label: str | None) -> Table:
    """Feeds for the model from a CSV (one 2-D input) or an NPZ (arrays named after inputs)."""
    if is_npz(path):
        arrays = read_npz(path)
        if all(spec.name in arrays for spec in inputs):
            features = {spec.name: arrays[spec.name] for spec in inputs}
        elif len(inputs) == 1 and "X" in arrays:
            features = {inputs[0].name: arrays["X"]}
        else:
            raise InvalidDataError(
                "the NPZ file needs arrays named after the model's inputs ("
                + ", ".join(spec.name for spec in inputs)
                + ") or X for a one-input model, plus y for labels"
            )
        table = Table(features, arrays.get("y"), [])
    else:
        if len(inputs) != 1:
            raise InvalidDataError(
                f"the model has {len(inputs)} inputs; a CSV feeds only one, send an NPZ file"
            )
        width = inputs[0].shape[-1] if inputs[0].shape else None
        if label is None and width is not None:
            table = read_csv(path, "")
            columns = table.features[""].shape[1]
            if columns == width + 1:
                table = read_csv(path, None)
            elif columns != width:
                raise InvalidDataError(
                    f"the CSV has {columns} columns but input {inputs[0].name!r} takes {width} "
                    "features (plus an optional label column last)"
                )
        else:
            table = read_csv(path, label)
        table = Table({inputs[0].name: table.features[""]}, table.labels, table.columns)
    for spec in inputs:
        array = table.features[spec.name]
        table.features[spec.name] = _conform(array, spec)
    rows = {len(array) for array in table.features.values()}
    if len(rows) != 1 or (table.labels is not None and len(table.labels) not in rows):
        raise InvalidDataError("the data arrays and y must all have the same number of rows")
    return table


def _conform(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    if len(spec.shape) != array.ndim or any(
        want is not None and want != got
        for want, got in zip(spec.shape[1:], array.shape[1:], strict=False)
    ):
        raise InvalidDataError(
            f"data for input {spec.name!r} has shape {list(array.shape)}; the model expects "
            + str(["N" if dim is None else dim for dim in spec.shape])
        )
    if spec.dtype.kind in "iu" and array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise InvalidDataError(f"input {spec.name!r} takes integers; the data has fractions")
    return array.astype(spec.dtype)


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


def _predicted_class(outputs: Outputs) -> np.ndarray:
    if outputs.labels is not None:
        return outputs.labels
    assert outputs.scores is not None
    if outputs.scores.shape[1] == 1:
        return (outputs.scores[:, 0] > 0.5).astype(np.int64)
    return np.argmax(outputs.scores, axis=1)


def _is_classification(task: Task, original: Outputs, labels: np.ndarray | None) -> bool:
    if task != "auto":
        return task == "classification"
    if original.labels is not None:
        return True
    if labels is not None and labels.dtype.kind in "US":
        return True
    return original.scores is not None and original.scores.shape[1] > 1


def _same_class(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    if predicted.dtype.kind in "USO" or truth.dtype.kind in "USO":
        return predicted.astype(str) == truth.astype(str)
    return np.isclose(predicted.astype(np.float64), truth.astype(np.float64))


def _r2(predicted: np.ndarray, truth: np.ndarray) -> float:
    truth = truth.astype(np.float64).reshape(len(truth), -1)
    predicted = predicted.reshape(truth.shape)
    total = float(np.sum((truth - truth.mean(axis=0)) ** 2))
    residual = float(np.sum((truth - predicted) ** 2))
    return 1.0 - residual / total if total > 0 else 0.0


def _check_labels(labels: np.ndarray, classes: np.ndarray) -> None:
    """Labels the model cannot answer mean data for another model (or the wrong column):
    refused, rather than scored as an accuracy of 0."""
    if labels.dtype.kind in "biuf" and classes.dtype.kind in "biuf":
        known = np.isin(labels.astype(np.float64), classes.astype(np.float64))
    else:  # a CSV's 3.0 is the class "3"
        known = np.isin(_class_names(labels), _class_names(classes))
    if known.all():
        return
    unknown = ", ".join(_class_names(np.unique(labels[~known])[:5]))
    raise InvalidDataError(
        f"eval_data labels {unknown} are not among the model's classes "
        + ", ".join(_class_names(classes))
        + "; check the label column, or set task regression for a regressor"
    )


def _class_names(values: np.ndarray) -> list[str]:
    return [
        str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
        for value in values.tolist()
    ]


def compare(
    original: Outputs, compressed: Outputs, labels: np.ndarray | None, task: Task
) -> AccuracyReport:
    classification = _is_classification(task, original, labels)
    classes = original.known_classes()
    if classification and labels is not None and classes is not None:
        _check_labels(labels, classes)
    if classification:
        agree = _same_class(_predicted_class(compressed), _predicted_class(original))
    else:
        if original.scores is None or compressed.scores is None:
            raise UnsupportedModelError("regression needs a float output; set task=classification")
        spread = float(np.std(original.scores)) or 1.0
        gap = np.max(np.abs(compressed.scores - original.scores), axis=1)
        agree = gap <= REGRESSION_AGREEMENT_TOLERANCE * spread
    max_abs_diff = 0.0
    if original.scores is not None and compressed.scores is not None:
        max_abs_diff = float(np.max(np.abs(compressed.scores - original.scores)))
    agreement = float(np.mean(agree))
    if labels is None:
        metric, before, after = "agreement", 1.0, agreement
    elif classification:
        metric = "accuracy"
        before = float(np.mean(_same_class(_predicted_class(original), labels)))
        after = float(np.mean(_same_class(_predicted_class(compressed), labels)))
    else:
        if labels.dtype.kind not in "biuf":
            raise InvalidDataError("regression needs numeric labels")
        assert original.scores is not None and compressed.scores is not None
        metric, before, after = "r2", _r2(original.scores, labels), _r2(compressed.scores, labels)
    return AccuracyReport(
        metric=metric,
        original=before,
        compressed=after,
        delta=after - before,
        samples=len(agree),
        agreement=agreement,
        max_abs_diff=max_abs_diff,
    )


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
