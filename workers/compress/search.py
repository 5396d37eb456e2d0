"""One compression of a model, and the searches that try many: the accuracy-bounded sparsity
search and the per-layer sensitivity scan.

Every candidate is judged as it would be returned: pruned, fine-tuned if asked, encoded, then
run in onnxruntime on the eval inputs against the original's outputs (computed once). With
encoding auto a candidate is encoded every way that can shrink it, and the smallest file that
meets the bound is kept. With one-shot fine-tuning the search prunes iteratively (Han et al.
2015): each sparsity starts from the fine-tuned candidate of the highest sparsity below it that
met the bound, so every step repairs only the damage of its own cut.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onnx import ModelProto

from schemas.params import PruneParams, revalidated
from schemas.report import (
    AccuracyReport,
    CalibrationReport,
    GroupReport,
    LayerReport,
    SensitivityPoint,
    SweepPoint,
    TrainingReport,
)
from schemas.vocabulary import Encoding, Granularity
from workers.compress.calibrated import prune_calibrated
from workers.compress.finetune import fine_tune, tuning_data
from workers.compress.prune import PruneOutcome, copy_model, prune_model
from workers.errors import UnsupportedModelError, cut_list
from workers.evaluate.data import EvalData
from workers.evaluate.metrics import Scoring, loss, plan_scoring, score_outputs
from workers.evaluate.runtime import ModelSource, Outputs, compressed_outputs, outputs
from workers.graph.encoding import encode_file
from workers.graph.held import HeldModel
from workers.graph.weights import find_weights
from workers.nn.fit import EpochProgress

# Coarse grid of the accuracy-bounded search, then bisection between the last sparsity that
# met the bound and the first that did not.
SEARCH_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
SEARCH_REFINEMENTS = 4
SEARCH_PATIENCE = 2
SENSITIVITY_SPARSITIES = (0.5, 0.7, 0.9, 0.95)
SENSITIVITY_TOLERANCE = 0.01  # a layer "tolerates" a sparsity that loses at most this
TOLERANCE = 1e-12  # float slack in "drop <= bound"
# encoding auto tries these; dense shrinks only when structured pruning removed channels.
AUTO_ENCODINGS: tuple[Encoding, ...] = ("int8", "float16", "sparse", "dense")

SearchProgress = Callable[[str, float], None]

# The sparsity to ask of an already pruned model so that the original's reaches `target`:
# unstructured masks count the zeros already there; structured cuts only see the channels left.
FURTHER: dict[Granularity, Callable[[float, float], float]] = {
    "unstructured": lambda done, target: target,
    "structured": lambda done, target: 1 - (1 - target) / (1 - done),
}


@dataclass
class Encoded:
    """One file a candidate was written as, and how it scored (None: not measured)."""

    encoding: Encoding
    path: Path
    size: int
    accuracy: AccuracyReport | None
    notes: list[str] = field(default_factory=list)

    def discard(self) -> None:
        """Delete the file: it can no longer be the one returned (its size stays known)."""
        self.path.unlink(missing_ok=True)


@dataclass
class Candidate:
    """A pruned (and fine-tuned) model, and the file chosen among its encodings."""

    outcome: PruneOutcome
    chosen: Encoded
    tried: list[Encoded]
    training: TrainingReport | None = None
    calibration: CalibrationReport | None = None

    @property
    def path(self) -> Path:
        return self.chosen.path

    def discard(self) -> None:
        for item in self.tried:
            item.discard()

    def release(self) -> None:
        """Let go of the pruned model, the largest thing a candidate holds, once it can neither
        be returned nor pruned further: its sizes and scores stay for the sweep."""
        self.outcome.model = ModelProto()

    @property
    def notes(self) -> list[str]:
        return self.outcome.notes + self.chosen.notes


@dataclass(frozen=True)
class Start:
    """Iterative pruning: a fine-tuned candidate to prune further, and the sparsity it has."""

    sparsity: float
    candidate: Candidate


def anchored(outcome: PruneOutcome, start: PruneOutcome) -> None:
    """Make an outcome pruned from `start` report against the original model, as if pruned
    from it in one step: original shapes and parameter counts, the groups' original channels,
    every weight either step changed."""
    shapes = {layer.name: layer.original_shape for layer in start.layers}
    outcome.layers = [anchored_layer(layer, shapes.get(layer.name)) for layer in outcome.layers]
    outcome.params_before = start.params_before
    outcome.pruned |= start.pruned
    if outcome.groups is not None and start.groups is not None:
        channels = {group.leading: group.channels for group in start.groups}
        outcome.groups = [
            group.model_copy(update={"channels": channels.get(group.leading, group.channels)})
            for group in outcome.groups
        ]


def anchored_layer(layer: LayerReport, original_shape: list[int] | None) -> LayerReport:
    if original_shape is None:  # a weight the first step left alone: its shape is the original
        return layer
    params = math.prod(original_shape)
    return layer.model_copy(
        update={
            "original_shape": original_shape,
            "params": params,
            "sparsity": 1.0 - layer.nonzero / params if params else 0.0,
        }
    )


def iterative_note(sparsity: float, groups: list[GroupReport] | None) -> str:
    note = (
        "iterative pruning: pruned further from the fine-tuned candidate at sparsity "
        f"{sparsity:.4g}"
    )
    if not groups:
        return note
    removed = sum(group.channels - group.kept for group in groups)
    total = sum(group.channels for group in groups if group.note is None)
    return (
        f"{note} (the structured note counts this step; {removed} of the original's {total} "
        "channels removed in all)"
    )


class Compressor:
    """Everything a candidate needs that does not change between candidates. `evaluation` (the
    eval data; also fine-tuning's validation) None: candidates are not measured. Candidates are
    written as files into `scratch`, as they would be returned: onnxruntime reads them from
    there, and a large model's encodings are never held in memory."""

    def __init__(
        self,
        model: ModelProto,
        original: ModelSource,
        evaluation: EvalData | None,
        params: PruneParams,
        train: EvalData | None,
        scratch: Path,
        held: HeldModel | None = None,
    ) -> None:
        self.model = model
        self.held = held  # `model` is its skeleton: one candidate, pruned where it lies
        self.scratch = scratch
        self.files = 0
        self.evaluation = evaluation
        self.params = params
        # fine-tuning's data, split once for every candidate
        self.train, self.validation = (
            tuning_data(params, train, evaluation) if train is not None else (None, evaluation)
        )
        self.original: Outputs | None = None
        self.scoring: Scoring | None = None
        if evaluation is not None:
            self.original = outputs(original, evaluation.runs)
            self.scoring = plan_scoring(
                self.original, evaluation.labels, params.metric, params.task
            )

    def measure(self, model: ModelSource) -> AccuracyReport | None:
        """The file's outputs on the eval inputs, scored against the original's."""
        if self.evaluation is None:
            return None
        assert self.original is not None and self.scoring is not None
        produced = compressed_outputs(model, self.evaluation.runs)
        return score_outputs(self.scoring, self.original, produced)

    def candidate(
        self,
        params: PruneParams,
        on_epoch: EpochProgress | None = None,
        only: str | None = None,
        bound: float | None = None,
        start: Start | None = None,
        last: bool = False,
    ) -> Candidate:
        """Prune (the original, or further from `start`), fine-tune if asked, encode as asked
        (auto: every way, keeping the smallest file whose metric drops by at most `bound`, if
        given) and measure. `last`: no other candidate follows, so the original is pruned in
        place unless fine-tuning still needs it as its teacher (a copy of a large model is
        the largest allocation of a prune job)."""
        source, pruning = self.model, params
        if start is not None:
            assert params.sparsity is not None
            source = start.candidate.outcome.model
            further = FURTHER[params.granularity](start.sparsity, params.sparsity)
            pruning = revalidated(params, sparsity=round(max(0.0, further), 6))
        in_place = last and start is None and params.fine_tune is None
        if self.held is not None and not in_place:
            raise ValueError("a held model is pruned once, in place")
        model = source if in_place else copy_model(source)  # pruning works in place
        calibration = None
        if params.calibrated:  # the eval inputs are the calibration inputs
            assert self.evaluation is not None
            outcome, calibration = prune_calibrated(model, pruning, self.evaluation.runs, only)
        else:
            outcome = prune_model(model, pruning, only, self.held)
        if start is not None:
            anchored(outcome, start.candidate.outcome)
            outcome.notes.append(iterative_note(start.sparsity, outcome.groups))
        training = None
        if params.fine_tune is not None:  # after reconstruction: it starts from those weights
            assert self.train is not None
            training = fine_tune(self.model, outcome, params, self.train, self.validation, on_epoch)
        assert params.encoding is not None
        if params.encoding != "auto":
            encoded = self._encoded(outcome, params.encoding)
            return Candidate(outcome, encoded, [encoded], training, calibration)
        tried = []
        for encoding in AUTO_ENCODINGS:
            try:
                tried.append(self._encoded(outcome, encoding))
            except UnsupportedModelError as exc:  # int8 on weights the quantizer cannot take
                outcome.notes.append(f"encoding auto: {encoding} not possible: {exc}")
        meeting = [item for item in tried if bound is None or self.meets(item.accuracy, bound)]
        chosen = min(meeting or tried, key=lambda item: item.size)
        chosen.notes.append(
            "encoding auto: "
            + ", ".join(f"{item.encoding} {item.size} B" for item in tried)
            + f"; {chosen.encoding} kept"
        )
        for item in tried:  # a search only ever returns a candidate's chosen file
            if item is not chosen:
                item.discard()
        return Candidate(outcome, chosen, tried, training, calibration)

    def _encoded(self, outcome: PruneOutcome, encoding: Encoding) -> Encoded:
        self.files += 1
        path = self.scratch / f"candidate-{self.files}.{encoding}.onnx"
        if outcome.held is not None:  # dense: the held file is protobuf's bytes of the model
            outcome.held.write(path)
            notes = []
        else:
            notes = encode_file(outcome.model, encoding, outcome.pruned, path)
        return Encoded(encoding, path, path.stat().st_size, self.measure(path), notes)

    def meets(self, accuracy: AccuracyReport | None, bound: float) -> bool:
        return (
            accuracy is not None and not accuracy.collapsed and loss(accuracy) <= bound + TOLERANCE
        )


def search(
    compressor: Compressor, bound: float, progress: SearchProgress
) -> tuple[Candidate | None, float | None, list[SweepPoint]]:
    """The smallest file among the sparsities tried whose metric drops by at most `bound`
    (each sparsity's encodings included); the sparsities tried go up while they meet it.

    Returns (its candidate, its sparsity, every point tried); (None, None, points) when none
    met the bound.
    """
    tried: dict[float, Candidate] = {}
    met: list[float] = []
    settings = compressor.params.fine_tune
    # Iterative only when fine-tuning keeps the masks it is given: gradual starts again from the
    # original weights.
    iterative = settings is not None and settings.schedule == "one_shot"

    def attempt(sparsity: float) -> bool:
        step = len(tried) + 1
        below = [done for done in met if done < sparsity] if iterative else []
        start = Start(max(below), tried[max(below)]) if below else None
        stage = f"candidate {step}: sparsity {sparsity:.3f}"
        stage += "" if start is None else f" from {start.sparsity:.3f}"
        fraction = min(0.8, 0.05 + 0.05 * step)
        progress(stage, fraction)

        def on_epoch(done: int, total: int) -> None:
            # each epoch its own stage: the stage time limit bounds an epoch, not a candidate
            progress(f"{stage}, fine-tuning epoch {done}/{total}", fraction)

        params = revalidated(compressor.params, sparsity=sparsity, max_accuracy_drop=None)
        tried[sparsity] = compressor.candidate(params, on_epoch, bound=bound, start=start)
        meets = compressor.meets(tried[sparsity].chosen.accuracy, bound)
        if meets:
            met.append(sparsity)
        # The best file so far can only be beaten, never come back: the others go now, so a
        # large model's search holds one file on disk beside the candidate being judged (with
        # encoding auto, its encodings until it has chosen one). Their models go too, but for
        # the highest sparsity that met the bound: every later sparsity is above it, so an
        # iterative search starts from it and from no other.
        best = best_file(compressor, tried, bound)
        start_from = max(met) if iterative and met else None
        for done, candidate in tried.items():
            if best is None or candidate.chosen is not best[1]:
                candidate.chosen.discard()
                if done != start_from:
                    candidate.release()
        return meets

    # Up the grid until SEARCH_PATIENCE sparsities in a row miss: fine-tuning makes the metric
    # noisy (a fine-tuned 0.5 can miss by 0.1 point where 0.9 meets the bound), so one miss
    # does not end the search; the bisection runs between the last pass and the miss above it.
    passed, failed, misses = 0.0, None, 0
    for sparsity in SEARCH_GRID:
        if attempt(sparsity):
            passed, failed, misses = sparsity, None, 0
            continue
        failed = sparsity if failed is None else failed
        misses += 1
        if misses == SEARCH_PATIENCE:
            break
    if failed is not None:
        for _ in range(SEARCH_REFINEMENTS):
            middle = round((passed + failed) / 2, 6)
            if attempt(middle):
                passed = middle
            else:
                failed = middle
    best = best_file(compressor, tried, bound)
    points = [
        SweepPoint(
            sparsity=sparsity,
            metric=item.accuracy.compressed if item.accuracy else float("nan"),
            encoding=item.encoding,
            bytes=item.size,
            chosen=best is not None and item is best[1],
        )
        for sparsity, candidate in sorted(tried.items())
        for item in candidate.tried
    ]
    if best is None:
        return None, None, points
    sparsity, chosen = best
    tried[sparsity].chosen = chosen
    return tried[sparsity], sparsity, points


def best_file(
    compressor: Compressor, tried: dict[float, Candidate], bound: float
) -> tuple[float, Encoded] | None:
    """The smallest file that meets the bound (the higher sparsity among equal sizes), and its
    sparsity; None when none does."""
    meeting = [
        (item.size, -sparsity, sparsity, item)
        for sparsity, candidate in tried.items()
        for item in candidate.tried
        if compressor.meets(item.accuracy, bound)
    ]
    if not meeting:
        return None
    *_, sparsity, item = min(meeting, key=lambda entry: entry[:2])
    return sparsity, item


def sensitivity(
    compressor: Compressor, progress: SearchProgress
) -> tuple[list[SensitivityPoint], list[str]]:
    """Each prunable tensor pruned alone (unstructured, no fine-tuning) at several sparsities,
    and notes on which layers tolerate 90% alone."""
    chosen = find_weights(compressor.model, compressor.params.include, compressor.params.exclude)
    names = list(dict.fromkeys(slot.name for slot in chosen))
    points = []
    tolerant, sensitive = [], []
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
            scanned = compressor.candidate(params, only=name)
            scanned.discard()
            accuracy = scanned.chosen.accuracy
            assert accuracy is not None
            points.append(
                SensitivityPoint(name=name, sparsity=sparsity, metric=accuracy.compressed)
            )
            if sparsity == 0.9:
                fits = loss(accuracy) <= SENSITIVITY_TOLERANCE
                (tolerant if fits else sensitive).append(name)
    notes = []
    if tolerant:
        notes.append(cut_list("sensitivity: tolerate 90% alone (metric within 0.01): ", tolerant))
    if sensitive:
        notes.append(cut_list("sensitivity: lose more than 0.01 at 90% alone: ", sensitive))
    return points, notes
