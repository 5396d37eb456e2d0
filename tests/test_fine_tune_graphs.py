"""Fine-tuning graphs beyond MLPs through the NumPy executor: distillation from the original on
unlabelled inputs brings a pruned conv net and transformer layer back towards the original,
pruned weights stay exactly zero, shapes stay, and onnxruntime runs the result."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import ModelProto, numpy_helper
from test_executor import SEQ, D, as_constant_nodes, conv_net, transformer_layer

from schemas.params import FineTuneParams, PruneParams
from workers.compress.calibrated import prune_calibrated
from workers.compress.finetune import (
    DISTILLATIONS,
    HELD_BACK,
    Distiller,
    distillation_kind,
    distiller,
    fine_tune_graph,
    held_back,
    mean_cosine,
)
from workers.compress.prune import PruneOutcome, copy_model, prune_model
from workers.compress.search import Compressor
from workers.errors import InputError
from workers.evaluate.data import EvalData
from workers.graph.executor import Executor


def ort_output(model: ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def initializers(model: ModelProto) -> dict[str, np.ndarray]:
    """Every stored float tensor by name, in initializers or in Constant nodes."""
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            stored[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return stored


def copy_outcome(outcome: PruneOutcome) -> PruneOutcome:
    return PruneOutcome(copy_model(outcome.model), list(outcome.layers), outcome.params_before)


def distil(model: ModelProto, x: np.ndarray, prune: PruneParams, **settings) -> ModelProto:
    """Prune a copy of `model`, fine-tune it on the first 3/4 of x, and check on the rest that
    it moved towards the original while keeping its zeros and shapes."""
    train, held_out = x[: len(x) * 3 // 4], x[len(x) * 3 // 4 :]
    outcome = prune_model(copy_model(model), prune)
    before = initializers(outcome.model)
    one_shot = ort_output(outcome.model, held_out)
    report = fine_tune_graph(
        model,
        outcome,
        FineTuneParams(**settings),
        EvalData([{"x": train}], None),
        EvalData([{"x": held_out}], None),
    )
    after = initializers(outcome.model)
    assert {n: a.shape for n, a in after.items()} == {n: a.shape for n, a in before.items()}
    for layer in outcome.layers:
        assert np.all(after[layer.name][before[layer.name] == 0] == 0), layer.name
    teacher = {"y": ort_output(model, held_out)}
    student = {"y": ort_output(outcome.model, held_out)}
    tuned = mean_cosine(student, teacher)
    assert tuned > mean_cosine({"y": one_shot}, teacher) + 0.01
    # the epoch kept is judged as the loss sees the outputs: class logits as probabilities
    # softened by the temperature, anything else as it is
    if distillation_kind(teacher["y"]) == "kl":
        temperature = FineTuneParams(**settings).temperature
        teacher, student = softened(teacher, temperature), softened(student, temperature)
    validated = mean_cosine(student, teacher)
    assert report.metric == "cosine" and max(report.validation) == pytest.approx(
        validated, abs=1e-4
    )
    return outcome.model


def softened(outputs: dict[str, np.ndarray], temperature: float) -> dict[str, np.ndarray]:
    scaled = {name: y / temperature for name, y in outputs.items()}
    exps = {name: np.exp(y - y.max(axis=1, keepdims=True)) for name, y in scaled.items()}
    return {name: e / e.sum(axis=1, keepdims=True) for name, e in exps.items()}


def test_the_epoch_kept_ignores_a_shift_of_a_rows_logits() -> None:
    """Adding a constant to every logit of a row changes no probability and no prediction, but
    the raw logits' cosine: the validation score must not see it."""
    rng = np.random.default_rng(0)
    model = conv_net(rng)
    x = rng.standard_normal((16, 2, 6, 6)).astype(np.float32)
    teacher = {"y": ort_output(model, x)}
    assert distillation_kind(teacher["y"]) == "kl"
    student = distiller(prune_model(copy_model(model), PruneParams(sparsity=0.5)), teacher,
                        None, 2.0, 0.0)  # fmt: skip
    shifted = {"y": teacher["y"] + 5.0 * rng.standard_normal((16, 1)).astype(np.float32)}
    assert mean_cosine(shifted, teacher) < 0.99
    assert student.agreement(shifted, teacher) == pytest.approx(1.0, abs=1e-6)


