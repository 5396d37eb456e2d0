"""The MLP fast path of fine-tuning distils from the original model as the graph path does:
(1 - alpha) distillation at `temperature` + alpha the task loss on the labels."""

import numpy as np
import pytest
from helpers import run
from onnx import ModelProto

from schemas import PruneParams
from schemas.report import TrainingReport
from schemas.vocabulary import Head
from workers.compress.finetune import MIN_GAIN, fine_tune
from workers.compress.prune import copy_model, prune_model
from workers.evaluate.data import EvalData
from workers.nn.network import HEADS, distilled_loss


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_the_distilled_loss_gradient_matches_finite_differences(head: Head, alpha: float) -> None:
    rng = np.random.default_rng(21)
    width = {"softmax": 4, "sigmoid": 1, "identity": 2}[head]
    student, teacher = rng.standard_normal((6, width)), 3 * rng.standard_normal((6, width))
    labels = {
        "softmax": rng.integers(0, width, 6),
        "sigmoid": rng.integers(0, 2, 6).astype(np.float64),
        "identity": rng.standard_normal((6, width)),
    }[head]
    rule = HEADS[head]

    def loss(logits: np.ndarray) -> tuple[float, np.ndarray]:
        return distilled_loss(rule.loss, rule.distillation, teacher, 2.5, alpha, logits, labels)

    value, grad = loss(student)
    soft, _ = rule.distillation(student, teacher, 2.5)
    hard, _ = rule.loss(student, labels)
    assert value == pytest.approx((1 - alpha) * soft + alpha * hard)
    numeric = np.zeros_like(student)
    for index in np.ndindex(student.shape):
        step = np.zeros_like(student)
        step[index] = 1e-6
        numeric[index] = (loss(student + step)[0] - loss(student - step)[0]) / 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)


def test_a_sigmoid_is_distilled_as_the_softmax_of_its_two_logits() -> None:
    rng = np.random.default_rng(22)
    student, teacher = rng.standard_normal((5, 1)), rng.standard_normal((5, 1))
    binary, binary_grad = HEADS["sigmoid"].distillation(student, teacher, 3.0)
    two = np.hstack([np.zeros_like(student), student])
    classes, classes_grad = HEADS["softmax"].distillation(
        two, np.hstack([np.zeros_like(teacher), teacher]), 3.0
    )
    assert binary == pytest.approx(classes)
    np.testing.assert_allclose(binary_grad[:, 0], classes_grad[:, 1])


def tuned(
    model: ModelProto, x: np.ndarray, labels: np.ndarray, held_out, **settings
) -> tuple[np.ndarray, TrainingReport]:
    """The digits MLP pruned to 50% of its neurons and fine-tuned for 8 epochs on `labels`
    (the held-out rows and their true labels as validation): its predictions on the held-out
    rows and the training report."""
    outcome = prune_model(copy_model(model), PruneParams(sparsity=0.5, granularity="structured"))
    params = PruneParams(
        sparsity=0.5,
        granularity="structured",
        fine_tune={"epochs": 8, "learning_rate": 3e-3, "patience": None, **settings},
    )
    x_test, y_test = held_out
    report = fine_tune(
        model, outcome, params, EvalData([{"X": x}], labels), EvalData([{"X": x_test}], y_test)
    )
    predicted, _ = run(outcome.model.SerializeToString(), {"X": x_test})
    return predicted, report


