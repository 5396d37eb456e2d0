"""Fine-tuning a pruned model's surviving weights with clipped gradients, masks holding pruned
weights at zero."""

import numpy as np
from onnx import ModelProto

from schemas.params import PruneParams
from schemas.report import TrainingReport
from workers.compress.prune import PruneOutcome, refresh_layers
from workers.errors import InputError, InvalidDataError
from workers.evaluate.data import EvalData
from workers.graph.mlp import read_mlp
from workers.nn.fit import EpochProgress, FitSettings, PruneTarget, fit, training_report
from workers.nn.network import DTYPE, HEADS


def fine_tune(
    original: ModelProto,
    outcome: PruneOutcome,
    params: PruneParams,
    train: EvalData,
    validation: EvalData | None,
    on_epoch: EpochProgress | None = None,
) -> TrainingReport:
    """Train the surviving weights of the pruned model in place, with clipped gradients.

    one_shot: the masks of the pruning step stay fixed. gradual: start again from the original
    weights and ramp sparsity up over the epochs (Zhu & Gupta), so the network adapts as it goes.
    """
    settings = params.fine_tune
    assert settings is not None
    mlp = read_mlp(outcome.model)
    network = mlp.network
    if train.labels is None:
        raise InvalidDataError("train_data needs labels to fine-tune on")
    x_train = mlp.prepare(train.stacked(mlp.input_name))
    y_train = mlp.targets(train.labels)
    check = validation if validation is not None and validation.labels is not None else train
    assert check.labels is not None
    x_val, y_val = mlp.prepare(check.stacked(mlp.input_name)), mlp.targets(check.labels)

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
        dense = read_mlp(original).network
        network.weights, network.biases = dense.weights, dense.biases
        masks = None
        target = PruneTarget(params.sparsity, None, params.scope, "gradual", prunable)
    fit_settings = FitSettings.of(settings, target)
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
    )
    mlp.write_back()
    refresh_layers(outcome)
    return training_report(HEADS[network.head].metric, settings.clip, history)
