"""The prune job: prune a model, optionally fine-tune, search or scan, and report."""

from pathlib import Path

from schemas.params import PruneParams, revalidated
from schemas.report import Report
from workers.compress.prune import float_params
from workers.compress.search import Compressor, search, sensitivity, sensitivity_notes
from workers.errors import InputError
from workers.evaluate.data import load_eval_data
from workers.evaluate.runtime import generated_feeds, model_inputs
from workers.graph.load import parse_model
from workers.jobs.files import EVAL_DATA, INPUT_DIR, MODEL_IN, TRAIN_DATA
from workers.jobs.progress import Progress, epoch_progress, no_progress
from workers.jobs.report import evaluate_pair, finish, onnx_report, size_report


def run_prune_job(job_dir: Path, params: PruneParams, progress: Progress = no_progress) -> Report:
    """Prune input/model.onnx (fine-tuning on input/train_data when params.fine_tune is set);
    evaluate on input/eval_data if present, else on generated inputs. With max_accuracy_drop,
    search the sparsity; with sensitivity, also scan each layer alone."""
    inputs = job_dir / INPUT_DIR
    train_path, eval_path = inputs / TRAIN_DATA, inputs / EVAL_DATA
    if params.fine_tune is not None and not train_path.exists():
        raise InputError("fine_tune needs train_data: the data to fine-tune the pruned model on")
    progress("loading", 0.0)
    original_bytes = (inputs / MODEL_IN).read_bytes()
    model = parse_model(original_bytes)
    specs = model_inputs(model)
    notes: list[str] = []
    validation = None
    if eval_path.exists():
        validation = load_eval_data(eval_path, specs, params.label)
        feeds, labels = validation.features, validation.labels
    else:
        feeds, labels = generated_feeds(specs), None
        notes.append("no eval_data: accuracy is agreement with the original on generated inputs")
    train = None
    if params.fine_tune is not None:
        train = load_eval_data(train_path, specs, params.label)
        if validation is None:
            notes.append("no eval_data: the fine-tuning curve is measured on train_data")
    elif train_path.exists():
        notes.append("train_data was sent without fine_tune, so it was not used")
    compressor = Compressor(model, original_bytes, feeds, labels, params, train, validation)

    sweep = None
    if params.max_accuracy_drop is None:
        progress("pruning", 0.05)
        chosen = compressor.candidate(params, epoch_progress(progress, 0.1, 0.6))
    else:
        found, sparsity, sweep = search(compressor, params.max_accuracy_drop, progress)
        if found is None:
            keep = revalidated(
                params, sparsity=0.0, max_accuracy_drop=None, fine_tune=None, encoding="dense"
            )
            chosen = compressor.candidate(keep)
            chosen.data = original_bytes
            notes.append(
                f"no sparsity tried kept the {compressor.baseline:.4f} metric within "
                f"{params.max_accuracy_drop}; the original model is returned unchanged"
            )
        else:
            chosen = found
            notes.append(
                f"search: sparsity {sparsity} is the largest tried whose metric drops by at most "
                f"{params.max_accuracy_drop} ({len(sweep)} candidates)"
            )
    sensitivity_points = None
    if params.sensitivity:
        sensitivity_points = sensitivity(compressor, progress)
        notes += sensitivity_notes(sensitivity_points, compressor.baseline)

    progress("evaluating", 0.9)
    accuracy, latency = evaluate_pair(original_bytes, chosen.data, feeds, labels, params.task)
    _, nonzero_after = float_params(chosen.outcome.model)
    report = Report(
        kind="prune",
        size=size_report(original_bytes, chosen.data, chosen.outcome.params_before, nonzero_after),
        layers=chosen.outcome.layers,
        accuracy=accuracy,
        latency_ms=latency,
        onnx=onnx_report(chosen.data),
        training=chosen.training,
        sweep=sweep,
        sensitivity=sensitivity_points,
        notes=notes + chosen.notes,
    )
    progress("writing", 0.95)
    return finish(job_dir, chosen.data, report, progress)
