"""Iterative pruning inside the accuracy-bounded search (Han et al. 2015), and the fine-tuning
defaults that reach issue 17's frontier: each sparsity starts from the fine-tuned candidate of the
highest sparsity that met the bound, and the report still speaks of the original model."""

from pathlib import Path

import numpy as np
import pytest
from helpers import run, weights
from test_search import stage

from schemas import PruneParams
from schemas.params import revalidated
from workers.compress.search import Compressor, Start
from workers.evaluate.data import EvalData
from workers.jobs import run_prune_job

ORIGINAL_SHAPES = [[64, 300], [300, 100], [100, 10]]
QUICK = {"epochs": 5}  # enough to move the weights; the tests below are about shapes and masks


def compressor(digits_300_100, scratch: Path, **params) -> Compressor:
    model, (x_train, y_train), (x_test, y_test) = digits_300_100
    return Compressor(
        model,
        model.SerializeToString(),
        EvalData([{"X": x_test}], y_test),
        PruneParams(sparsity=0.5, encoding="dense", fine_tune=QUICK, **params),
        EvalData([{"X": x_train}], y_train),
        scratch,
    )


def test_structured_candidate_pruned_further_has_the_one_shot_shapes_reported_against_the_original(
    digits_300_100, tmp_path
):
    pruning = compressor(digits_300_100, tmp_path, granularity="structured")
    half = pruning.candidate(pruning.params)
    three_quarters = revalidated(pruning.params, sparsity=0.75)
    further = pruning.candidate(three_quarters, start=Start(0.5, half))
    one_shot = pruning.candidate(three_quarters)

    # 150 -> 75 neurons is half of what was left: the same widths as cutting 75% at once
    shapes = [layer.shape for layer in further.outcome.layers]
    assert shapes == [layer.shape for layer in one_shot.outcome.layers]
    assert shapes == [[64, 75], [75, 25], [25, 10]]
    assert [layer.original_shape for layer in further.outcome.layers] == ORIGINAL_SHAPES
    for layer in further.outcome.layers:
        assert layer.params == np.prod(layer.original_shape)
        assert layer.sparsity == pytest.approx(1 - layer.nonzero / layer.params)
    assert further.outcome.params_before == one_shot.outcome.params_before
    assert [(g.channels, g.kept) for g in further.outcome.groups if g.kept < g.channels] == [
        (300, 75),
        (100, 25),
    ]
    note = (
        "iterative pruning: pruned further from the fine-tuned candidate at sparsity 0.5 (the "
        "structured note counts this step; 300 of the original's 400 channels removed in all)"
    )
    assert note in further.notes
    # it starts from the fine-tuned weights, not the original's: the surviving neurons differ
    first = [weights(item.path.read_bytes())["coefficient"] for item in (further, one_shot)]
    assert not np.array_equal(*first)


def test_unstructured_candidate_pruned_further_keeps_every_zero_of_its_start(
    digits_300_100, tmp_path
):
    pruning = compressor(digits_300_100, tmp_path)
    half = pruning.candidate(pruning.params)
    further = pruning.candidate(revalidated(pruning.params, sparsity=0.8), start=Start(0.5, half))
    before, after = weights(half.path.read_bytes()), weights(further.path.read_bytes())
    for name, start in before.items():
        assert np.all(after[name][start == 0] == 0)  # the masks nest
        assert np.mean(after[name] == 0) == pytest.approx(0.8, abs=1e-3)
    assert [layer.sparsity for layer in further.outcome.layers] == pytest.approx(
        [0.8] * 3, abs=1e-3
    )


def test_search_with_default_fine_tuning_reaches_40x_within_a_point(job_dir, digits_300_100):
    """Issue 17: structured + int8, max_accuracy_drop 0.01, fine_tune left at its defaults."""
    model, train, held_out = digits_300_100
    stage(job_dir, model.SerializeToString(), evaluate=held_out, train=train)
    seen: list[str] = []
    params = PruneParams(
        max_accuracy_drop=0.01, granularity="structured", encoding="int8", fine_tune={}
    )
    report = run_prune_job(job_dir, params, lambda stage, _: seen.append(stage))

    assert report.size.ratio >= 40 and report.accuracy.delta >= -0.01
    x_test, y_test = held_out
    labels, _ = run((job_dir / "model.onnx").read_bytes(), {"X": x_test})
    assert np.mean(labels == y_test) == pytest.approx(report.accuracy.compressed)
    # after the first pass every candidate started from a fine-tuned one below it
    starts = [s for s in seen if s.startswith("candidate") and "epoch" not in s]
    assert "from" not in starts[0] and all(" from 0." in s for s in starts[1:])
    assert any(", fine-tuning epoch 1/100" in s for s in seen)  # progress per epoch
    assert any(note.startswith("iterative pruning: pruned further") for note in report.notes)
    assert [layer.original_shape for layer in report.layers] == ORIGINAL_SHAPES
    assert report.training is not None and report.training.stopped_early


def test_gradual_fine_tuning_starts_every_candidate_from_the_original(job_dir, digits_300_100):
    model, train, held_out = digits_300_100
    stage(job_dir, model.SerializeToString(), evaluate=held_out, train=train)
    seen: list[str] = []
    params = PruneParams(max_accuracy_drop=0.01, fine_tune={**QUICK, "schedule": "gradual"})
    report = run_prune_job(job_dir, params, lambda stage, _: seen.append(stage))
    assert len(report.sweep) > 4
    assert not any(" from 0." in s for s in seen)
    assert not any(note.startswith("iterative pruning") for note in report.notes)
