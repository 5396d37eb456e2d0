"""Scoring the compressed model against the original, output by output.

Every output is scored. With labels (and metric auto, accuracy or r2) the prediction output (the
first label output, else the first float output) is scored against them, accuracy for
classification and r2 for regression, and decides the job's figure. Otherwise each output is
scored against the original's on the same inputs, and the output that lost the most decides.
metric=auto picks per output and says why: exact_match for integer, bool and string outputs,
top1_agreement for class probabilities [N, C], relative_error for one value per sample, cosine
(mean per sample) for other float outputs: embeddings, feature maps, detections, sequences.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from schemas.report import AccuracyReport, OutputScore
from schemas.vocabulary import Metric, MetricChoice, Task
from workers.errors import InvalidDataError, UnsupportedModelError, cut_list
from workers.evaluate.runtime import Outputs

COSINE_AGREES = 0.99  # a sample agrees under cosine when its similarity is at least this
# Values agree when they differ by at most this share of the original's spread.
VALUE_AGREEMENT_TOLERANCE = 0.01
PROBABILITY_SLACK = 1e-3  # rows of class probabilities sum to 1 within this


def _rows(value: np.ndarray) -> np.ndarray:
    """An output as [samples, features]."""
    return value.reshape(len(value), -1)


def _floats(value: np.ndarray) -> np.ndarray:
    return _rows(value).astype(np.float64)


def _predicted_class(value: np.ndarray) -> np.ndarray:
    """The class each sample is given: a label output as it is, else the top score (one
    column: a probability of class 1)."""
    if value.dtype.kind in "iuUSOb" and _rows(value).shape[1] == 1:
        return value.reshape(-1)
    scores = _floats(value)
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0.5).astype(np.int64)
    return np.argmax(scores, axis=1)


def _same_class(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    if predicted.dtype.kind in "USO" or truth.dtype.kind in "USO":
        return predicted.astype(str) == truth.astype(str)
    return np.isclose(predicted.astype(np.float64), truth.astype(np.float64))


def _cosines(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarity; two zero vectors are alike, one zero vector is not."""
    a, b = _floats(out), _floats(ref)
    dot = np.sum(a * b, axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.clip(np.where(both_zero, 1.0, cosine), -1.0, 1.0)  # rounding can pass 1


def _close_values(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per sample: every value within 1% of the reference's spread."""
    a, b = _floats(out), _floats(ref)
    spread = float(np.std(b)) or 1.0
    return np.max(np.abs(a - b), axis=1) <= VALUE_AGREEMENT_TOLERANCE * spread


def _equal_rows(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    if out.dtype.kind in "USO" or ref.dtype.kind in "USO":
        return np.all(_rows(out).astype(str) == _rows(ref).astype(str), axis=1)
    return np.all(_rows(out) == _rows(ref), axis=1)


def _relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    a, b = _floats(out), _floats(ref)
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))


def _r2(out: np.ndarray, labels: np.ndarray) -> float:
    if labels.dtype.kind not in "biuf":
        raise InvalidDataError("regression needs numeric labels")
    truth = labels.astype(np.float64).reshape(len(labels), -1)
    if out.dtype.kind != "f" or out.size != truth.size:
        raise UnsupportedModelError("r2 needs a float output with one value per label")
    predicted = out.astype(np.float64).reshape(truth.shape)
    total = float(np.sum((truth - truth.mean(axis=0)) ** 2))
    residual = float(np.sum((truth - predicted) ** 2))
    return 1.0 - residual / total if total > 0 else 0.0


@dataclass(frozen=True)
class MetricRule:
    """How one metric scores an output against a reference (labels or the original's output),
    and when a sample counts as agreeing with the original's."""

    score: Callable[[np.ndarray, np.ndarray], float]
    agrees: Callable[[np.ndarray, np.ndarray], np.ndarray]
    higher_is_better: bool = True
    labelled: bool = False  # scored against labels, not against the original's output


def _top1_agrees(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return _predicted_class(out) == _predicted_class(ref)


METRICS: dict[Metric, MetricRule] = {
    "accuracy": MetricRule(
        lambda out, labels: float(np.mean(_same_class(_predicted_class(out), labels))),
        lambda out, ref: _same_class(_predicted_class(out), _predicted_class(ref)),
        labelled=True,
    ),
    "r2": MetricRule(_r2, _close_values, labelled=True),
    "top1_agreement": MetricRule(
        lambda out, ref: float(np.mean(_top1_agrees(out, ref))), _top1_agrees
    ),
    "cosine": MetricRule(
        lambda out, ref: float(np.mean(_cosines(out, ref))),
        lambda out, ref: _cosines(out, ref) >= COSINE_AGREES,
    ),
    "relative_error": MetricRule(_relative_error, _close_values, higher_is_better=False),
    "mse": MetricRule(
        lambda out, ref: float(np.mean((_floats(out) - _floats(ref)) ** 2)),
        _close_values,
        higher_is_better=False,
    ),
    "exact_match": MetricRule(lambda out, ref: float(np.mean(_equal_rows(out, ref))), _equal_rows),
}


def _is_probabilities(value: np.ndarray) -> bool:
    rows = _floats(value)
    if rows.shape[1] < 2 or not np.isfinite(rows).all():
        return False
    in_range = bool(np.all((rows >= -PROBABILITY_SLACK) & (rows <= 1 + PROBABILITY_SLACK)))
    return in_range and bool(np.all(np.abs(rows.sum(axis=1) - 1) <= PROBABILITY_SLACK))


def auto_metric(value: np.ndarray) -> tuple[Metric, str]:
    """The metric auto gives an output of the original model, and why."""
    if value.dtype.kind != "f":
        return "exact_match", f"{value.dtype} output: values must match exactly"
    if _is_probabilities(value):
        return "top1_agreement", f"class probabilities [N, {_rows(value).shape[1]}]: top-1 class"
    if _rows(value).shape[1] == 1:
        return "relative_error", "one value per sample: relative error of all values"
    shape = "[N, " + ", ".join(map(str, value.shape[1:])) + "]"
    return "cosine", f"float output {shape}: mean per-sample cosine similarity"


def _auto_task(prediction: np.ndarray, labels: np.ndarray) -> bool:
    """Classification when the prediction is a label output, the labels are names, or the
    scores have a column per class."""
    if prediction.dtype.kind != "f" or labels.dtype.kind in "US":
        return True
    return _rows(prediction).shape[1] > 1


# task -> (prediction output, labels) -> is it classification?
TASKS: dict[Task, Callable[[np.ndarray, np.ndarray], bool]] = {
    "auto": _auto_task,
    "classification": lambda prediction, labels: True,
    "regression": lambda prediction, labels: False,
}


def prediction_output(outputs: Outputs) -> str:
    """The output labels are scored on: the first with one integer or string per sample, else
    the first float output."""
    for name, value in outputs.values.items():
        if value.dtype.kind in "iuUSO" and _rows(value).shape[1] == 1:
            return name
    for name, value in outputs.values.items():
        if value.dtype.kind == "f":
            return name
    raise UnsupportedModelError("the model has no output labels can be scored on")


def _class_names(values: np.ndarray) -> list[str]:
    return [
        str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
        for value in values.tolist()
    ]


def _check_labels(labels: np.ndarray, prediction: np.ndarray, outputs: Outputs) -> None:
    """Labels the model cannot answer mean data for another model (or the wrong column):
    refused, rather than scored as an accuracy of 0."""
    classes = outputs.classes
    if classes is None and prediction.dtype.kind == "f":
        classes = np.arange(max(2, _rows(prediction).shape[1]))
    if classes is None:
        return
    if labels.dtype.kind in "biuf" and classes.dtype.kind in "biuf":
        known = np.isin(labels.astype(np.float64), classes.astype(np.float64))
    else:  # a CSV's 3.0 is the class "3"
        known = np.isin(_class_names(labels), _class_names(classes))
    if known.all():
        return
    unknown = ", ".join(_class_names(np.unique(labels[~known])[:5]))
    raise InvalidDataError(
        cut_list(
            f"eval_data labels {unknown} are not among the model's classes ",
            _class_names(classes),
            "; check the label column, or set task regression for a regressor",
        )
    )


@dataclass(frozen=True)
class Scoring:
    """How each output of a model is scored; decided once, from the original's outputs."""

    metrics: dict[str, tuple[Metric, str]]  # output name -> (metric, why)
    decides: str | None  # the output whose score is the job's figure; None: the worst
    labels: np.ndarray | None


def plan_scoring(
    original: Outputs, labels: np.ndarray | None, metric: MetricChoice, task: Task
) -> Scoring:
    """Which metric each output gets (see the module docstring)."""
    for name, value in original.values.items():
        if value.size == 0:
            raise UnsupportedModelError(
                f"output {name!r} is empty (shape {list(value.shape)}): there is nothing to score"
            )
    plan = {name: auto_metric(value) for name, value in original.values.items()}
    labelled = metric in ("accuracy", "r2") or (metric == "auto" and labels is not None)
    if labelled:
        if labels is None:
            raise InvalidDataError(f"metric {metric} needs labels: add y (NPZ) or a label column")
        name = prediction_output(original)
        prediction = original.values[name]
        if len(_rows(prediction)) != len(labels):
            raise InvalidDataError(
                f"eval_data has {len(labels)} labels but output {name!r} gives "
                f"{len(_rows(prediction))} samples"
            )
        classification = metric == "accuracy" or (
            metric == "auto" and TASKS[task](prediction, labels)
        )
        if classification:
            _check_labels(labels, prediction, original)
        chosen: Metric = "accuracy" if classification else "r2"
        task_word = "classes" if classification else "values"
        why = "asked" if metric != "auto" else f"labels given ({task_word})"
        plan[name] = (chosen, why)
        return Scoring(plan, name, labels)
    if metric != "auto":
        plan = {name: (metric, "asked") for name in original.values}
    return Scoring(plan, None, None)


def _loss(metric: Metric, original: float, compressed: float) -> float:
    """How much worse compressed is than original, on the metric's own scale."""
    if METRICS[metric].higher_is_better:
        return original - compressed
    return compressed - original


# Outputs may hold inf or NaN (a model with huge weights): scores then are NaN or inf, and the
# report says so; NumPy's warnings about them add nothing.
@np.errstate(all="ignore")
def score_outputs(scoring: Scoring, original: Outputs, compressed: Outputs) -> AccuracyReport:
    scores = []
    for name, (metric, why) in scoring.metrics.items():
        rule = METRICS[metric]
        ours, theirs = original.values[name], compressed.values[name]
        if theirs.shape != ours.shape:
            raise UnsupportedModelError(
                f"output {name!r} changed shape from {list(ours.shape)} to {list(theirs.shape)}"
            )
        reference = scoring.labels if rule.labelled else ours
        assert reference is not None
        scores.append(
            OutputScore(
                name=name,
                metric=metric,
                reason=why,
                original=rule.score(ours, reference),
                compressed=rule.score(theirs, reference),
                samples=len(_rows(ours)),
            )
        )
    decides = next(
        (score for score in scores if score.name == scoring.decides),
        max(scores, key=lambda s: _loss(s.metric, s.original, s.compressed)),
    )
    ours, theirs = original.values[decides.name], compressed.values[decides.name]
    return AccuracyReport(
        metric=decides.metric,
        output=decides.name,
        reason=decides.reason,
        original=decides.original,
        compressed=decides.compressed,
        delta=decides.compressed - decides.original,
        samples=decides.samples,
        agreement=float(np.mean(METRICS[decides.metric].agrees(theirs, ours))),
        max_abs_diff=_max_abs_diff(original, compressed),
        outputs=scores,
        collapsed=_collapsed(original, compressed),
    )


# An output whose spread across samples fell below this share of the original's is constant:
# float32 rounding of a bias passed through leaves about 1e-7 of it.
COLLAPSED_SPREAD = 1e-5


def _collapsed(original: Outputs, compressed: Outputs) -> list[str]:
    """Float outputs that vary across the original's samples and not across the compressed
    model's: top-1 agreement on eval data of one class, or a cosine on outputs dominated by a
    constant part, can read perfect for a model that answers the same to every input."""
    found = []
    for name, ours in original.values.items():
        if ours.dtype.kind != "f" or len(ours) < 2:
            continue
        spread = np.ptp(_floats(ours), axis=0).max()
        theirs = np.ptp(_floats(compressed.values[name]), axis=0).max()
        if spread > 0 and theirs <= COLLAPSED_SPREAD * spread:
            found.append(name)
    return found


def _max_abs_diff(original: Outputs, compressed: Outputs) -> float | None:
    gaps = [
        float(np.max(np.abs(compressed.values[name].astype(np.float64) - ours)))
        for name, ours in original.values.items()
        if ours.dtype.kind == "f" and ours.size
    ]
    if not gaps:
        return None
    return float("nan") if any(np.isnan(gaps)) else max(gaps)


def loss(report: AccuracyReport) -> float:
    """How much the deciding output lost: what max_accuracy_drop bounds."""
    return _loss(report.metric, report.original, report.compressed)
