"""The prune job: prune a model, optionally fine-tune, search or scan, and report."""

from pathlib import Path

from schemas.params import PruneParams, revalidated
from schemas.report import Report
from workers.compress.prune import float_params
from workers.compress.search import Compressor, search, sensitivity
from workers.errors import InputError, one_line
from workers.evaluate.data import EvalData, InputSpec, load_eval_data
from workers.evaluate.runtime import NotMeasurable, generated_feeds, model_inputs
from workers.graph.load import parse_model, serialize
from workers.graph.walk import drop_unused_initializers
from workers.jobs.advice import Facts
from workers.jobs.files import EVAL_DATA, INPUT_DIR, MODEL_IN, TRAIN_DATA, upload_field
from workers.jobs.progress import Progress, epoch_progress, no_progress
from workers.jobs.report import finish, latency_pair, onnx_report, score_pair, size_report


def run_prune_job(job_dir: Path, params: PruneParams, progress: Progress = no_progress) -> Report:
    """Prune input/model.onnx (fine-tuning on input/train_data when params.fine_tune is set);
    evaluate on input/eval_data if present (else accuracy is null). With max_accuracy_drop,
    search the sparsity; with sensitivity, also scan each layer alone."""
    inputs = job_dir / INPUT_DIR
    train_path, eval_path = inputs / TRAIN_DATA, inputs / EVAL_DATA
    if params.fine_tune is not None and not train_path.exists():
        raise InputError("fine_tune needs train_data: the data to fine-tune the pruned model on")
    if not eval_path.exists() and (params.max_accuracy_drop is not None or params.sensitivity):
        what = "max_accuracy_drop" if params.max_accuracy_drop is not None else "sensitivity"
        raise InputError(f"{what} needs a metric measured on real inputs: send eval_data")
    if not eval_path.exists() and params.calibrated:
        what = "criterion activation" if params.criterion != "magnitude" else "reconstruct"
        raise InputError(f"{what} needs calibration inputs: send eval_data")
    progress("loading", 0.0)
    original_bytes = (inputs / MODEL_IN).read_bytes()
    with upload_field("model"):
        model = parse_model(original_bytes)
    specs = model_inputs(model)
    notes: list[str] = []
    # `reference`: the original as onnxruntime runs it, for its outputs and latency; the size
    # figures compare against the upload itself
    reference = original_bytes
    if unused := drop_unused_initializers(model):
        reference = serialize(model)
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
    compressor = Compressor(model, reference, validation, params, train)

    sweep = None
    if params.max_accuracy_drop is None:
        progress("pruning", 0.05)
        chosen = compressor.candidate(params, epoch_progress(progress, 0.1, 0.6))
        data, accuracy = chosen.data, chosen.chosen.accuracy
    else:
        found, sparsity, sweep = search(compressor, params.max_accuracy_drop, progress)
        if found is None:
            keep = revalidated(
                params, sparsity=0.0, max_accuracy_drop=None, fine_tune=None, encoding="dense"
            )
            chosen = compressor.candidate(keep)
            data, accuracy = original_bytes, compressor.measure(reference)
            notes.append(
                f"search: no sparsity tried kept the metric within {params.max_accuracy_drop}; "
                "the original model is returned unchanged"
            )
        else:
            chosen = found
            data, accuracy = chosen.data, chosen.chosen.accuracy
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
    progress("evaluating", 0.9)
    latency = None
    if validation is not None:
        latency = latency_pair(reference, data, validation.runs[0])
    else:
        notes.append(generated_check(reference, data, specs))
    _, nonzero_after = float_params(chosen.outcome.model)
    report = Report(
        kind="prune",
        size=size_report(original_bytes, data, chosen.outcome.params_before, nonzero_after),
        layers=chosen.outcome.layers,
        groups=chosen.outcome.groups,
        accuracy=accuracy,
        latency_ms=latency,
        onnx=onnx_report(data),
        training=chosen.training,
        sweep=sweep,
        sensitivity=sensitivity_points,
        calibration=chosen.calibration,
        notes=notes + chosen.notes,
    )
    progress("writing", 0.95)
    return finish(job_dir, chosen.data, report, progress, Facts(params))


def generated_check(original: bytes, compressed: bytes, specs: list[InputSpec]) -> str:
    """Without eval_data nothing says how the model does on real inputs: accuracy is null. The
    two models still run on generated inputs, where they can be made, as a check that the
    compressed model runs and of how far its outputs moved on noise."""
    unmeasured = "accuracy not measured: no eval_data"
    try:
        runs = [generated_feeds(specs)]
        accuracy = score_pair(original, compressed, EvalData(runs, None), "auto", "auto")
    except NotMeasurable as exc:
        return f"{unmeasured} (and no inputs can be generated: {exc}); send eval_data"
    except InputError as exc:  # the check never fails the job: it only informs
        return one_line(f"{unmeasured}; on generated inputs: {exc}; send eval_data")
    return (
        f"{unmeasured}. On generated noise (normal floats, integers 0/1) the compressed model's "
        f"{accuracy.metric} against the original is {accuracy.compressed:.4g} on output "
        f"{accuracy.output!r}: a check that it runs, not its accuracy; send eval_data"
    )
