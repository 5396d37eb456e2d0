"""The accuracy-bounded sparsity search and the per-layer sensitivity scan."""

from pathlib import Path

import numpy as np
import pytest
from graphs import gemm_mlp
from helpers import run
from onnx import numpy_helper

from schemas import PruneParams
from workers.compress.search import Candidate, Compressor
from workers.jobs import run_prune_job
from workers.jobs.files import ATTEMPT_PREFIX


def stage(job_dir: Path, model: bytes, evaluate=None, train=None) -> None:
    (job_dir / "input" / "model.onnx").write_bytes(model)
    for name, data in (("eval_data", evaluate), ("train_data", train)):
        if data is not None:
            np.savez(job_dir / f"{name}.npz", X=data[0], y=data[1])
            (job_dir / f"{name}.npz").rename(job_dir / "input" / name)


@pytest.mark.parametrize("bound", [0.0, 0.01, 0.05])
def test_the_search_never_returns_a_model_that_breaks_the_bound(job_dir, digits_300_100, bound):
    model, _, held_out = digits_300_100
    stage(job_dir, model.SerializeToString(), evaluate=held_out)
    seen = []
    report = run_prune_job(
        job_dir, PruneParams(max_accuracy_drop=bound), lambda stage, f: seen.append(stage)
    )
    assert report.accuracy.delta >= -bound - 1e-12
    sparsities = sorted({point.sparsity for point in report.sweep})
    assert [point.sparsity for point in report.sweep] == sorted(p.sparsity for p in report.sweep)
    assert len(sparsities) >= 5
    assert sum(stage.startswith("candidate") for stage in seen) == len(sparsities)
    # encoding auto: each sparsity is judged as int8, float16, sparse and dense files
    assert {point.encoding for point in report.sweep} == {"int8", "float16", "sparse", "dense"}
    meeting = [p for p in report.sweep if report.accuracy.original - p.metric <= bound + 1e-12]
    chosen = [point for point in report.sweep if point.chosen]
    if chosen:
        (point,) = chosen
        assert point.metric == pytest.approx(report.accuracy.compressed)
        assert point.bytes == report.size.compressed_bytes
        assert point.bytes == min(p.bytes for p in meeting)  # the smallest file within the bound
        assert all(abs(layer.sparsity - point.sparsity) <= 1e-3 for layer in report.layers)
    else:
        assert not meeting
    x_test, y_test = held_out
    labels, _ = run((job_dir / "model.onnx").read_bytes(), {"X": x_test})
    assert np.mean(labels == y_test) == pytest.approx(report.accuracy.compressed)


def candidate_dirs(job_dir: Path) -> list[Path]:
    return sorted(job_dir.glob(f"{ATTEMPT_PREFIX}*"))


def test_a_search_keeps_one_candidate_file_on_disk_and_leaves_none(job_dir, digits_300_100):
    """Candidates are judged as files: every one but the best so far is deleted as the search
    goes (a large model's search would otherwise fill the disk), and none outlives the job."""
    model, _, held_out = digits_300_100
    stage(job_dir, model.SerializeToString(), evaluate=held_out)
    on_disk: list[list[str]] = []

    def watch(stage: str, fraction: float) -> None:
        if stage.startswith("candidate"):
            (scratch,) = candidate_dirs(job_dir)
            on_disk.append(sorted(path.name for path in scratch.iterdir()))

    report = run_prune_job(job_dir, PruneParams(max_accuracy_drop=0.02), watch)
    assert len(on_disk) >= 5 and on_disk[0] == []
    assert all(len(names) <= 1 for names in on_disk)
    assert any(on_disk) and not candidate_dirs(job_dir)
    assert (job_dir / "model.onnx").stat().st_size == report.size.compressed_bytes


