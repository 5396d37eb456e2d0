"""Fine-tuning a pruned model's surviving weights with clipped gradients, masks holding pruned
weights at zero."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, NodeProto

from schemas.params import ClipParams, FineTuneParams, PruneParams
from schemas.report import TrainingReport
from schemas.vocabulary import Head
from workers.compress.prune import PruneOutcome, refresh_layers
from workers.errors import InputError, InvalidDataError, UnsupportedModelError
from workers.evaluate.data import EvalData
from workers.evaluate.metrics import METRICS
from workers.graph.executor import Executor
from workers.graph.mlp import OnnxMlp, read_mlp
from workers.graph.walk import attribute
from workers.graph.weights import all_float_constants
from workers.nn.clipping import MATMUL_UNIT_AXIS, clip_gradients
from workers.nn.fit import (
    EarlyStopping,
    EpochProgress,
    FitSettings,
    History,
    PruneTarget,
    Teacher,
    Validation,
    fit,
    training_report,
)
from workers.nn.network import (
    DTYPE,
    HEADS,
    Distillation,
    kl_distillation,
    log_softmax,
    mse_distillation,
    softmax_loss,
    two_class_logits,
)
from workers.nn.optimizers import OPTIMIZERS

# With calibrated pruning, the share of train_data fine-tuning holds back to pick its epoch by
HELD_BACK = 0.1
# The gain in validation cosine that resets the patience count (Keras' min_delta): on conv nets
# and transformers the cosine creeps up by 1e-4 an epoch for dozens of epochs, so without it
# early stopping almost never triggered and the default 100 epochs ran out (a conv-net search:
# 317 s instead of 36 s). Smaller gains still count when the best epoch is picked.
MIN_GAIN = 1e-3


def fine_tune(
    original: ModelProto,
    outcome: PruneOutcome,
    params: PruneParams,
    train: EvalData,
    validation: EvalData | None,
    on_epoch: EpochProgress | None = None,
) -> TrainingReport:
    """Train the surviving weights of the pruned model in place, with clipped gradients: MLP
    chains on the fast path below, any other graph the NumPy executor runs by fine_tune_graph.
    Both blend distillation from the original and the labels the same way (temperature, alpha).

    one_shot: the masks of the pruning step stay fixed. gradual: start again from the original
    weights and ramp sparsity up over the epochs (Zhu & Gupta), so the network adapts as it goes.
    """
    settings = params.fine_tune
    assert settings is not None
    try:
        mlp = read_mlp(outcome.model)
    except UnsupportedModelError:  # not an MLP chain: the general executor, by distillation
        return fine_tune_graph(original, outcome, settings, train, validation, on_epoch)
    network = mlp.network
    labelled = train.labels is not None
    if not labelled and network.head not in CLASS_LOGITS:
        raise InvalidDataError(
            "train_data needs labels to fine-tune a regressor on (its outputs are no class "
            "scores to distil from): add a label column"
        )
    x_train = mlp.prepare(train.stacked(mlp.input_name))
    y_train = mlp.targets(labels_or_placeholder(mlp, train, len(x_train)))
    alpha = settings.alpha if labelled else 0.0  # no labels: the original the only teacher
    source = read_mlp(original)
    # before gradual trains the source's weights: the teacher is the original as it came
    teacher = mlp_teacher(source, train, settings.temperature, alpha)
    # The epoch is picked by agreement with the original, which needs no labels, or (alpha 1, a
    # regressor) by the labels' metric: then eval_data without labels cannot pick it.
    by_agreement = teacher is not None and network.head in CLASS_LOGITS
    check = train
    if validation is not None and (by_agreement or validation.labels is not None):
        check = validation
    elif validation is not None:
        outcome.notes.append(
            "eval_data has no labels to pick fine-tuning's epoch by (alpha 1 or a regressor "
            "scores the labels): the curve is measured on train_data"
        )
    x_val = mlp.prepare(check.stacked(mlp.input_name))
    y_val = mlp.targets(labels_or_placeholder(mlp, check, len(x_val)))
    validate = mlp_agreement(source, check, settings.temperature) if by_agreement else None

    # Only the weights the pruning step chose (include/exclude) are masked or ramped.
    chosen = {layer.name for layer in outcome.layers}
    prunable = tuple(layer.weight.name in chosen for layer in mlp.layers)
    masks: list[np.ndarray] | None = [
        (w != 0).astype(DTYPE) if may else np.ones_like(w)
        for w, may in zip(network.weights, prunable, strict=True)
    ]
    target = None
    if settings.schedule == "gradual":
        if params.granularity != "unstructured" or params.sparsity is None:
            raise InputError(
                "fine_tune.schedule gradual ramps up the sparsity of single weights: use "
                "granularity unstructured with sparsity"
            )
        dense = source.network
        network.weights, network.biases = dense.weights, dense.biases
        masks = None
        target = PruneTarget(params.sparsity, None, params.scope, "gradual", prunable)
    fit_settings = FitSettings.of(
        settings, target, patience=settings.patience, min_gain=0.0 if validate is None else MIN_GAIN
    )
    history = fit(
        network,
        x_train,
        y_train,
        x_val,
        y_val,
        fit_settings,
        np.random.default_rng(0),
        masks,
        on_epoch,
        teacher,
        validate,
    )
    mlp.write_back()
    refresh_layers(outcome)
    metric = HEADS[network.head].metric if validate is None else "cosine"
    return training_report(metric, settings.clip, history)


def labels_or_placeholder(mlp: OnnxMlp, data: EvalData, rows: int) -> np.ndarray:
    """The data's labels; without any, the model's first class for every row, for a labels'
    loss weighed 0 and a labels' metric not read (distillation alone)."""
    if data.labels is not None:
        return data.labels
    return np.full(rows, mlp.classes[0] if mlp.classes is not None else 0)