def test_a_pruned_conv_net_is_distilled_back_towards_the_original() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 2, 6, 6)).astype(np.float32)
    distil(
        conv_net(rng),
        x,
        PruneParams(sparsity=0.8),
        epochs=15,
        learning_rate=0.01,
        batch_size=32,
        clip={"mode": "global_norm", "threshold": 5.0},
    )


def test_weights_in_constant_nodes_are_fine_tuned_where_they_are() -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((256, 2, 6, 6)).astype(np.float32)
    model = as_constant_nodes(conv_net(rng))
    tuned = distil(
        model, x, PruneParams(sparsity=0.8), epochs=10, learning_rate=0.01, batch_size=32
    )
    assert not tuned.graph.initializer
    assert not np.array_equal(initializers(tuned)["fc.b"], initializers(model)["fc.b"])


def test_a_structurally_pruned_conv_net_keeps_its_cut_shapes() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 2, 6, 6)).astype(np.float32)
    model = conv_net(rng)
    tuned = distil(
        model,
        x,
        PruneParams(sparsity=0.5, granularity="structured"),
        epochs=15,
        learning_rate=0.01,
        batch_size=32,
    )
    assert initializers(tuned)["conv.w"].shape[0] < initializers(model)["conv.w"].shape[0]


def test_a_pruned_transformer_layer_is_distilled_back_towards_the_original() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, SEQ, D)).astype(np.float32)
    distil(
        transformer_layer(rng),
        x,
        PruneParams(sparsity=0.5),
        epochs=15,
        learning_rate=0.01,
        batch_size=32,
        optimizer="momentum",
    )


@pytest.mark.parametrize(
    ("labels", "used"),
    [(np.arange(64) % 4, True), (np.arange(64) % 4 + 0.5, False), (np.arange(64) % 7, False)],
    ids=["class-indices", "floats", "out-of-range"],
)
def test_class_labels_add_cross_entropy_and_other_labels_are_noted(labels, used) -> None:
    rng = np.random.default_rng(7)
    model = conv_net(rng)
    x = EvalData([{"x": rng.standard_normal((64, 2, 6, 6)).astype(np.float32)}], labels)
    outcome = prune_model(copy_model(model), PruneParams(sparsity=0.5))
    report = fine_tune_graph(model, outcome, FineTuneParams(epochs=2, batch_size=16), x, None)
    assert len(report.loss) == 2 and np.isfinite(report.loss).all()
    assert bool(outcome.notes) is not used


def test_every_step_is_clipped_below_a_tiny_threshold() -> None:
    rng = np.random.default_rng(3)
    model = conv_net(rng)
    x = rng.standard_normal((64, 2, 6, 6)).astype(np.float32)
    outcome = prune_model(copy_model(model), PruneParams(sparsity=0.8))
    report = fine_tune_graph(
        model,
        outcome,
        FineTuneParams(
            epochs=2, batch_size=16, optimizer="sgd", clip={"mode": "value", "threshold": 1e-6}
        ),
        EvalData([{"x": x}], None),
        None,
    )
    assert report.clip.clipped_fraction == 1.0 and len(report.grad_norm) == 8


def test_the_gradual_schedule_is_refused_outside_mlps() -> None:
    rng = np.random.default_rng(4)
    model = conv_net(rng)
    outcome = prune_model(copy_model(model), PruneParams(sparsity=0.5))
    x = EvalData([{"x": rng.standard_normal((8, 2, 6, 6)).astype(np.float32)}], None)
    with pytest.raises(InputError, match="one_shot"):
        fine_tune_graph(model, outcome, FineTuneParams(schedule="gradual"), x, None)


def test_logits_are_distilled_by_kl_and_everything_else_by_mse() -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((4, 3))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert distillation_kind(logits) == "kl"
    assert distillation_kind(probabilities) == "mse"
    assert distillation_kind(rng.standard_normal((4, 3, 2))) == "mse"