@pytest.mark.parametrize("fine_tune", [None, {"epochs": 3}])
def test_a_search_holds_the_models_of_two_candidates_at_most(
    job_dir, digits_300_100, monkeypatch, fine_tune
):
    """Each candidate holds a pruned copy of the model; one that can neither be returned nor
    (iterative search, with fine-tuning) be pruned further lets it go, so a large model's search
    does not grow by a model per sparsity tried."""
    model, train, held_out = digits_300_100
    stage(job_dir, model.SerializeToString(), evaluate=held_out, train=train)
    made: list[Candidate] = []
    judge = Compressor.candidate

    def recorded(self: Compressor, *args, **kwargs) -> Candidate:
        made.append(judge(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(Compressor, "candidate", recorded)
    params = PruneParams(max_accuracy_drop=0.01, granularity="structured", fine_tune=fine_tune)
    report = run_prune_job(job_dir, params)
    held = [candidate for candidate in made if candidate.outcome.model.graph.node]
    assert len(made) >= 5 and 1 <= len(held) <= (2 if fine_tune else 1)
    (chosen,) = [point for point in report.sweep if point.chosen]
    assert chosen.bytes in {candidate.chosen.size for candidate in held}


def test_a_retry_is_not_stopped_by_the_candidates_a_dead_attempt_left(job_dir, digits_300_100):
    """A worker killed mid-job leaves its candidate files; the retry in the same directory
    works in its own and removes it, leaving the dead attempt's to the runner, which removes
    them as the job's next run starts and as it ends (tests/test_attempt_files.py)."""
    model, _, held_out = digits_300_100
    stage(job_dir, model.SerializeToString(), evaluate=held_out)
    stale = job_dir / f"{ATTEMPT_PREFIX}dead"
    stale.mkdir()
    (stale / "candidate-1.dense.onnx").write_bytes(b"half a file")
    report = run_prune_job(job_dir, PruneParams(sparsity=0.5))
    assert report.accuracy is not None and candidate_dirs(job_dir) == [stale]


def test_a_bound_no_sparsity_meets_returns_the_original_model(job_dir):
    model = gemm_mlp([8, 32, 16, 2], trans_b=0)
    features = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    (targets,) = run(model, {"X": features})  # r2 of the original is exactly 1
    data = model.SerializeToString()
    stage(job_dir, data, evaluate=(features, targets))
    report = run_prune_job(job_dir, PruneParams(max_accuracy_drop=0.0, task="regression"))
    assert report.accuracy.original == pytest.approx(1.0)
    assert not any(point.chosen for point in report.sweep)
    assert (job_dir / "model.onnx").read_bytes() == data
    assert report.size.ratio == 1.0 and report.accuracy.delta == 0.0
    assert any("original model is returned unchanged" in note for note in report.notes)


def test_search_with_fine_tuning_reaches_further(job_dir, tmp_path, digits_300_100):
    model, train, held_out = digits_300_100
    stage(job_dir, model.SerializeToString(), evaluate=held_out, train=train)
    fine_tune = {
        "epochs": 15,
        "learning_rate": 3e-3,
        "clip": {"mode": "global_norm", "threshold": 0.25},
    }
    params = PruneParams(max_accuracy_drop=0.01, fine_tune=fine_tune, encoding="sparse")
    report = run_prune_job(job_dir, params)
    (chosen,) = [point for point in report.sweep if point.chosen]
    assert chosen.sparsity >= 0.9 and report.accuracy.delta >= -0.01
    assert report.training is not None


def test_sensitivity_scans_each_layer_alone(job_dir, digits_300_100):
    model, _, held_out = digits_300_100
    stage(job_dir, model.SerializeToString(), evaluate=held_out)
    report = run_prune_job(job_dir, PruneParams(sparsity=0.5, sensitivity=True))
    names = {point.name for point in report.sensitivity}
    assert names == {"coefficient", "coefficient1", "coefficient2"}
    assert len(report.sensitivity) == 3 * 4
    by_point = {(p.name, p.sparsity): p.metric for p in report.sensitivity}
    assert by_point[("coefficient2", 0.95)] < by_point[("coefficient2", 0.5)]
    assert any(note.startswith("sensitivity:") for note in report.notes)


def test_a_model_that_answers_every_input_alike_is_flagged_and_never_kept(job_dir, tmp_path):
    """Global pruning can take a whole layer of small weights: every input then gets the same
    output, which top-1 agreement on eval data of one class, or a cosine, may still read as fine
    (open_nsfw at 50% global: top1_agreement 1.0 -> 1.0 on 36 photos)."""
    model = gemm_mlp([6, 8, 8, 3], trans_b=0)
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * 1e-3, first.name))
    features = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    searched_dir = tmp_path / "searched"
    (searched_dir / "input").mkdir(parents=True)
    for directory in (job_dir, searched_dir):
        (directory / "input" / "model.onnx").write_bytes(model.SerializeToString())
        np.savez(directory / "eval.npz", X=features)
        (directory / "eval.npz").rename(directory / "input" / "eval_data")
    output = model.graph.output[0].name

    pruned = run_prune_job(job_dir, PruneParams(sparsity=0.5, scope="global"))
    assert pruned.accuracy.collapsed == [output]
    assert any("same values for every eval sample" in note for note in pruned.notes)

    searched = run_prune_job(searched_dir, PruneParams(max_accuracy_drop=1.0, scope="global"))
    assert searched.accuracy.collapsed == []
    assert any(point.chosen for point in searched.sweep)
    assert all(point.sparsity < 48 / 136 for point in searched.sweep if point.chosen)
