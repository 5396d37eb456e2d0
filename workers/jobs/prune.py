"""The prune job: prune a model, optionally fine-tune, search or scan, and report."""

import functools
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from onnx import ModelProto

from schemas.params import PruneParams, revalidated
from schemas.report import (
    AccuracyReport,
    CalibrationReport,
    GeneratedCheck,
    GroupReport,
    LayerReport,
    Report,
    SensitivityPoint,
    SweepPoint,
    TrainingReport,
)
from workers.compress.prune import float_params, parse_for_pruning
from workers.compress.search import Compressor, search, sensitivity
from workers.errors import InputError, one_line
from workers.evaluate.data import EvalData, InputSpec, load_eval_data
from workers.evaluate.runtime import ModelSource, NotMeasurable, generated_runs, model_inputs
from workers.graph.held import HeldModel
from workers.graph.load import serialize
from workers.graph.walk import drop_unused_initializers
from workers.jobs.advice import Facts
from workers.jobs.files import (
    EVAL_DATA,
    INPUT_DIR,
    MODEL_IN,
    TRAIN_DATA,
    attempt_dir,
    upload_field,
)
from workers.jobs.memory import prune_peak_bytes, require_memory
from workers.jobs.progress import Progress, epoch_progress, no_progress
from workers.jobs.report import (
    Beside,
    finish_report,
    gzip_size,
    latency_pair,
    onnx_report,
    score_pair,
    size_report,
)


@dataclass
class Reference:
    """The original as onnxruntime runs it, for its outputs and latency: the upload itself,
    read from its file when a session needs it rather than held beside the pruned copies; or,
    when unused initializers were dropped, the model without them."""

    path: Path
    cleaned: bytes | None = None

    @property
    def source(self) -> ModelSource:
        return self.cleaned if self.cleaned is not None else self.path


@dataclass
class Compressed:
    """The file chosen, and what the report needs of the compression beside it, once the models
    it made are let go."""

    path: Path
    accuracy: AccuracyReport | None
    layers: list[LayerReport]
    groups: list[GroupReport] | None
    params_before: int
    nonzero_after: int
    training: TrainingReport | None
    calibration: CalibrationReport | None
    sweep: list[SweepPoint] | None
    sensitivity: list[SensitivityPoint] | None
    notes: list[str]


def run_prune_job(job_dir: Path, params: PruneParams, progress: Progress = no_progress) -> Report:
    """Prune input/model.onnx (fine-tuning on input/train_data when params.fine_tune is set);
    evaluate on input/eval_data if present (else accuracy is null). With max_accuracy_drop,
    search the sparsity; with sensitivity, also scan each layer alone."""
    inputs = job_dir / INPUT_DIR
    model_path, train_path, eval_path = inputs / MODEL_IN, inputs / TRAIN_DATA, inputs / EVAL_DATA
    if params.fine_tune is not None and not train_path.exists():
        raise InputError("fine_tune needs train_data: the data to fine-tune the pruned model on")
    if not eval_path.exists() and (params.max_accuracy_drop is not None or params.sensitivity):
        what = "max_accuracy_drop" if params.max_accuracy_drop is not None else "sensitivity"
        raise InputError(f"{what} needs a metric measured on real inputs: send eval_data")
    if not eval_path.exists() and params.calibrated:
        what = "criterion activation" if params.criterion != "magnitude" else "reconstruct"
        raise InputError(f"{what} needs calibration inputs: send eval_data")
    data_bytes = sum(path.stat().st_size for path in (train_path, eval_path) if path.exists())
    require_memory(prune_peak_bytes(model_path.stat().st_size, data_bytes))
    progress("loading", 0.0)
    # The report is made inside both: the attempt's directory holds the staged model until
    # finish_report puts it in place, and every piece handed to Beside is done by then.
    with attempt_dir(job_dir) as attempt, Beside() as beside:
        # The upload is read for its gzip size beside its parse, and the read waits (between
        # pieces) while the job holds the turn: pruning's peak must not carry a 16 MB piece as
        # well, nor latency share the machine. What is left of it runs beside the check below.
        reading = functools.partial(gzip_size, model_path, turn=beside.turn)
        original_gzip = beside.submit(reading)
        with upload_field("model"):
            model, held = parse_for_pruning(model_path.read_bytes(), params)
        specs = model_inputs(model)
        notes: list[str] = []
        reference = Reference(model_path)
        if held is None and (unused := drop_unused_initializers(model)):
            reference.cleaned = serialize(model)
            notes.append(f"removed {unused} initializers that no node reads")
        validation = None
        if eval_path.exists():
            with upload_field("eval_data"):
                validation = load_eval_data(eval_path, specs, params.label)
        train = None
        if params.fine_tune is not None:
            with upload_field("train_data"):
                train = load_eval_data(train_path, specs, params.label)
            if validation is None:
                notes.append("no eval_data: the fine-tuning curve is measured on train_data")
        elif train_path.exists():
            notes.append("train_data was sent without fine_tune, so it was not used")
        with beside.turn:
            compressed = compress(
                model, held, reference, validation, params, train, progress, attempt
            )
        model_out = compressed.path  # staged in the attempt's directory until it is reported
        del model, held  # the parsed model, the pruned copy and the Compressor went with compress()

        # From here on no Python copy of either model is held: the sizes and facts are read
        # from the files, and onnxruntime reads both from them, which peaks lower than bytes.
        progress("writing", 0.9)
        latency, check = None, None
        if validation is not None:  # timed with nothing beside it, which would move the figures
            progress("evaluating", 0.95)
            with beside.turn:
                latency = latency_pair(reference.source, model_out, validation.runs[0])
        digest = hashlib.sha256()  # of the compressed file, fed by the read for its gzip size
        compressed_gzip = beside.submit(functools.partial(gzip_size, model_out, digest))
        if validation is None:
            progress("evaluating", 0.95)
            check, note = generated_check(reference.source, model_out, specs)
            notes.append(note)
        gzip_sizes = original_gzip(), compressed_gzip()
        before, after = compressed.params_before, compressed.nonzero_after
        size = size_report(reference.path, model_out, before, after, gzip_sizes)
        onnx_facts = onnx_report(model_out, digest.hexdigest())
        report = Report(
            kind="prune",
            size=size,
            layers=compressed.layers,
            groups=compressed.groups,
            accuracy=compressed.accuracy,
            latency_ms=latency,
            generated_check=check,
            onnx=onnx_facts,
            training=compressed.training,
            sweep=compressed.sweep,
            sensitivity=compressed.sensitivity,
            calibration=compressed.calibration,
            notes=notes + compressed.notes,
        )
        return finish_report(job_dir, model_out, report, progress, Facts(params))