@pytest.mark.parametrize("kind", sorted(DISTILLATIONS))
def test_distillation_gradients_match_finite_differences(kind: str) -> None:
    rng = np.random.default_rng(6)
    student, teacher = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    _, grad = DISTILLATIONS[kind](student, teacher, 2.0)
    numeric = np.zeros_like(student)
    for index in np.ndindex(student.shape):
        step = np.zeros_like(student)
        step[index] = 1e-6
        up, _ = DISTILLATIONS[kind](student + step, teacher, 2.0)
        down, _ = DISTILLATIONS[kind](student - step, teacher, 2.0)
        numeric[index] = (up - down) / 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)


def test_the_task_loss_is_weighed_by_alpha_and_its_gradient_is_exact() -> None:
    rng = np.random.default_rng(8)
    student, teacher = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    labels = np.array([0, 2, 1, 1, 0])
    scorer = Distiller(None, [], [], [], {"y": "kl"}, 2.0, class_output="y", alpha=0.3)  # type: ignore[arg-type]

    def loss(y: np.ndarray) -> float:
        return scorer.loss({"y": y}, {"y": teacher}, labels)[0]

    distilled, _ = DISTILLATIONS["kl"](student, teacher, 2.0)
    log_p = student - np.log(np.exp(student).sum(axis=1, keepdims=True))
    cross_entropy = -log_p[np.arange(5), labels].mean()
    assert loss(student) == pytest.approx(0.7 * distilled + 0.3 * cross_entropy)
    _, grads = scorer.loss({"y": student}, {"y": teacher}, labels)
    numeric = np.zeros_like(student)
    for index in np.ndindex(student.shape):
        step = np.zeros_like(student)
        step[index] = 1e-6
        numeric[index] = (loss(student + step) - loss(student - step)) / 2e-6
    np.testing.assert_allclose(grads["y"], numeric, rtol=1e-5, atol=1e-9)


def clipped_by_definition(grads: list[np.ndarray], mode: str, eps: float) -> list[np.ndarray]:
    """README's clipping definitions, written out independently of workers.nn.clipping."""
    if mode == "value":
        return [np.clip(g, -eps, eps) for g in grads]
    if mode == "norm":
        return [g * min(1.0, eps / float(np.linalg.norm(g))) for g in grads]
    total = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads)))
    return [g * min(1.0, eps / (total + 1e-6)) for g in grads]


def masked_gradients(
    seed: int,
) -> tuple[ModelProto, np.ndarray, PruneOutcome, Distiller, list[np.ndarray]]:
    """A seeded conv net, 32 inputs, the net pruned to 50%, a distiller on a copy of it and its
    masked distillation gradients on those inputs: one fine-tuning step computed by hand."""
    rng = np.random.default_rng(seed)
    model = conv_net(rng)
    x = rng.standard_normal((32, 2, 6, 6)).astype(np.float32)
    outcome = prune_model(copy_model(model), PruneParams(sparsity=0.5))
    teacher = {"y": Executor(model).forward({"x": x}, record=False)["y"]}
    reference = distiller(copy_outcome(outcome), teacher, None, 2.0, 0.0)
    _, grads = reference.loss_and_grads({"x": x}, teacher, None)
    reference.apply_masks(grads)
    return model, x, outcome, reference, grads


def one_sgd_step(model: ModelProto, outcome: PruneOutcome, x: np.ndarray, clip: dict) -> None:
    """One fine-tuning epoch of one batch: a single SGD step at learning rate 0.1, clipped."""
    settings = FineTuneParams(
        epochs=1, batch_size=len(x), learning_rate=0.1, optimizer="sgd", clip=clip, patience=None
    )
    fine_tune_graph(model, outcome, settings, EvalData([{"x": x}], None), None)


@pytest.mark.parametrize(("mode", "eps"), [("value", 1e-3), ("norm", 1e-2), ("global_norm", 1e-2)])
def test_one_sgd_step_moves_the_weights_by_the_clipped_masked_gradient(mode, eps) -> None:
    # the gradient at the pruned weights, on the whole batch (one step per epoch below)
    model, x, outcome, reference, grads = masked_gradients(10)
    expected = clipped_by_definition(grads, mode, eps)
    before = [p.copy() for p in reference.params]
    one_sgd_step(model, outcome, x, {"mode": mode, "threshold": eps})
    after = initializers(outcome.model)
    moved = [after[name] - w for name, w in zip(reference.names, before, strict=True)]
    assert any(np.any(m) for m in moved), "the step was undone: the test needs a better step"
    for name, m, g in zip(reference.names, moved, expected, strict=True):
        np.testing.assert_allclose(m, -0.1 * g, rtol=1e-4, atol=1e-7, err_msg=name)


