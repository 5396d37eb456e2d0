"""Training a model from a data table: task, split, standardisation, fit, pruning, export."""

import csv
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas.params import FineTuneParams, ModelSpec, PruneParams, TrainParams, TrainPruneParams
from schemas.report import Report, TrainingReport
from schemas.vocabulary import Activation, Head, ModelType, Task
from workers.compress.finetune import fine_tune
from workers.compress.prune import (
    PruneOutcome,
    copy_model,
    float_param_count,
    float_params,
    layer_report,
    prune_model,
)
from workers.errors import InvalidDataError
from workers.evaluate.data import (
    MAX_CLASSES_AUTO,
    EvalData,
    Table,
    is_classification,
    is_npz,
    load_eval_data,
    read_table,
)
from workers.evaluate.runtime import model_inputs
from workers.graph.encoding import encode
from workers.graph.export import to_onnx
from workers.graph.load import parse_model, serialize
from workers.jobs.advice import Facts
from workers.jobs.files import EVAL_DATA, INPUT_DIR, TRAIN_DATA, upload_field
from workers.jobs.progress import Progress, epoch_progress, no_progress
from workers.jobs.report import file_report, finish, latency_pair, score_pair
from workers.nn.fit import (
    FitSettings,
    History,
    PruneTarget,
    apply_masks,
    fit,
    training_report,
    weight_masks,
)
from workers.nn.network import DTYPE, HEADS, Network, initialise

MAX_WEIGHTS = 2**27  # 512 MiB of float32, before optimizer state


@dataclass
class Split:
    x_train: np.ndarray  # raw features
    y_train: np.ndarray  # class indices, or targets [N, 1]
    x_val: np.ndarray
    y_val: np.ndarray


@dataclass
class TrainOutcome:
    network: Network
    classes: np.ndarray | None  # class values in index order; None for regression
    history: History
    split: Split
    dense_onnx: bytes  # the trained model before any final pruning step
    onnx: bytes
    structured: PruneOutcome | None = None  # prune.granularity structured: what was removed
    retraining: TrainingReport | None = None  # ... and the smaller network's training


def class_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes, indices = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise InvalidDataError("the labels hold a single class; classification needs two or more")
    if classes.dtype.kind == "f":
        fractional = classes[classes != np.round(classes)]
        if fractional.size:
            raise InvalidDataError(
                f"class labels must be integers or names; got {fractional[0]:g} "
                "(set task=regression for continuous labels)"
            )
        classes = classes.astype(np.int64)
    return indices, classes


