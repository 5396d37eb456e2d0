"""Advice in a finished report's notes: when a result is bad or surprising, one short sentence
that says why and which parameter to change. Each rule looks at the report and what the job
knows besides it, and returns its sentence or None."""

from collections.abc import Callable
from dataclasses import dataclass

from schemas.params import PruneParams, TrainParams
from schemas.report import Report
from workers.errors import cut_list
from workers.evaluate.metrics import loss

NOTICEABLE_DROP = 0.02  # two points on the 0..1 scale: past it, a drop is worth a word
NO_SMALLER = 1.1  # a ratio below this is "the file did not shrink"
CLIPS_ALWAYS, CLIPS_NEVER = 0.9, 0.01  # shares of steps clipped that make clipping moot
NOISE_MOVED = 0.1  # ten points lost against the original on generated noise


@dataclass(frozen=True)
class Facts:
    """What the job knows that its report does not hold."""

    params: PruneParams | TrainParams
    label: str | None = None  # the label column a train job read
    label_reason: str = ""  # why that column: asked, or the last
    task_reason: str = ""  # why the task it trained: asked, or what task auto saw
    rows: int = 0  # rows of the training data
    classes: int = 0  # classes of a classifier it trained, 0 for a regressor


Rule = Callable[[Report, Facts], str | None]


def accuracy_drop_without_fine_tuning(report: Report, facts: Facts) -> str | None:
    params, accuracy = facts.params, report.accuracy
    if not isinstance(params, PruneParams) or accuracy is None:
        return None
    if params.fine_tune is not None or params.max_accuracy_drop is not None:
        return None  # recovered by training, or a bound the caller chose
    drop = loss(accuracy)
    if not drop > NOTICEABLE_DROP:  # `not >`: a NaN metric says nothing to advise on
        return None
    return (
        f"{accuracy.metric} fell by {drop:.3g} ({accuracy.original:.4g} → "
        f"{accuracy.compressed:.4g}) without fine-tuning: send train_data with fine_tune to "
        "win it back, or set max_accuracy_drop to find the largest sparsity within a bound"
    )


def outputs_collapsed(report: Report, facts: Facts) -> str | None:
    accuracy = report.accuracy
    if accuracy is None or not accuracy.collapsed:
        return None
    return cut_list(
        "the compressed model gives the same values for every eval sample on output(s) that "
        "vary in the original, whatever the metric reads: prune less (or scope layer) or "
        "fine_tune: ",
        accuracy.collapsed,
    )


def outputs_moved_on_noise(report: Report, facts: Facts) -> str | None:
    check = report.generated_check
    if check is None or not loss(check.scores) > NOISE_MOVED:
        return None
    scores = check.scores
    return (
        f"on generated noise the outputs moved far from the original's ({scores.metric} "
        f"{scores.compressed:.3g}): noise is not your data and may over- or understate this; send "
        "eval_data with real inputs to measure it, and if they agree prune less or fine_tune"
    )


def dense_file_did_not_shrink(report: Report, facts: Facts) -> str | None:
    size, key = report.size, _encoding_key(facts.params)
    if key is None or size.ratio >= NO_SMALLER or size.sparsity == 0:
        return None
    structured = ", or granularity structured," if key == "encoding" else ""
    gzip_ratio = size.original_gzip_bytes / size.compressed_gzip_bytes
    return (
        f"{key} dense keeps the zeros, so the file is as large as before ({size.ratio:.2f}x; "
        f"gzip {gzip_ratio:.1f}x): set {key} sparse or int8{structured} for a smaller file"
    )


def _encoding_key(params: PruneParams | TrainParams) -> str | None:
    """The key that chose dense for a pruned file, when another choice would shrink it."""
    if isinstance(params, PruneParams):
        dense = params.encoding == "dense" and params.granularity != "structured"
        return "encoding" if dense else None
    if params.prune is not None and params.prune.encoding == "dense":
        return "prune.encoding"
    return None


def clipping_always_or_never(report: Report, facts: Facts) -> str | None:
    training = report.training
    if training is None or training.clip.mode != "global_norm":  # the norm the report shows
        return None
    clip = training.clip
    if CLIPS_NEVER <= clip.clipped_fraction <= CLIPS_ALWAYS:
        return None
    effect = (
        "acts as a smaller learning rate"
        if clip.clipped_fraction > CLIPS_ALWAYS
        else "does nothing"
    )
    where = (
        "clip.threshold" if isinstance(facts.params, TrainParams) else "fine_tune.clip.threshold"
    )
    return (
        f"clipping changed {clip.clipped_fraction:.0%} of steps (threshold {clip.threshold:g}, "
        f"median gradient norm {clip.grad_norm_p50:.3g}), so it {effect}: set {where} near "
        f"{clip.grad_norm_p50:.3g} to cut only the largest steps"
    )


def label_and_task_chosen(report: Report, facts: Facts) -> str | None:
    params = facts.params
    if not isinstance(params, TrainParams) or facts.label is None:
        return None
    if params.label is not None and params.task != "auto":
        return None  # both asked for: nothing was chosen
    task = "classification" if facts.classes else "regression"
    return (
        f"trained {task} ({facts.task_reason}) on label column {facts.label!r} "
        f"({facts.label_reason}); set task or label if either is not what you meant"
    )


def too_many_classes(report: Report, facts: Facts) -> str | None:
    if not isinstance(facts.params, TrainParams) or facts.classes * 10 <= facts.rows:
        return None
    return (
        f"{facts.classes} classes on {facts.rows} rows, more than one class per 10 rows: the "
        f"label {facts.label!r} looks continuous; set task regression, or label to the column "
        "holding the classes"
    )


RULES: list[Rule] = [
    outputs_collapsed,
    accuracy_drop_without_fine_tuning,
    outputs_moved_on_noise,
    dense_file_did_not_shrink,
    clipping_always_or_never,
    label_and_task_chosen,
    too_many_classes,
]


def advise(report: Report, facts: Facts) -> list[str]:
    """The sentences of every rule that has something to say, in RULES order."""
    return [note for rule in RULES if (note := rule(report, facts)) is not None]
