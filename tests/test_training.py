"""Training in NumPy: gradients, clipping that rescues a diverging run, export, repeatability."""

import numpy as np
import onnx
import pytest
from helpers import run
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris

from schemas import TrainParams
from workers.errors import InvalidDataError
from workers.evaluate.data import Table
from workers.jobs.train import train_model
from workers.nn.fit import TrainingDivergedError, gradual_sparsity
from workers.nn.network import initialise


def table(features: np.ndarray, labels: np.ndarray) -> Table:
    return Table({"": features.astype(np.float64)}, labels, [])


def train(features, labels, **params):
    return train_model(table(features, labels), TrainParams.model_validate(params))


@pytest.mark.parametrize(
    ("head", "outputs", "activations"),
    [
        ("softmax", 3, ["relu", "tanh"]),
        ("sigmoid", 1, ["sigmoid", "tanh"]),
        ("identity", 2, ["tanh", "relu"]),
    ],
)
def test_backward_matches_finite_differences(head, outputs, activations):
    rng = np.random.default_rng(0)
    net = initialise([4, 6, 5, outputs], activations, head, rng)
    net.weights = [w.astype(np.float64) for w in net.weights]
    net.biases = [b.astype(np.float64) + 0.1 for b in net.biases]
    x = rng.standard_normal((7, 4))
    y = {
        "softmax": rng.integers(0, 3, 7),
        "sigmoid": rng.integers(0, 2, 7).astype(np.float64),
        "identity": rng.standard_normal((7, 2)),
    }[head]
    _, grads = net.loss_and_grads(x, y)
    for param, grad in zip(net.params, grads, strict=True):
        for index in np.ndindex(param.shape):
            saved = param[index]
            param[index] = saved + 1e-6
            up, _ = net.loss_and_grads(x, y)
            param[index] = saved - 1e-6
            down, _ = net.loss_and_grads(x, y)
            param[index] = saved
            assert (up - down) / 2e-6 == pytest.approx(grad[index], abs=1e-6)


def test_global_norm_clipping_rescues_sgd_that_diverges():
    features, target = load_diabetes(return_X_y=True)
    settings = {
        "model": {"type": "linear"},
        "optimizer": "sgd",
        "learning_rate": 0.5,
        "batch_size": 32,
        "epochs": 40,
        "task": "regression",
    }
    with pytest.raises(TrainingDivergedError, match=r"diverged at step \d+ \(epoch \d+\)"):
        train(features, target, **settings, clip={"mode": "none"})
    clipped = train(features, target, **settings, clip={"mode": "global_norm", "threshold": 0.25})
    loss = clipped.history.loss  # mean squared error on standardised targets: 1.0 predicts the mean
    assert all(np.isfinite(loss)) and loss[-1] < 0.6
    assert clipped.history.validation[-1] > 0.4  # r2 on held-out rows
    assert np.mean(clipped.history.clipped) > 0.5  # clipping did the work


def test_digits_mlp_reaches_96_percent_and_onnx_agrees_on_every_sample():
    features, labels = load_digits(return_X_y=True)
    outcome = train(features, labels, model={"type": "mlp", "hidden": [128]}, epochs=30, seed=3)
    split = outcome.split
    numpy_probabilities = outcome.network.predict(split.x_val)
    numpy_labels = outcome.classes[np.argmax(numpy_probabilities, axis=1)]
    onnx_labels, onnx_probabilities = run(outcome.onnx, {"X": split.x_val.astype(np.float32)})
    assert np.mean(numpy_labels == outcome.classes[split.y_val]) >= 0.96
    assert np.array_equal(onnx_labels, numpy_labels)
    np.testing.assert_allclose(onnx_probabilities, numpy_probabilities, rtol=1e-4, atol=1e-6)


def test_same_seed_same_bytes_other_seed_other_bytes():
    features, labels = load_iris(return_X_y=True)
    params = {"model": {"type": "mlp", "hidden": [16]}, "epochs": 5, "seed": 7}
    first = train(features, labels, **params).onnx
    assert train(features, labels, **params).onnx == first
    assert train(features, labels, **{**params, "seed": 8}).onnx != first


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_each_optimizer_learns_the_binary_task_with_logistic_regression(optimizer):
    features, labels = load_breast_cancer(return_X_y=True)
    outcome = train(
        features,
        labels,
        model={"type": "logistic"},
        optimizer=optimizer,
        learning_rate=0.05,
        epochs=20,
    )
    assert outcome.history.validation[-1] > 0.9
    onnx_labels, probabilities = run(outcome.onnx, {"X": outcome.split.x_val.astype(np.float32)})
    assert probabilities.shape[1] == 2 and set(onnx_labels) <= {0, 1}


def test_regression_mlp_predicts_in_the_units_of_the_labels():
    features, target = load_diabetes(return_X_y=True)
    outcome = train(
        features,
        target,
        model={"type": "mlp", "hidden": [16]},
        epochs=30,
        learning_rate=0.01,
        task="regression",
    )
    (prediction,) = run(outcome.onnx, {"X": outcome.split.x_val.astype(np.float32)})
    truth = outcome.split.y_val[:, 0]
    r2 = 1 - np.sum((prediction[:, 0] - truth) ** 2) / np.sum((truth - truth.mean()) ** 2)
    assert r2 > 0.3 and 50 < prediction.mean() < 250  # diabetes targets, not standardised units


