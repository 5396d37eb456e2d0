"""The report a job writes next to its model: size and accuracy, original against compressed.

Every field is described here once; the descriptions reach the OpenAPI document
(`GET /openapi.json`, components `Report` and its parts), which the README points to.
"""

from pydantic import BaseModel, ConfigDict, Field

from schemas.vocabulary import ClipMode, Criterion, Encoding, JobKind, Metric


class _ReportPart(BaseModel):
    # A model that outputs inf or NaN is reported as such: JSON has no such numbers, so they
    # travel as the strings "Infinity", "-Infinity" and "NaN", and read back as floats.
    model_config = ConfigDict(ser_json_inf_nan="strings")


class SizeReport(_ReportPart):
    """File sizes and parameter counts, original against compressed."""

    original_bytes: int = Field(description="Size of the original ONNX file in bytes.")
    compressed_bytes: int = Field(description="Size of the compressed ONNX file in bytes.")
    ratio: float = Field(description="original_bytes / compressed_bytes.")
    original_gzip_bytes: int = Field(
        description="Size of the original file as a gzip file, deflated by ISA-L at level 1 "
        "(its fast level: within 0.2% of gzip -6 on dense weights, up to ~8% larger on "
        "pruned ones)."
    )
    compressed_gzip_bytes: int = Field(
        description="Size of the compressed file as a gzip file, deflated as original_gzip_bytes."
    )
    params: int = Field(description="Float parameters stored in the original model.")
    nonzero_params: int = Field(
        description="Nonzero float parameters of the compressed model (counted before int8)."
    )
    sparsity: float = Field(description="1 - nonzero_params / params.")


class LayerReport(_ReportPart):
    """One prunable tensor after compression."""

    name: str = Field(description="The tensor's name in the model.")
    original_shape: list[int] = Field(description="The tensor's shape in the original model.")
    shape: list[int] = Field(
        description="The tensor's shape in the compressed model: differs from original_shape "
        "only when structured pruning shrank it."
    )
    params: int = Field(description="Elements of the original tensor.")
    nonzero: int = Field(description="Nonzero elements of the compressed tensor.")
    sparsity: float = Field(description="1 - nonzero / params.")


class GroupReport(_ReportPart):
    """One group of coupled channels that structured pruning found (a layer's output channels
    with every slice that must go with them)."""

    leading: str = Field(description="The weight whose output channels start the group.")
    node: str = Field(description="The node that weight feeds.")
    op: str = Field(description="That node's op_type.")
    channels: int = Field(description="The group's channels in the original model.")
    kept: int = Field(
        description="Channels kept: equal to channels when the group was left whole. Conv "
        "groups of 8 or more channels keep a multiple of 4 (onnxruntime's conv kernels run "
        "faster on such widths)."
    )
    unit: int = Field(
        description="Channels removed together: 1, or an attention head's width, or a conv group."
    )
    tensors: int = Field(description="Constants sliced with the group (weights, biases, norms).")
    note: str | None = Field(None, description="Why the group was left whole, when it was.")


class OutputScore(_ReportPart):
    """One model output, compressed against original."""

    name: str = Field(description="The output's name in the model.")
    metric: Metric = Field(description="How this output is scored.")
    reason: str = Field(description="Why this metric: what metric=auto saw, or that it was asked.")
    original: float = Field(description="The metric of the original model on this output.")
    compressed: float = Field(description="The metric of the compressed model on this output.")
    samples: int = Field(
        description="Samples scored: rows of the output's first axis, over every run."
    )