def split_rows(rows: int, share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(rows)
    held_out = max(1, round(share * rows))
    if rows - held_out < 1:
        raise InvalidDataError(f"validation_split {share} leaves no rows to train on")
    return np.sort(order[held_out:]), np.sort(order[:held_out])


Architecture = tuple[list[int], list[Activation], Head]  # hidden sizes, their activations, head


def _linear(spec: ModelSpec, classification: bool, classes: int) -> Architecture:
    if classification:
        raise InvalidDataError(
            "model.type linear is a regressor but the labels are classes; use logistic, "
            "softmax or mlp, or set task=regression"
        )
    return [], [], "identity"


def _refuse_continuous(spec: ModelSpec, classification: bool) -> None:
    if not classification:
        raise InvalidDataError(
            f"model.type {spec.type} is a classifier but the labels are continuous; use linear "
            "or mlp, or set task=classification"
        )


def _logistic(spec: ModelSpec, classification: bool, classes: int) -> Architecture:
    _refuse_continuous(spec, classification)
    if classes != 2:
        raise InvalidDataError(
            f"model.type logistic is binary but the labels have {classes} classes; use softmax"
        )
    return [], [], "sigmoid"


def _softmax(spec: ModelSpec, classification: bool, classes: int) -> Architecture:
    _refuse_continuous(spec, classification)
    return [], [], "softmax"


def _mlp(spec: ModelSpec, classification: bool, classes: int) -> Architecture:
    hidden = list(spec.hidden)
    return hidden, [spec.activation] * len(hidden), "softmax" if classification else "identity"


# model.type -> (spec, classification?, number of classes) -> the network to build
ARCHITECTURES: dict[ModelType, Callable[[ModelSpec, bool, int], Architecture]] = {
    "linear": _linear,
    "logistic": _logistic,
    "softmax": _softmax,
    "mlp": _mlp,
}


def _fold_target_scale(network: Network, mean: np.ndarray, std: np.ndarray) -> None:
    """Training saw standardised targets; fold y = z * std + mean into the last layer."""
    network.weights[-1] *= std
    network.biases[-1] *= std
    network.biases[-1] += mean


def train_model(
    table: Table, params: TrainParams, on_epoch: Callable[[int, int], None] | None = None
) -> TrainOutcome:
    rng = np.random.default_rng(params.seed)
    features = table.features[""]
    if table.labels is None:
        raise InvalidDataError("training needs a label column")
    classification = is_classification(table.labels, params.task)
    classes = None
    if classification:
        targets, classes = class_indices(table.labels)
    else:
        if table.labels.dtype.kind not in "biuf":
            raise InvalidDataError("regression needs numeric labels; set task=classification")
        targets = table.labels.astype(DTYPE).reshape(-1, 1)
    train_rows, val_rows = split_rows(len(features), params.validation_split, rng)
    split = Split(features[train_rows], targets[train_rows], features[val_rows], targets[val_rows])

    n_classes = 0 if classes is None else len(classes)
    hidden, activations, head = ARCHITECTURES[params.model.type](
        params.model, classification, n_classes
    )
    outputs = n_classes if head == "softmax" else 1
    sizes = [features.shape[1], *hidden, outputs]
    weights = sum(a * b for a, b in itertools.pairwise(sizes))
    if weights > MAX_WEIGHTS:
        raise InvalidDataError(
            f"{features.shape[1]} features into hidden {hidden} make {weights} weights; the "
            f"limit is {MAX_WEIGHTS}: use fewer or narrower layers"
        )
    network = initialise(sizes, activations, head, rng)
    mean = split.x_train.mean(axis=0)
    std = split.x_train.std(axis=0)
    network.mean = mean.astype(DTYPE)
    network.scale = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 1.0).astype(DTYPE)

    y_train, y_val = split.y_train, split.y_val
    if head == "identity":
        y_mean, y_std = split.y_train.mean(axis=0), split.y_train.std(axis=0)
        y_std = np.where(y_std > 0, y_std, 1.0).astype(DTYPE)
        y_train, y_val = (y_train - y_mean) / y_std, (y_val - y_mean) / y_std
    elif head == "sigmoid":
        y_train, y_val = y_train.astype(DTYPE), y_val.astype(DTYPE)

    prune = params.prune
    target = (
        None
        if prune is None
        else PruneTarget(prune.sparsity, prune.threshold, prune.scope, prune.schedule)
    )
    settings = FitSettings.of(
        params,
        target if target is not None and target.schedule == "gradual" else None,
        weight_decay=params.weight_decay,
        patience=params.patience,
    )
    history = fit(
        network,
        network.standardise(split.x_train),
        y_train,
        network.standardise(split.x_val),
        y_val,
        settings,
        rng,
        on_epoch=on_epoch,
    )
    if head == "identity":
        _fold_target_scale(network, y_mean.astype(DTYPE), y_std)
    dense = to_onnx(network, classes)
    if prune is not None and prune.granularity == "structured":
        return _structured(TrainOutcome(network, classes, history, split, dense, dense), params)
    if target is not None and target.schedule == "one_shot":
        apply_masks(network, weight_masks(network, target, target.sparsity))
    return TrainOutcome(network, classes, history, split, dense, to_onnx(network, classes))


def _structured(outcome: TrainOutcome, params: TrainParams) -> TrainOutcome:
    """Remove hidden neurons from the trained model as a structured prune job does, then
    train the smaller network again on the same split (Han et al. 2015: prune, retrain), by
    the fine-tuning a prune job runs: the job's epochs, learning rate, batch size, optimizer,
    clipping and patience; fine-tuning has no weight decay and its own seed."""
    prune = params.prune
    assert prune is not None
    settings = FineTuneParams(
        epochs=params.epochs,
        learning_rate=params.learning_rate,
        batch_size=params.batch_size,
        optimizer=params.optimizer,
        clip=params.clip,
        patience=params.patience,
    )
    prune_params = PruneParams(
        sparsity=prune.sparsity,
        threshold=prune.threshold,
        scope=prune.scope,
        granularity="structured",
        fine_tune=settings,
    )
    original = parse_model(outcome.dense_onnx)
    structured = prune_model(copy_model(original), prune_params)
    split, classes = outcome.split, outcome.classes

    def data(x: np.ndarray, y: np.ndarray) -> EvalData:
        """Rows as the exported model takes them, labels as its outputs name them."""
        labels = classes[y] if classes is not None else y[:, 0]  # class values, or targets
        return EvalData([{"X": x.astype(np.float32)}], labels)

    retraining = fine_tune(
        original, structured, prune_params, data(split.x_train, split.y_train),
        data(split.x_val, split.y_val),
    )  # fmt: skip
    outcome.onnx = serialize(structured.model)
    outcome.structured, outcome.retraining = structured, retraining
    return outcome


