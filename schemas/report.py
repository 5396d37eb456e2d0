"""The report a job writes next to its model: size and accuracy, original against compressed."""

from pydantic import BaseModel


class SizeReport(BaseModel):
    original_bytes: int
    compressed_bytes: int
    ratio: float  # original_bytes / compressed_bytes
    original_gzip_bytes: int
    compressed_gzip_bytes: int
    params: int  # float parameters of the original model
    nonzero_params: int  # nonzero float parameters of the compressed model
    sparsity: float  # 1 - nonzero_params / params


class LayerReport(BaseModel):
    name: str
    original_shape: list[int]
    shape: list[int]  # differs from original_shape only when structured pruning shrank it
    params: int  # elements of the original tensor
    nonzero: int
    sparsity: float  # 1 - nonzero / params


class AccuracyReport(BaseModel):
    metric: str  # "accuracy", "r2", or "agreement" when there are no labels
    original: float
    compressed: float
    delta: float  # compressed - original: negative is a loss
    samples: int
    agreement: float  # share of samples with equal top-1 (classification) or near-equal outputs
    max_abs_diff: float


class LatencyReport(BaseModel):
    original: float  # onnxruntime p50 in milliseconds, same batch for both
    compressed: float
    batch: int


class ClipStats(BaseModel):
    mode: str
    threshold: float
    clipped_fraction: float
    grad_norm_p50: float
    grad_norm_max: float


class TrainingReport(BaseModel):
    loss: list[float]  # mean training loss per epoch
    metric: str  # "accuracy" or "r2"
    validation: list[float]  # the metric on the validation data, per epoch
    clip: ClipStats
    stopped_early: bool = False
    grad_norm: list[float] = []  # global norm before clipping, per step (every k-th on long runs)
    clipped: list[bool] = []  # whether clipping changed that step
    step_stride: int = 1  # grad_norm[i] is step i * step_stride


class SweepPoint(BaseModel):
    sparsity: float
    metric: float  # the compressed model's metric on the eval data
    chosen: bool = False  # the point whose model was returned


class SensitivityPoint(BaseModel):
    name: str  # the tensor pruned, alone
    sparsity: float
    metric: float


class OnnxReport(BaseModel):
    ir_version: int
    opsets: dict[str, int]
    checker: str  # "passed" or the checker's message
    model_sha256: str


class Report(BaseModel):
    kind: str
    size: SizeReport
    layers: list[LayerReport]
    accuracy: AccuracyReport
    latency_ms: LatencyReport
    onnx: OnnxReport
    training: TrainingReport | None = None
    sweep: list[SweepPoint] | None = None
    sensitivity: list[SensitivityPoint] | None = None
    notes: list[str] = []  # what the job decided on the caller's behalf, in plain words