def test_gradual_pruning_follows_the_cubic_schedule_and_ends_at_the_target():
    assert gradual_sparsity(0.9, 0, 10) == 0.0
    assert gradual_sparsity(0.9, 5, 10) == pytest.approx(0.9 * (1 - 0.5**3))
    assert gradual_sparsity(0.9, 10, 10) == pytest.approx(0.9)
    features, labels = load_digits(return_X_y=True)
    outcome = train(
        features, labels, model={"hidden": [64]}, epochs=12,
        prune={"sparsity": 0.8, "schedule": "gradual"},
    )  # fmt: skip
    for weight in outcome.network.weights:
        assert abs((weight == 0).sum() - 0.8 * weight.size) <= 1
    assert outcome.history.validation[-1] > 0.9


def test_one_shot_prune_at_the_end_keeps_a_dense_original():
    features, labels = load_digits(return_X_y=True)
    outcome = train(features, labels, model={"hidden": [32]}, epochs=5, prune={"sparsity": 0.5})
    dense = onnx.load_model_from_string(outcome.dense_onnx)
    pruned = onnx.load_model_from_string(outcome.onnx)
    w_dense = onnx.numpy_helper.to_array(next(t for t in dense.graph.initializer if t.name == "W0"))
    w_pruned = onnx.numpy_helper.to_array(
        next(t for t in pruned.graph.initializer if t.name == "W0")
    )
    assert np.count_nonzero(w_dense) == w_dense.size
    assert abs((w_pruned == 0).sum() - 0.5 * w_pruned.size) <= 1


def test_early_stopping_keeps_the_best_epoch():
    features, labels = load_iris(return_X_y=True)
    outcome = train(
        features, labels, model={"hidden": [8]}, epochs=300, learning_rate=0.05, patience=3
    )
    history = outcome.history
    assert history.stopped_early and len(history.loss) < 300
    predicted = np.argmax(outcome.network.predict(outcome.split.x_val), axis=1)
    kept = np.mean(predicted == outcome.split.y_val)
    assert kept == pytest.approx(max(history.validation))  # the best weights, not the last


def test_string_class_labels_come_back_as_strings():
    features, labels = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])[labels]
    outcome = train(features, names, model={"type": "softmax"}, epochs=20, learning_rate=0.05)
    onnx_labels, _ = run(outcome.onnx, {"X": outcome.split.x_val.astype(np.float32)})
    assert set(onnx_labels) <= {"setosa", "versicolor", "virginica"}
    # and they are the right names: the held-out rows' own, found by value in the data set
    # (x_val holds the raw features). Chance scores 1/3, and names mapped to the wrong class
    # indices would score about that.
    rows = [np.flatnonzero((features == x).all(axis=1))[0] for x in outcome.split.x_val]
    assert np.mean(onnx_labels == names[rows]) >= 0.75


def test_fractional_class_labels_are_refused_not_truncated():
    features = np.random.default_rng(0).standard_normal((40, 3))
    labels = np.where(features[:, 0] > 0, 0.7, 0.2)
    with pytest.raises(InvalidDataError, match=r"class labels must be integers or names; got 0\.2"):
        train(features, labels, task="classification")


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_optimizers_match_their_formulas_in_float32_to_the_bit(kind):
    from workers.nn.optimizers import ADAM_BETAS, ADAM_EPS, MOMENTUM, OPTIMIZERS

    rng = np.random.default_rng(0)
    params = [
        rng.standard_normal((5, 4)).astype(np.float32),
        rng.standard_normal(4).astype(np.float32),
    ]
    reference = [p.copy() for p in params]
    first = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    step = OPTIMIZERS[kind](params, learning_rate=0.01)
    b1, b2 = ADAM_BETAS
    for t in range(1, 6):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        step(params, grads)
        for i, g in enumerate(grads):
            if kind == "sgd":
                reference[i] = reference[i] - 0.01 * g
            elif kind == "momentum":
                first[i] = first[i] * MOMENTUM + g
                reference[i] = reference[i] - 0.01 * first[i]
            else:  # moments without their (1 - beta) factors, which the step size carries
                first[i] = first[i] * b1 + g
                second[i] = second[i] * b2 + g * g
                size = 0.01 * (1 - b2**t) ** 0.5 / (1 - b1**t) * (1 - b1) / (1 - b2) ** 0.5
                eps = ADAM_EPS / (1 - b2) ** 0.5
                reference[i] = reference[i] - first[i] / (np.sqrt(second[i]) + eps) * size
        for p, r in zip(params, reference, strict=True):
            assert p.dtype == r.dtype == np.float32
            assert np.array_equal(p, r)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_optimizers_update_a_transposed_weight_as_its_contiguous_copy(kind):
    """A Gemm transB=1 weight reaches training as a transposed view; Adam subtracts its
    update block by block from contiguous weights, whole from this one: the same bits."""
    from workers.nn.optimizers import BLOCK, OPTIMIZERS

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((400, 400)).astype(np.float32)  # more than one BLOCK
    assert weight.size > BLOCK
    contiguous = [weight.copy(), np.zeros(400, np.float32)]
    transposed = [weight.T.copy().T, np.zeros(400, np.float32)]
    assert not transposed[0].flags.c_contiguous
    steps = [OPTIMIZERS[kind](params, learning_rate=0.01) for params in (contiguous, transposed)]
    for _ in range(3):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in contiguous]
        for step, params in zip(steps, (contiguous, transposed), strict=True):
            step(params, grads)
    assert not np.array_equal(contiguous[0], weight)
    for a, b in zip(contiguous, transposed, strict=True):
        assert np.array_equal(a, b)