def run_train_job(job_dir: Path, params: TrainParams, progress: Progress = no_progress) -> Report:
    """Train on input/train_data; evaluate on input/eval_data, else on the held-out split."""
    inputs = job_dir / INPUT_DIR
    progress("loading", 0.0)
    with upload_field("train_data"):
        table = read_table(inputs / TRAIN_DATA, params.label)
    progress("training", 0.05)
    outcome = train_model(table, params, epoch_progress(progress, 0.05, 0.85))

    progress("evaluating", 0.85)
    notes = []
    eval_path = inputs / EVAL_DATA
    dense = parse_model(outcome.dense_onnx)
    if eval_path.exists():
        with upload_field("eval_data"):
            evaluation = load_eval_data(eval_path, model_inputs(dense), params.label)
    else:
        split = outcome.split
        labels = outcome.classes[split.y_val] if outcome.classes is not None else split.y_val[:, 0]
        evaluation = EvalData([{"X": split.x_val.astype(np.float32)}], labels)
        notes.append(
            f"no eval_data: accuracy is measured on the held-out {params.validation_split:.0%}"
            " of train_data"
        )
    if params.prune is None:
        notes.append("no prune: original and compressed are the same trained model")
    elif params.prune.schedule == "gradual":
        notes.append(
            "gradual pruning: the model was pruned while it trained, so no dense model exists; "
            "original and compressed are the same pruned model"
        )
    compressed, encoding_notes = _encoded(outcome, params.prune)
    notes += encoding_notes
    task = "classification" if outcome.classes is not None else "regression"
    accuracy = score_pair(outcome.dense_onnx, compressed, evaluation, "auto", task)
    latency = latency_pair(outcome.dense_onnx, compressed, evaluation.runs[0])
    layers = [
        layer_report(f"W{index}", tuple(w.shape), w)
        for index, w in enumerate(outcome.network.weights)
    ]
    if outcome.structured is not None:
        layers = outcome.structured.layers
        notes += outcome.structured.notes
        notes.append(_retraining_note(outcome))
    params_before = float_param_count(dense)
    _, nonzero_after = float_params(parse_model(outcome.onnx))  # before int8 hides the floats
    size, onnx_facts = file_report(outcome.dense_onnx, compressed, params_before, nonzero_after)
    report = Report(
        kind="train",
        size=size,
        layers=layers,
        accuracy=accuracy,
        latency_ms=latency,
        onnx=onnx_facts,
        training=training_report(HEADS[outcome.network.head].metric, params.clip, outcome.history),
        groups=outcome.structured.groups if outcome.structured is not None else None,
        notes=notes,
    )
    progress("writing", 0.95)
    return finish(job_dir, compressed, report, progress, _facts(inputs, params, table, outcome))


def _retraining_note(outcome: TrainOutcome) -> str:
    retraining = outcome.retraining
    assert retraining is not None
    stopped = " (stopped early)" if retraining.stopped_early else ""
    return (
        "structured: hidden neurons removed after training, then the smaller network trained "
        f"again for {len(retraining.validation)} epochs{stopped}; best validation "
        f"{retraining.metric} {max(retraining.validation, default=0.0):.4f}"
    )


def _encoded(outcome: TrainOutcome, prune: TrainPruneParams | None) -> tuple[bytes, list[str]]:
    """The trained model stored as prune.encoding asks, and the encoder's notes."""
    if prune is None or prune.encoding == "dense":
        return outcome.onnx, []
    pruned = {f"W{index}" for index in range(len(outcome.network.weights))}  # to_onnx's names
    return encode(parse_model(outcome.onnx), prune.encoding, pruned)


def _facts(inputs: Path, params: TrainParams, table: Table, outcome: TrainOutcome) -> Facts:
    """What the advice needs to know of the data: the label column, the task and why."""
    label, label_reason = _label_column(inputs / TRAIN_DATA, params.label)
    classes = 0 if outcome.classes is None else len(outcome.classes)
    assert table.labels is not None  # train_model refused a table without
    return Facts(
        params,
        label=label,
        label_reason=label_reason,
        task_reason=_task_reason(table.labels, params.task),
        rows=table.rows,
        classes=classes,
    )


def _label_column(path: Path, label: str | None) -> tuple[str, str]:
    if label is not None:
        return label, "asked"
    if is_npz(path):
        return "y", "the NPZ's labels"
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as file:
        header = next(csv.reader(file))  # read_table has read it: it is there
    return header[-1], "the last column; set label to choose another"


def _task_reason(labels: np.ndarray, task: Task) -> str:
    if task != "auto":
        return "asked"
    if labels.dtype.kind in "US":
        return "task auto: the labels are names"
    distinct = len(np.unique(labels))
    if np.any(labels.astype(np.float64) % 1 != 0):
        return "task auto: the labels have fractions"
    bound = "more than" if distinct > MAX_CLASSES_AUTO else "at most"
    return f"task auto: {distinct} distinct integer labels, {bound} {MAX_CLASSES_AUTO}"
