"""Fine-tuning's temperature, alpha and patience are real parameters that change what is trained,
and adaptive clipping norms each output unit where the weight's operator puts it."""

import numpy as np
import pytest
from pydantic import ValidationError
from test_executor import conv_net
from test_fine_tune_graphs import initializers, masked_gradients, one_sgd_step

from schemas.params import FineTuneParams, PruneParams
from schemas.report import TrainingReport
from service.problems import field_problems
from workers.compress.finetune import MIN_GAIN, fine_tune_graph, unit_axes
from workers.compress.prune import copy_model, prune_model
from workers.evaluate.data import EvalData
from workers.nn.clipping import clip_gradients


def tuned(labels: np.ndarray | None, **settings) -> tuple[dict[str, np.ndarray], TrainingReport]:
    """The conv net pruned to 50% and fine-tuned on 128 seeded inputs (and `labels`): its
    weights after, and the training report."""
    rng = np.random.default_rng(11)
    model = conv_net(rng)
    x = rng.standard_normal((128, 2, 6, 6)).astype(np.float32)
    outcome = prune_model(copy_model(model), PruneParams(sparsity=0.5))
    params = FineTuneParams(**{"epochs": 4, "batch_size": 32, "learning_rate": 0.01, **settings})
    report = fine_tune_graph(model, outcome, params, EvalData([{"x": x}], labels), None)
    return initializers(outcome.model), report


# labels that disagree with the original model: training on them pulls away from the teacher
LABELS = np.random.default_rng(12).integers(0, 4, 128)


def same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_alpha_zero_ignores_the_labels_and_alpha_one_trains_on_them_alone() -> None:
    unlabelled_weights, unlabelled = tuned(None, patience=None)
    distilled_weights, distilled_only = tuned(LABELS, alpha=0.0, patience=None)
    # the labels' gradient is weighed by 0: the very same training
    assert same_weights(distilled_weights, unlabelled_weights)
    assert distilled_only.loss == unlabelled.loss
    # alpha 1: the distillation term, where the temperature acts, has weight 0, and the
    # cross-entropy on the labels falls as they are learnt
    _, cold = tuned(LABELS, alpha=1.0, temperature=1.0, patience=None)
    _, hot = tuned(LABELS, alpha=1.0, temperature=8.0, patience=None)
    assert cold.loss == hot.loss and cold.loss[-1] < cold.loss[0]
    _, half = tuned(LABELS, alpha=0.5, patience=None)
    assert len({tuple(r.loss) for r in (unlabelled, cold, half)}) == 3


def test_the_temperature_changes_the_distillation_loss_and_the_weights() -> None:
    cold, cold_report = tuned(None, temperature=1.0, patience=None)
    hot, hot_report = tuned(None, temperature=8.0, patience=None)
    assert not same_weights(cold, hot)
    assert cold_report.loss[0] != pytest.approx(hot_report.loss[0], rel=1e-3)


def test_patience_stops_fine_tuning_early_and_none_trains_every_epoch() -> None:
    # a step size so large that the cosine to the original stops improving at once
    loud = {"epochs": 12, "learning_rate": 0.5, "optimizer": "sgd", "clip": {"mode": "none"}}
    _, patient = tuned(None, patience=1, **loud)
    _, every = tuned(None, patience=None, **loud)
    assert patient.stopped_early and len(patient.loss) < 12
    assert not every.stopped_early and len(every.loss) == 12
    assert patient.loss == every.loss[: len(patient.loss)]  # the same run, cut short


def test_gains_below_min_gain_do_not_hold_off_early_stopping() -> None:
    """At a learning rate too small to matter the cosine still creeps up every epoch: creeping
    is not a gain, so patience ends it, and the best epoch is still the one kept."""
    _, crawl = tuned(None, learning_rate=1e-7, epochs=8, patience=2)
    assert 0 < crawl.validation[-1] - crawl.validation[0] < MIN_GAIN  # it does creep
    assert crawl.stopped_early and len(crawl.validation) == 2
    _, learns = tuned(None, learning_rate=0.01, epochs=8, patience=2)
    assert max(learns.validation) - learns.validation[0] > MIN_GAIN
    assert len(learns.validation) > 2


@pytest.mark.parametrize(
    ("key", "value"),
    [("temperature", 0), ("temperature", 101), ("alpha", -0.1), ("alpha", 1.5), ("patience", 0)],
)
def test_settings_out_of_range_are_refused_naming_the_parameter(key: str, value: float) -> None:
    with pytest.raises(ValidationError) as error:
        PruneParams(sparsity=0.5, fine_tune={key: value})
    (problem,) = field_problems(list(error.value.errors()), prefix="params")
    assert problem.field == f"params.fine_tune.{key}"  # as the service and the CLI report it
    assert len(problem.message) < 300


def test_adaptive_clipping_norms_a_conv_weight_per_output_channel() -> None:
    rng = np.random.default_rng(13)
    weight = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)  # [out, in, kh, kw]
    weight[1] *= 1e-4  # a nearly dead channel: its budget is 0.1 * max(|w_1|, 1e-3)
    grad = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    grad[2] *= 1e-3  # a channel whose gradient is within its budget
    (clipped,), _ = clip_gradients([grad], "adaptive", 0.1, params=[weight], unit_axes=[0])
    for channel in range(3):  # by hand, one output channel at a time
        w_norm = float(np.sqrt(np.sum(weight[channel].astype(np.float64) ** 2)))
        g_norm = float(np.sqrt(np.sum(grad[channel].astype(np.float64) ** 2)))
        budget = 0.1 * max(w_norm, 1e-3)
        expected = grad[channel] * (budget / g_norm if g_norm >= budget else 1.0)
        np.testing.assert_allclose(clipped[channel], expected, rtol=1e-5, err_msg=str(channel))
    assert np.array_equal(clipped[2], grad[2])
    assert np.linalg.norm(clipped[1]) == pytest.approx(0.1 * 1e-3, rel=1e-4)


def test_each_parameter_gets_the_unit_axis_of_the_operator_that_reads_it() -> None:
    model = conv_net(np.random.default_rng(14))
    names = ["conv.w", "conv.b", "fc.w", "fc.b"]
    # Conv [out, in, kh, kw] and Gemm with transB=1 [out, in]: units on axis 0
    assert unit_axes(model, names) == [0, -1, 0, -1]


def test_a_fine_tuning_step_with_adaptive_clipping_clips_each_output_channel() -> None:
    model, x, outcome, reference, grads = masked_gradients(15)
    before = {n: p.copy() for n, p in zip(reference.names, reference.params, strict=True)}
    eps = 0.01
    # by hand: conv.w and fc.w have their output units on axis 0; the biases are one unit each
    expected = {}
    for name, g in zip(reference.names, grads, strict=True):
        w = before[name]
        rows = (g.reshape(len(g), -1), w.reshape(len(w), -1)) if g.ndim > 1 else (g[None], w[None])
        g_norms = np.linalg.norm(rows[0].astype(np.float64), axis=1)
        budgets = eps * np.maximum(np.linalg.norm(rows[1].astype(np.float64), axis=1), 1e-3)
        scale = np.where(g_norms >= budgets, budgets / g_norms, 1.0)
        expected[name] = (rows[0] * scale[:, None]).reshape(g.shape)
    one_sgd_step(model, outcome, x, {"mode": "adaptive", "threshold": eps})
    after = initializers(outcome.model)
    for name in reference.names:
        moved = after[name] - before[name]
        assert np.any(moved), name
        np.testing.assert_allclose(moved, -0.1 * expected[name], rtol=1e-4, atol=1e-7, err_msg=name)