def compress(
    model: ModelProto,
    held: HeldModel | None,
    reference: Reference,
    validation: EvalData | None,
    params: PruneParams,
    train: EvalData | None,
    progress: Progress,
    scratch: Path,
) -> Compressed:
    """The file to return, in `scratch`: one candidate as asked, or the smallest that
    max_accuracy_drop allows (a copy of the original when none does); with sensitivity, each
    layer's scan too."""
    compressor = Compressor(model, reference.source, validation, params, train, scratch, held)
    notes: list[str] = []
    sweep = None
    if params.max_accuracy_drop is None:
        progress("pruning", 0.05)
        last = not params.sensitivity  # the scan prunes the original again, layer by layer
        chosen = compressor.candidate(params, epoch_progress(progress, 0.1, 0.6), last=last)
        path, accuracy = chosen.path, chosen.chosen.accuracy
    else:
        found, sparsity, sweep = search(compressor, params.max_accuracy_drop, progress)
        if found is None:
            keep = revalidated(
                params, sparsity=0.0, max_accuracy_drop=None, fine_tune=None, encoding="dense"
            )
            chosen = compressor.candidate(keep)
            chosen.discard()
            path = scratch / MODEL_IN
            shutil.copyfile(reference.path, path)
            accuracy = compressor.measure(reference.source)
            notes.append(
                f"search: no sparsity tried kept the metric within {params.max_accuracy_drop}; "
                "the original model is returned unchanged"
            )
        else:
            chosen = found
            path, accuracy = chosen.path, chosen.chosen.accuracy
            notes.append(
                f"search: sparsity {sparsity} with encoding {chosen.chosen.encoding} is the "
                f"smallest file tried whose metric drops by at most {params.max_accuracy_drop} "
                f"({len(sweep)} files judged)"
            )
    sensitivity_points = None
    if params.sensitivity:
        sensitivity_points, sensitivity_notes = sensitivity(compressor, progress)
        notes += sensitivity_notes
    if chosen.calibration is not None:
        notes.append(
            f"calibrated on every row of eval_data ({chosen.calibration.samples} rows in "
            f"{chosen.calibration.runs} runs): the accuracy above is measured on the same "
            "inputs, so hold out rows of your own to judge the model on unseen ones"
        )
    _, nonzero_after = float_params(chosen.outcome.model, chosen.outcome.held)
    return Compressed(
        path=path,
        accuracy=accuracy,
        layers=chosen.outcome.layers,
        groups=chosen.outcome.groups,
        params_before=chosen.outcome.params_before,
        nonzero_after=nonzero_after,
        training=chosen.training,
        calibration=chosen.calibration,
        sweep=sweep,
        sensitivity=sensitivity_points,
        notes=notes + chosen.notes,
    )


def generated_check(
    original: ModelSource, compressed: ModelSource, specs: list[InputSpec]
) -> tuple[GeneratedCheck | None, str]:
    """Without eval_data nothing says how the model does on real inputs: accuracy is null. The
    two models still run on generated inputs, where they can be made, as a check that the
    compressed model runs and of how far its outputs moved on noise: the check, and a note."""
    unmeasured = "accuracy not measured: no eval_data"
    try:
        runs = generated_runs(specs)
        scores = score_pair(original, compressed, EvalData(runs, None), "auto", "auto")
    except NotMeasurable as exc:
        return None, f"{unmeasured} (and no inputs can be generated: {exc}); send eval_data"
    except InputError as exc:  # the check never fails the job: it only informs
        return None, one_line(f"{unmeasured}; on generated inputs: {exc}; send eval_data")
    check = GeneratedCheck(samples=scores.samples, runs=len(runs), scores=scores)
    return check, (
        f"{unmeasured}. On generated noise (normal floats, integers 0/1; samples: "
        f"{check.samples}, runs: {check.runs}) the compressed model's {scores.metric} against "
        "the original is "
        f"{scores.compressed:.4g} on output {scores.output!r}: a check that it runs, not its "
        "accuracy; send eval_data"
    )