def mlp_teacher(
    original: OnnxMlp, train: EvalData, temperature: float, alpha: float
) -> Teacher | None:
    """The original MLP as the teacher: its logits on the training rows, once, through its own
    preprocessing. None when alpha is 1: the labels alone, and no forward pass spent."""
    if alpha == 1:
        return None
    return Teacher(mlp_logits(original, train), temperature, alpha)


def mlp_logits(mlp: OnnxMlp, data: EvalData) -> np.ndarray:
    logits, _ = mlp.network.forward(mlp.prepare(data.stacked(mlp.input_name)))
    return logits


# An MLP head's logits as one per class, so they can be compared as softened probabilities: a
# sigmoid is the softmax of the two logits (0, z). A regressor's outputs are not classes.
CLASS_LOGITS: dict[Head, Callable[[np.ndarray], np.ndarray]] = {
    "softmax": lambda z: z,
    "sigmoid": two_class_logits,
}


def mlp_agreement(original: OnnxMlp, validation: EvalData, temperature: float) -> Validation:
    """The validation score when the original is a teacher and has class scores, as the graph
    path picks its epoch: the cosine of the class probabilities softened by the temperature to
    the original's on the validation rows. It moves with every row's scores, where accuracy
    moves in steps of one row (on 270 eval rows, 0.37 points) and the epoch that scored one row
    more was kept by chance."""
    as_classes = CLASS_LOGITS[original.network.head]
    target = softened(as_classes(mlp_logits(original, validation)), temperature)

    def agreement(logits: np.ndarray) -> float:
        return METRICS["cosine"].score(softened(as_classes(logits), temperature), target)

    return agreement