def test_alpha_zero_follows_the_original_through_wrong_labels_and_alpha_one_learns_them(
    digits_300_100,
) -> None:
    model, (x_train, y_train), held_out = digits_300_100
    original, _ = run(model.SerializeToString(), {"X": held_out[0]})
    wrong = np.random.default_rng(23).permutation(y_train)  # a label per row, mostly not its own
    assert np.mean(wrong == y_train) < 0.2

    distilled, _ = tuned(model, x_train, wrong, held_out, alpha=0.0)
    assert np.mean(distilled == original) > 0.9  # the teacher, not the labels, is learnt
    # alpha 1: the labels alone, as before the MLP path distilled; the temperature, which
    # acts only on the distillation term, changes nothing, and the shuffled labels are learnt
    labelled, cold = tuned(model, x_train, wrong, held_out, alpha=1.0, temperature=1.0)
    _, hot = tuned(model, x_train, wrong, held_out, alpha=1.0, temperature=8.0)
    assert cold.loss == hot.loss and cold.metric == "accuracy"
    assert np.mean(labelled == original) < 0.5
    _, half = tuned(model, x_train, wrong, held_out)  # the defaults blend the two
    assert half.loss != cold.loss


def test_with_distillation_the_epoch_is_picked_by_cosine_to_the_original_as_on_the_graph_path(
    digits_300_100,
) -> None:
    """At a learning rate too small to matter the softened cosine still creeps up: creeping is
    not a gain of MIN_GAIN, so patience ends it; a real learning rate gains and goes on."""
    model, (x_train, y_train), held_out = digits_300_100
    _, crawl = tuned(model, x_train, y_train, held_out, learning_rate=1e-7, patience=2)
    assert crawl.metric == "cosine" and all(0 < v <= 1 for v in crawl.validation)
    assert 0 < crawl.validation[-1] - crawl.validation[0] < MIN_GAIN  # it does creep
    # the first epoch sets the score to beat; the two after it gain too little
    assert crawl.stopped_early and len(crawl.validation) == 3
    _, learns = tuned(model, x_train, y_train, held_out, patience=2)
    assert max(learns.validation) - learns.validation[0] > MIN_GAIN
    assert len(learns.validation) > 3


def test_without_labels_the_mlp_path_distils_alone_as_the_graph_path_does(digits_300_100) -> None:
    """DESIGN: fine-tuning needs no labels, the original is the teacher. train_data without a
    label column fine-tunes an MLP classifier by distillation alone (alpha 0 whatever is set),
    its epoch picked by agreement with the original."""
    model, (x_train, _), held_out = digits_300_100
    original, _ = run(model.SerializeToString(), {"X": held_out[0]})
    pruned = prune_model(copy_model(model), PruneParams(sparsity=0.5, granularity="structured"))
    before, _ = run(pruned.model.SerializeToString(), {"X": held_out[0]})
    unlabelled, report = tuned(model, x_train, None, (held_out[0], None), alpha=1.0)
    assert report.metric == "cosine" and max(report.validation) > report.validation[0]
    assert np.mean(unlabelled == original) > 0.9
    assert np.mean(before == original) < np.mean(unlabelled == original)


def test_eval_data_without_labels_picks_the_epoch_when_the_score_needs_none(digits_300_100) -> None:
    """Agreement with the original needs no labels: labelled train_data and unlabelled eval_data
    measure the curve on eval_data, as with its labels. alpha 1 scores the labels, so unlabelled
    eval_data cannot pick the epoch: the curve is measured on train_data, and a note says so."""
    model, (x_train, y_train), (x_test, y_test) = digits_300_100
    _, labelled = tuned(model, x_train, y_train, (x_test, y_test))
    _, unlabelled = tuned(model, x_train, y_train, (x_test, None))
    _, other_rows = tuned(model, x_train, y_train, (x_test[::2], None))
    assert unlabelled.metric == "cosine" and unlabelled.validation == labelled.validation
    assert other_rows.validation != unlabelled.validation

    params = PruneParams(
        sparsity=0.5, granularity="structured", fine_tune={"epochs": 2, "alpha": 1.0}
    )
    outcome = prune_model(copy_model(model), params)
    train, held_out = EvalData([{"X": x_train}], y_train), EvalData([{"X": x_test}], None)
    report = fine_tune(model, outcome, params, train, held_out)
    assert report.metric == "accuracy"
    assert any("curve is measured on train_data" in note for note in outcome.notes)