def test_held_back_rows_are_a_seeded_disjoint_share_with_their_labels() -> None:
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    data = EvalData([{"x": x[:12]}, {"x": x[12:]}], np.arange(20))
    rest, spared = held_back(data, 0.1)
    again = held_back(data, 0.1)[1]
    assert spared is not None and again is not None
    assert len(spared.labels) == 2 and len(rest.labels) == 18
    np.testing.assert_array_equal(spared.runs[0]["x"], again.runs[0]["x"])
    for part in (rest, spared):  # each row keeps its label
        np.testing.assert_array_equal(part.runs[0]["x"][:, 0], part.labels * 2)
    assert not set(rest.labels) & set(spared.labels)
    assert held_back(EvalData([{"x": x[:3]}], None), 0.1)[1] is None  # no row to spare


def test_after_reconstruction_fine_tuning_still_moves_the_weights(tmp_path: Path) -> None:
    """Reconstruction fits each layer to the calibration inputs (eval_data); fine-tuning picks
    its epoch on held-back training rows (Compressor splits them once for every candidate), so
    it does not hand back the reconstructed weights merely because they fit the calibration
    inputs best."""
    rng = np.random.default_rng(0)
    model = conv_net(rng)
    calibration, train, held_out = (
        rng.standard_normal((rows, 2, 6, 6)).astype(np.float32) for rows in (64, 256, 64)
    )
    params = PruneParams(
        sparsity=0.8,
        criterion="activation",
        reconstruct=True,
        encoding="dense",
        fine_tune={"epochs": 15, "learning_rate": 0.01, "batch_size": 32},
    )
    reconstructed, _ = prune_calibrated(copy_model(model), params, [{"x": calibration}])
    training = EvalData([{"x": train}], None)
    # as a prune job runs it: eval_data calibrates, train_data fine-tunes
    compressor = Compressor(
        model,
        model.SerializeToString(),
        EvalData([{"x": calibration}], None),
        params,
        training,
        tmp_path,
    )
    candidate = compressor.candidate(params)
    outcome, report = candidate.outcome, candidate.training
    # the epoch kept was the best on the held-back training rows, not on the calibration rows
    spared = held_back(training, HELD_BACK)[1].runs[0]["x"]
    on_spared, on_calibration = (
        mean_cosine(
            softened({"y": ort_output(outcome.model, x)}, 2.0),
            softened({"y": ort_output(model, x)}, 2.0),
        )
        for x in (spared, calibration)
    )
    assert max(report.validation) == pytest.approx(on_spared, abs=1e-4)
    assert max(report.validation) != pytest.approx(on_calibration, abs=1e-4)
    teacher = softened({"y": ort_output(model, held_out)}, 2.0)
    before = mean_cosine(softened({"y": ort_output(reconstructed.model, held_out)}, 2.0), teacher)
    after = mean_cosine(softened({"y": ort_output(outcome.model, held_out)}, 2.0), teacher)
    assert after > before + 0.005, (before, after)


@pytest.mark.parametrize("patience", [None, 1])
def test_patience_null_keeps_the_last_epoch_and_patience_the_best(patience) -> None:
    """One vocabulary with the MLP path and train jobs: patience null trains every epoch and keeps
    the last; with patience the best epoch is kept, here the pruned start that a learning rate
    far too large only made worse."""
    rng = np.random.default_rng(31)
    model = conv_net(rng)
    x = rng.standard_normal((32, 2, 6, 6)).astype(np.float32)
    outcome = prune_model(copy_model(model), PruneParams(sparsity=0.5))
    start = initializers(outcome.model)
    settings = FineTuneParams(
        epochs=1, learning_rate=5.0, optimizer="sgd", clip={"mode": "none"}, patience=patience
    )
    data = EvalData([{"x": x}], None)
    report = fine_tune_graph(model, outcome, settings, data, data)
    after = initializers(outcome.model)
    moved = any(not np.array_equal(after[name], start[name]) for name in start)
    assert moved == (patience is None)
    assert len(report.validation) == 1 and not report.stopped_early  # it ran its one epoch