def softened(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities as the KL of distillation sees them: the logits softened by T."""
    return np.exp(log_softmax(logits / temperature))


# ---- any graph the NumPy executor runs: distillation from the original -------------------------

# Inputs whose float initializers are settings, not weights: running statistics of an inference
# BatchNormalization, Clip bounds, a Pad fill value, Resize's roi and scales.
FROZEN_INPUTS: dict[str, tuple[int, ...]] = {
    "BatchNormalization": (3, 4),
    "Clip": (1, 2),
    "Pad": (2,),
    "Resize": (1, 2),
}
# Adaptive clipping norms each output unit of a weight alone; where the units sit depends on the
# operator that reads the weight: (op, input index) -> the axis, given the node.
UNIT_AXES: dict[tuple[str, int], Callable[[NodeProto], int]] = {
    ("Conv", 1): lambda node: 0,  # [out, in / groups, kh, kw]
    ("ConvTranspose", 1): lambda node: 1,  # [in, out / groups, kh, kw]
    ("Gemm", 1): lambda node: 0 if attribute(node, "transB", 0) else 1,  # B^T [out, in] or B
    ("MatMul", 1): lambda node: -1,  # [..., in, out]
    ("MatMul", 0): lambda node: -2,  # a weight on the left, W @ x: [..., out, in]
    ("Gather", 0): lambda node: 0,  # an embedding table: a row per token
}
DISTILLATIONS: dict[str, Distillation] = {"mse": mse_distillation, "kl": kl_distillation}


def distillation_kind(teacher: np.ndarray) -> str:
    """KL for class logits ([N, C] rows that are not already probabilities), MSE otherwise."""
    if teacher.ndim != 2 or teacher.shape[1] < 2:
        return "mse"
    probabilities = np.all(teacher >= 0) and np.allclose(teacher.sum(axis=1), 1, atol=1e-3)
    return "mse" if probabilities else "kl"


def trainable_parameters(model: ModelProto, parameters: dict[str, np.ndarray]) -> list[str]:
    """The float initializers fine-tuning changes: weights, biases, norm scales. Scalars are
    exporters' constants (0.5 and √2 in GELU, 1/√d in attention), and non-finite tensors
    additive masks: both stay, as do the FROZEN_INPUTS."""
    frozen = {
        node.input[index]
        for node in model.graph.node
        for index in FROZEN_INPUTS.get(node.op_type, ())
        if index < len(node.input)
    }
    return [
        name
        for name, value in parameters.items()
        if value.size > 1 and name not in frozen and np.all(np.isfinite(value))
    ]


def unit_axes(model: ModelProto, names: list[str]) -> list[int]:
    """Per parameter, the axis of its output units as the first node reading it in UNIT_AXES
    lays them out; the MatMul layout [in, out] for any other (vectors are one unit anyway)."""
    found: dict[str, int] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            axis_of = UNIT_AXES.get((node.op_type, index))
            if axis_of is not None:
                found.setdefault(name, axis_of(node))
    return [found.get(name, MATMUL_UNIT_AXIS) for name in names]


def graph_inputs(model: ModelProto) -> list[str]:
    initialised = {tensor.name for tensor in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initialised]


def batched_forward(
    executor: Executor, inputs: dict[str, np.ndarray], batch_size: int
) -> dict[str, np.ndarray]:
    """The graph's float outputs on every sample, a batch at a time, nothing kept for backward."""
    rows = len(next(iter(inputs.values())))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, rows, batch_size):
        feeds = {name: x[start : start + batch_size] for name, x in inputs.items()}
        for name, y in executor.forward(feeds, record=False).items():
            if np.issubdtype(y.dtype, np.floating):
                parts.setdefault(name, []).append(y)
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def class_output(
    kinds: dict[str, str], teacher_outputs: dict[str, np.ndarray], labels: np.ndarray | None
) -> str | None:
    """The output labels can score: class indices in range of the model's one logits output."""
    logits = [name for name, kind in kinds.items() if kind == "kl"]
    if labels is None or len(logits) != 1 or not np.issubdtype(labels.dtype, np.integer):
        return None
    classes = teacher_outputs[logits[0]].shape[1]
    return logits[0] if labels.min() >= 0 and labels.max() < classes else None