class AccuracyReport(_ReportPart):
    """The compressed model scored against the original on the same samples.

    Every output is scored (outputs); the job's figure is the output whose metric lost the most,
    and a max_accuracy_drop bound applies to it."""

    metric: Metric = Field(description="The metric of the output that decides (see output).")
    output: str = Field(description="The output whose score is the job's figure.")
    reason: str = Field(description="Why this metric was chosen.")
    original: float = Field(description="The metric of the original model.")
    compressed: float = Field(description="The metric of the compressed model.")
    delta: float = Field(
        description="compressed - original: negative is a loss (for mse and relative_error, "
        "where lower is better, positive is a loss)."
    )
    samples: int = Field(description="Samples scored for the deciding output.")
    agreement: float = Field(
        description="Share of samples where the compressed model answers as the original on "
        "the deciding output: the same top-1 class, equal values for integer outputs, or "
        "cosine similarity of at least 0.99 for other float outputs."
    )
    max_abs_diff: float | None = Field(
        description="Largest absolute difference between the two models' float outputs (NaN or "
        "Infinity when an output is not finite); null when the model has no float output."
    )
    outputs: list[OutputScore] = Field(description="Every output scored.")
    collapsed: list[str] = Field(
        default_factory=list,
        description="Float outputs that varied across the original's samples but are the same "
        "for every sample from the compressed model: it no longer responds to its input there, "
        "whatever the metric reads (a bounded search never keeps such a model).",
    )


class LatencyReport(_ReportPart):
    """Inference time in onnxruntime: p50 over up to 30 runs, one thread, the same batch."""

    original: float = Field(description="p50 latency of the original model, in milliseconds.")
    compressed: float = Field(description="p50 latency of the compressed model, in milliseconds.")
    batch: int = Field(description="Rows in the batch both models ran on.")
    runs: int = Field(
        0,
        description="Timed runs of each model after one warm-up: up to 30 within 2 s of the "
        "original's, at least 3; the compressed model runs as many. 0 in reports written "
        "before runs were counted.",
    )


class GeneratedCheck(_ReportPart):
    """Without eval_data: both models on generated noise (normal floats, integers 0/1), a
    check that the compressed model runs and how far its outputs moved, not its accuracy."""

    samples: int = Field(
        description="Samples scored for the deciding output: rows of its first axis, over every "
        "run."
    )
    runs: int = Field(
        description="Runs each model made: the rows are split into runs sized from the inputs "
        "(2^20 input elements a run at most), which bounds the activations a run holds."
    )
    scores: AccuracyReport = Field(description="The compressed model against the original.")


class ClipStats(_ReportPart):
    """Gradient clipping during training, as configured and as it acted."""

    mode: ClipMode = Field(description="The clipping mode (ClipParams.mode).")
    threshold: float = Field(description="The clipping threshold ε (ClipParams.threshold).")
    clipped_fraction: float = Field(
        description="Share of steps where clipping changed the gradient."
    )
    grad_norm_p50: float = Field(
        description="Median global gradient norm per step, before clipping."
    )
    grad_norm_max: float = Field(
        description="Largest global gradient norm of any step, before clipping."
    )


class TrainingReport(_ReportPart):
    """Training or fine-tuning, per epoch and per step."""

    loss: list[float] = Field(description="Mean training loss per epoch.")
    metric: Metric = Field(
        description='The validation metric: "cosine" to the original when fine-tuning distils '
        '(class logits compared as probabilities softened by the temperature); "accuracy" '
        '(classification) or "r2" (regression) for train jobs, and on the MLP path with alpha 1 '
        "or a regressor."
    )
    validation: list[float] = Field(description="The metric on the validation data, per epoch.")
    clip: ClipStats = Field(description="Gradient clipping: its settings and what it did.")
    stopped_early: bool = Field(
        False,
        description="Whether training stopped before its last epoch because the validation "
        "metric stopped improving (patience).",
    )
    grad_norm: list[float] = Field(
        [],
        description="Global gradient norm before clipping, per step (every step_stride-th step "
        "on long runs).",
    )
    clipped: list[bool] = Field(
        [], description="Whether clipping changed the gradient, for the same steps as grad_norm."
    )
    step_stride: int = Field(
        1,
        description="grad_norm[i] and clipped[i] are step i * step_stride; above 1 when a run "
        "has more than 2000 steps.",
    )


class SweepPoint(_ReportPart):
    """One sparsity the accuracy-bounded search (max_accuracy_drop) tried."""

    sparsity: float = Field(description="The sparsity tried.")
    metric: float = Field(description="The compressed model's metric on the eval data.")
    encoding: Encoding = Field(description="The encoding of the file judged.")
    bytes: int = Field(description="Size of that file.")
    chosen: bool = Field(False, description="Whether this is the point whose model was returned.")


