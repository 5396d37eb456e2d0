"""One compression of a model, and the searches that try many: the accuracy-bounded sparsity
search and the per-layer sensitivity scan.

Every candidate is judged as it would be returned: pruned, fine-tuned if asked, encoded, then
run in onnxruntime on the eval inputs against the original's outputs (computed once).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto

from schemas.params import PruneParams, revalidated
from schemas.report import SensitivityPoint, SweepPoint, TrainingReport
from workers.compress.finetune import fine_tune
from workers.compress.prune import PruneOutcome, copy_model, prune_model
from workers.evaluate.data import Table
from workers.evaluate.metrics import compare
from workers.evaluate.runtime import Outputs, run, session
from workers.graph.encoding import encode
from workers.graph.weights import find_weights
from workers.nn.fit import EpochProgress

# Coarse grid of the accuracy-bounded search, then bisection between the last sparsity that
# met the bound and the first that did not.
SEARCH_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
SEARCH_REFINEMENTS = 4
SENSITIVITY_SPARSITIES = (0.5, 0.7, 0.9, 0.95)
TOLERANCE = 1e-12  # float slack in "drop <= bound"

SearchProgress = Callable[[str, float], None]


@dataclass
class Candidate:
    data: bytes
    outcome: PruneOutcome
    metric: float
    training: TrainingReport | None = None
    notes: list[str] = field(default_factory=list)


class Compressor:
    """Everything a candidate needs that does not change between candidates."""

    def __init__(
        self,
        model: ModelProto,
        original: bytes,
        feeds: dict[str, np.ndarray],
        labels: np.ndarray | None,
        params: PruneParams,
        train: Table | None,
        validation: Table | None,
    ) -> None:
        self.model = model
        self.feeds = feeds
        self.labels = labels
        self.params = params
        self.train = train
        self.validation = validation
        self.original = run(session(original), feeds)
        self.baseline = self._metric(self.original)

    def _metric(self, outputs: Outputs) -> float:
        """The metric of `outputs`: accuracy or r2 with labels, else agreement with the
        original."""
        return compare(self.original, outputs, self.labels, self.params.task).compressed

    def candidate(
        self, params: PruneParams, on_epoch: EpochProgress | None = None, only: str | None = None
    ) -> Candidate:
        outcome = prune_model(copy_model(self.model), params, only)
        training = None
        if params.fine_tune is not None:
            assert self.train is not None
            training = fine_tune(self.model, outcome, params, self.train, self.validation, on_epoch)
        data, notes = encode(outcome.model, params.encoding, outcome.pruned)
        outputs = run(session(data), self.feeds)
        return Candidate(data, outcome, self._metric(outputs), training, outcome.notes + notes)

    def meets(self, metric: float, bound: float) -> bool:
        return self.baseline - metric <= bound + TOLERANCE


def search(
    compressor: Compressor, bound: float, progress: SearchProgress
) -> tuple[Candidate | None, float | None, list[SweepPoint]]:
    """The largest sparsity whose metric drops by at most `bound`, among those tried.

    Returns (its candidate, its sparsity, every point tried); (None, None, points) when none
    met the bound.
    """
    tried: dict[float, Candidate] = {}

    def attempt(sparsity: float) -> bool:
        step = len(tried) + 1
        progress(f"candidate {step}: sparsity {sparsity:.3f}", min(0.8, 0.05 + 0.05 * step))
        params = revalidated(compressor.params, sparsity=sparsity, max_accuracy_drop=None)
        tried[sparsity] = compressor.candidate(params)
        return compressor.meets(tried[sparsity].metric, bound)

    passed, failed = 0.0, None
    for sparsity in SEARCH_GRID:
        if attempt(sparsity):
            passed = sparsity
        else:
            failed = sparsity
            break
    if failed is not None:
        for _ in range(SEARCH_REFINEMENTS):
            middle = round((passed + failed) / 2, 6)
            if attempt(middle):
                passed = middle
            else:
                failed = middle
    best = passed if passed in tried else None
    points = [
        SweepPoint(sparsity=sparsity, metric=candidate.metric, chosen=sparsity == best)
        for sparsity, candidate in sorted(tried.items())
    ]
    return (tried[best] if best is not None else None), best, points


def sensitivity(compressor: Compressor, progress: SearchProgress) -> list[SensitivityPoint]:
    """Each prunable tensor pruned alone (unstructured, no fine-tuning) at several sparsities."""
    chosen = find_weights(compressor.model, compressor.params.include, compressor.params.exclude)
    names = list(dict.fromkeys(slot.name for slot in chosen))
    points = []
    total = len(names) * len(SENSITIVITY_SPARSITIES)
    for index, name in enumerate(names):
        for position, sparsity in enumerate(SENSITIVITY_SPARSITIES):
            progress(
                f"sensitivity: {name} at {sparsity:.0%}", 0.8 + 0.1 * (index * 4 + position) / total
            )
            params = revalidated(
                compressor.params,
                sparsity=sparsity,
                threshold=None,
                max_accuracy_drop=None,
                granularity="unstructured",
                encoding="dense",
                fine_tune=None,
            )
            metric = compressor.candidate(params, only=name).metric
            points.append(SensitivityPoint(name=name, sparsity=sparsity, metric=metric))
    return points


def sensitivity_notes(points: list[SensitivityPoint], baseline: float) -> list[str]:
    """Which layers keep the metric within a point at 90% sparsity, and which do not."""
    at_90 = {point.name: point.metric for point in points if point.sparsity == 0.9}
    tolerant = [name for name, metric in at_90.items() if baseline - metric <= 0.01]
    sensitive = [name for name, metric in at_90.items() if baseline - metric > 0.01]
    notes = []
    if tolerant:
        notes.append("sensitivity: tolerate 90% alone (metric within 0.01): " + ", ".join(tolerant))
    if sensitive:
        notes.append("sensitivity: lose more than 0.01 at 90% alone: " + ", ".join(sensitive))
    return notes