def mean_cosine(outputs: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> float:
    return float(np.mean([METRICS["cosine"].score(outputs[n], t) for n, t in targets.items()]))


def tuning_data(
    params: PruneParams, train: EvalData, evaluation: EvalData | None
) -> tuple[EvalData, EvalData | None]:
    """(training, validation) data for fine-tuning: train_data and eval_data, except when
    pruning was calibrated on eval_data: reconstruction fitted the layers to it, so judged
    there the weights fine-tuning starts from always look best and come back unchanged; then
    a seeded HELD_BACK share of train_data is the validation instead."""
    if not params.calibrated:
        return train, evaluation
    rest, spared = held_back(train, HELD_BACK)
    return rest, spared if spared is not None else rest


def held_back(data: EvalData, share: float) -> tuple[EvalData, EvalData | None]:
    """(the rest, a seeded `share` of the rows) of batch-first inputs and their labels; None
    for the second when there are too few rows to spare one."""
    names = list(data.runs[0])
    inputs = {name: data.stacked(name) for name in names}
    rows = len(next(iter(inputs.values())))
    count = round(rows * share)
    if count < 1 or count >= rows:
        return data, None
    order = np.random.default_rng(0).permutation(rows)
    kept, spared = np.sort(order[count:]), np.sort(order[:count])

    def part(indices: np.ndarray) -> EvalData:
        labels = None if data.labels is None else data.labels[indices]
        return EvalData([{name: x[indices] for name, x in inputs.items()}], labels)

    return part(kept), part(spared)


@dataclass
class Distiller:
    """A student graph in the executor, its trainable weights and masks, and how its outputs
    are scored: each float output against the teacher's by its distillation kind, and the class
    output (if labels are used) against the labels too, weighted by `alpha`."""

    executor: Executor
    names: list[str]  # the trainable parameters, in the order of grads, masks, optimizer state
    masks: list[np.ndarray | None]  # 1 keep / 0 pruned, None for weights pruning left dense
    unit_axes: list[int]  # per trainable parameter, the axis of its output units (clipping)
    kinds: dict[str, str]  # float output -> DISTILLATIONS key
    temperature: float
    class_output: str | None = None
    alpha: float = 0.0

    @property
    def params(self) -> list[np.ndarray]:
        return [self.executor.parameters[name] for name in self.names]

    def agreement(self, outputs: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> float:
        """Mean cosine to the teacher's outputs, class logits compared as what the KL compares,
        their probabilities softened by the temperature: a row's logits shifted together
        change neither (on a conv net at 80%, the raw logits' cosine peaked at epoch 1 while the
        KL fell 600-fold and held-out accuracy rose 9 points)."""

        def compared(name: str, values: np.ndarray) -> np.ndarray:
            return softened(values, self.temperature) if self.kinds.get(name) == "kl" else values

        return mean_cosine(
            {name: compared(name, outputs[name]) for name in targets},
            {name: compared(name, values) for name, values in targets.items()},
        )

    def loss(
        self,
        outputs: dict[str, np.ndarray],
        targets: dict[str, np.ndarray],
        labels: np.ndarray | None,
    ) -> tuple[float, dict[str, np.ndarray]]:
        """The loss on a batch and its gradients at the student's outputs."""
        total, grads = 0.0, {}
        for name, kind in self.kinds.items():
            loss, grad = DISTILLATIONS[kind](outputs[name], targets[name], self.temperature)
            total, grads[name] = total + loss, grad
        if self.class_output is not None and labels is not None:
            task, d_logits = softmax_loss(outputs[self.class_output], labels)
            total = (1 - self.alpha) * total + self.alpha * task
            grads = {name: (1 - self.alpha) * g for name, g in grads.items()}
            grads[self.class_output] = grads[self.class_output] + self.alpha * d_logits
        return total, grads

    def loss_and_grads(
        self,
        feeds: dict[str, np.ndarray],
        targets: dict[str, np.ndarray],
        labels: np.ndarray | None,
    ) -> tuple[float, list[np.ndarray]]:
        loss, output_grads = self.loss(self.executor.forward(feeds), targets, labels)
        grads = self.executor.backward(output_grads)
        return loss, [grads[name] for name in self.names]

    def clipped_grads(
        self,
        feeds: dict[str, np.ndarray],
        targets: dict[str, np.ndarray],
        labels: np.ndarray | None,
        clip: ClipParams,
    ) -> tuple[float, float, list[np.ndarray], list[np.ndarray]]:
        """A batch's loss, the global gradient norm before clipping, the masked gradients and
        their clipped form: forward, backward, masks, then clipping (adaptive clipping by each
        weight's output units)."""
        loss, grads = self.loss_and_grads(feeds, targets, labels)
        self.apply_masks(grads)
        clipped, norm = clip_gradients(
            grads, clip.mode, clip.threshold, self.params, unit_axes=self.unit_axes
        )
        return loss, norm, grads, clipped

    def apply_masks(self, arrays: list[np.ndarray]) -> None:
        for array, mask in zip(arrays, self.masks, strict=True):
            if mask is not None:
                array *= mask


def distiller(
    outcome: PruneOutcome,
    teacher_outputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    temperature: float,
    alpha: float,
) -> Distiller:
    executor = Executor(outcome.model)
    names = trainable_parameters(outcome.model, executor.parameters)
    chosen = {layer.name for layer in outcome.layers}
    masks = [
        (executor.parameters[name] != 0).astype(executor.parameters[name].dtype)
        if name in chosen
        else None
        for name in names
    ]
    # decided once on all the teacher's outputs, so a batch's rows cannot change the loss
    kinds = {name: distillation_kind(y) for name, y in teacher_outputs.items()}
    scored = class_output(kinds, teacher_outputs, labels)
    if labels is not None and scored is None:
        outcome.notes.append(
            "fine-tuning distilled from the original only: the labels are not class indices"
            " for one class-score output"
        )
    axes = unit_axes(outcome.model, names)
    return Distiller(executor, names, masks, axes, kinds, temperature, scored, alpha)


def stacked_inputs(data: EvalData, names: list[str]) -> dict[str, np.ndarray]:
    return {name: data.stacked(name) for name in names}


# Overflow is detected in the loop and reported with its step; NumPy's warnings add only noise.
@np.errstate(over="ignore", invalid="ignore")
def fine_tune_graph(
    original: ModelProto,
    outcome: PruneOutcome,
    settings: FineTuneParams,
    train: EvalData,
    validation: EvalData | None,
    on_epoch: EpochProgress | None = None,
) -> TrainingReport:
    """Fine-tune the pruned graph in place to reproduce the original's outputs on the training
    inputs (no labels needed), with clipped gradients; pruned weights stay zero. Class logits
    are distilled at `settings.temperature`; with class labels, the loss is (1 - alpha)
    distillation + alpha cross-entropy. Training stops when the cosine to the original on the
    validation inputs has not gained MIN_GAIN for `settings.patience` epochs (None: never), and the
    best weights are kept."""
    if settings.schedule != "one_shot":
        raise InputError(
            "fine_tune.schedule gradual ramps the sparsity of MLP layers only; use one_shot here"
        )
    input_names = graph_inputs(outcome.model)
    x_train = stacked_inputs(train, input_names)
    x_val = stacked_inputs(validation if validation is not None else train, input_names)
    teacher = Executor(original)
    y_train = batched_forward(teacher, x_train, settings.batch_size)
    y_val = batched_forward(teacher, x_val, settings.batch_size)
    student = distiller(outcome, y_train, train.labels, settings.temperature, settings.alpha)
    history = History()
    params = student.params
    step = OPTIMIZERS[settings.optimizer](params, settings.learning_rate)
    # the pruned weights before fine-tuning are the first candidate: never worse than one-shot
    unchanged = student.agreement(
        batched_forward(student.executor, x_val, settings.batch_size), y_val
    )
    stopping = EarlyStopping(settings.patience, MIN_GAIN)
    stopping.stop_after(unchanged, params)
    rows = len(next(iter(y_train.values())))
    rng = np.random.default_rng(0)
    for epoch in range(settings.epochs):
        order = rng.permutation(rows)
        losses = []
        for start in range(0, rows, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            loss, norm, grads, clipped = student.clipped_grads(
                {n: x[batch] for n, x in x_train.items()},
                {n: y[batch] for n, y in y_train.items()},
                None if train.labels is None else train.labels[batch],
                settings.clip,
            )
            advice = "lower learning_rate or clip gradients (clip.mode global_norm)"
            history.record_step(loss, norm, grads, clipped, epoch, "fine-tuning", advice)
            step(params, clipped)
            student.apply_masks(params)
            losses.append(loss)
        history.loss.append(float(np.mean(losses)))
        history.validation.append(
            student.agreement(batched_forward(student.executor, x_val, settings.batch_size), y_val)
        )
        if on_epoch is not None:
            on_epoch(epoch + 1, settings.epochs)
        if stopping.stop_after(history.validation[-1], params):
            history.stopped_early = epoch + 1 < settings.epochs  # not when it ran them all
            break
    stopping.restore_best(params)
    write_parameters(outcome.model, {n: student.executor.parameters[n] for n in student.names})
    refresh_layers(outcome)
    return training_report("cosine", settings.clip, history)


def write_parameters(model: ModelProto, values: dict[str, np.ndarray]) -> None:
    """Trained values back where the graph stores them (initializers or Constant nodes), each
    in its stored dtype."""
    for slot in all_float_constants(model):
        if slot.graph is model.graph and slot.name in values:
            slot.write(values[slot.name])