class SensitivityPoint(_ReportPart):
    """One tensor pruned alone to one sparsity (the sensitivity scan)."""

    name: str = Field(description="The tensor pruned, alone.")
    sparsity: float = Field(description="The sparsity it was pruned to.")
    metric: float = Field(description="The model's metric with only that tensor pruned.")


class CalibratedLayer(_ReportPart):
    """One weight pruned with calibration inputs."""

    name: str = Field(description="The weight's name in the model.")
    op: str = Field(description="The op it feeds: MatMul, Gemm or Conv.")
    method: str | None = Field(
        description="How the surviving weights were updated: least_squares (exact, per output "
        "row; structured: the layer's bias fitted with its weights) or obs (SparseGPT's update, "
        "on layers where exact least squares costs too much); bias (structured criterion "
        "activation without reconstruct: the bias alone, putting back the mean of what the "
        "cut removed); null without reconstruct."
    )
    error_before: float = Field(
        description="||WX - W'X'|| / ||WX|| on the calibration inputs with the mask alone: the "
        "layer's output in the pruned model (weights W', inputs X' as the layers before it "
        "left them) against the original's (W on X)."
    )
    error_after: float = Field(
        description="The same after reconstruction (equal to error_before without it); never "
        "larger."
    )


class CalibrationReport(_ReportPart):
    """Pruning with calibration inputs: the criterion, reconstruction, and what each cost."""

    criterion: Criterion = Field(description="How weights were ranked.")
    reconstructed: bool = Field(description="Whether surviving weights were reconstructed.")
    runs: int = Field(description="Runs of the eval_data used as calibration inputs (all).")
    samples: int = Field(description="Rows of the first input over those runs.")
    seconds: float = Field(description="Wall time of calibration, masks and reconstruction.")
    layers: list[CalibratedLayer] = Field(description="Each weight pruned with calibration.")
    uncalibrated: list[str] = Field(
        [],
        description="Weights pruned by magnitude alone and not reconstructed (the notes say "
        "why: in a subgraph, shared by several nodes, or an op layout not supported).",
    )


class OnnxReport(_ReportPart):
    """The compressed ONNX file."""

    ir_version: int = Field(description="IR version, kept from the original.")
    opsets: dict[str, int] = Field(
        description="Opset version per domain, kept from the original except what int8 "
        "quantization adds."
    )
    checker: str = Field(description='"passed", or the onnx checker\'s message.')
    model_sha256: str = Field(description="SHA-256 of the compressed file, hex.")


class Report(_ReportPart):
    """What a job produced: size, per-layer sparsity, accuracy and latency, original against
    compressed; plus training, search and sensitivity details when those ran."""

    kind: JobKind = Field(description="The job that wrote this report.")
    size: SizeReport = Field(description="File sizes and parameter counts.")
    layers: list[LayerReport] = Field(description="Each prunable tensor.")
    accuracy: AccuracyReport | None = Field(
        description="Compressed against original on the same data; null when it could not be "
        "measured (notes say why)."
    )
    latency_ms: LatencyReport | None = Field(
        description="Inference time of both models; null when the model could not be run."
    )
    generated_check: GeneratedCheck | None = Field(
        None,
        description="Prune jobs without eval_data: both models on generated inputs; null when "
        "eval_data was sent or no inputs could be generated (notes say why).",
    )
    onnx: OnnxReport = Field(description="The compressed file's ONNX facts.")
    training: TrainingReport | None = Field(
        None, description="Train jobs and fine-tuning: loss, validation and clipping."
    )
    sweep: list[SweepPoint] | None = Field(
        None,
        description="With max_accuracy_drop: every sparsity tried (chosen marks the returned one).",
    )
    sensitivity: list[SensitivityPoint] | None = Field(
        None, description="With sensitivity: true: the metric per tensor and sparsity."
    )
    groups: list[GroupReport] | None = Field(
        None,
        description="With granularity structured: each channel group, its channels before and "
        "after, and why a group was left whole.",
    )
    calibration: CalibrationReport | None = Field(
        None,
        description="With criterion activation or reconstruct: per-layer reconstruction error "
        "and the time it took.",
    )
    notes: list[str] = Field(
        [], description="What the job decided on the caller's behalf, in plain words."
    )
