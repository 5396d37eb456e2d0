"""Scoring original against compressed: the metric the report shows, and agreement.

With labels the metric is accuracy (classification) or r2 (regression). Without labels it is
agreement: the share of samples where the compressed model answers as the original does (equal
top-1 class, or outputs within 1% of the original's spread).
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from schemas.report import AccuracyReport
from schemas.vocabulary import Metric, Task
from workers.errors import InvalidDataError, UnsupportedModelError
from workers.evaluate.runtime import Outputs

# Regression outputs "agree" when they differ by at most this share of the original's spread.
REGRESSION_AGREEMENT_TOLERANCE = 0.01


def _predicted_class(outputs: Outputs) -> np.ndarray:
    if outputs.labels is not None:
        return outputs.labels
    assert outputs.scores is not None
    if outputs.scores.shape[1] == 1:
        return (outputs.scores[:, 0] > 0.5).astype(np.int64)
    return np.argmax(outputs.scores, axis=1)


def _auto_task(original: Outputs, labels: np.ndarray | None) -> bool:
    """Classification when the model outputs labels, the labels are names, or the scores have
    a column per class."""
    if original.labels is not None:
        return True
    if labels is not None and labels.dtype.kind in "US":
        return True
    return original.scores is not None and original.scores.shape[1] > 1


# task -> (original outputs, labels) -> is it classification?
TASKS: dict[Task, Callable[[Outputs, np.ndarray | None], bool]] = {
    "auto": _auto_task,
    "classification": lambda original, labels: True,
    "regression": lambda original, labels: False,
}


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


@dataclass(frozen=True)
class Truth:
    """What a model's outputs are scored against."""

    labels: np.ndarray | None
    original: Outputs  # the original model's outputs on the same inputs
    classification: bool


def agrees(outputs: Outputs, truth: Truth) -> np.ndarray:
    """Per sample: does `outputs` answer as the original does? Equal top-1 class for
    classification; for regression, every output within 1% of the original's spread."""
    original = truth.original
    if truth.classification:
        return _same_class(_predicted_class(outputs), _predicted_class(original))
    if original.scores is None or outputs.scores is None:
        raise UnsupportedModelError("regression needs a float output; set task=classification")
    spread = float(np.std(original.scores)) or 1.0
    gap = np.max(np.abs(outputs.scores - original.scores), axis=1)
    return gap <= REGRESSION_AGREEMENT_TOLERANCE * spread


def agreement(outputs: Outputs, truth: Truth) -> float:
    return float(np.mean(agrees(outputs, truth)))


def accuracy(outputs: Outputs, truth: Truth) -> float:
    assert truth.labels is not None
    return float(np.mean(_same_class(_predicted_class(outputs), truth.labels)))


def r2(outputs: Outputs, truth: Truth) -> float:
    assert truth.labels is not None
    if truth.labels.dtype.kind not in "biuf":
        raise InvalidDataError("regression needs numeric labels")
    if outputs.scores is None:
        raise UnsupportedModelError("regression needs a float output; set task=classification")
    return _r2(outputs.scores, truth.labels)


METRICS: dict[Metric, Callable[[Outputs, Truth], float]] = {
    "accuracy": accuracy,
    "r2": r2,
    "agreement": agreement,
}


def chosen_metric(truth: Truth) -> Metric:
    """accuracy or r2 with labels, else agreement with the original."""
    if truth.labels is None:
        return "agreement"
    return "accuracy" if truth.classification else "r2"


def compare(
    original: Outputs, compressed: Outputs, labels: np.ndarray | None, task: Task
) -> AccuracyReport:
    truth = Truth(labels, original, TASKS[task](original, labels))
    classes = original.known_classes()
    if truth.classification and labels is not None and classes is not None:
        _check_labels(labels, classes)
    agree = agrees(compressed, truth)
    max_abs_diff = 0.0
    if original.scores is not None and compressed.scores is not None:
        max_abs_diff = float(np.max(np.abs(compressed.scores - original.scores)))
    metric = chosen_metric(truth)
    before, after = METRICS[metric](original, truth), METRICS[metric](compressed, truth)
    return AccuracyReport(
        metric=metric,
        original=before,
        compressed=after,
        delta=after - before,
        samples=len(agree),
        agreement=float(np.mean(agree)),
        max_abs_diff=max_abs_diff,
    )
