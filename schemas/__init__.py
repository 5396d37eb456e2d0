"""pydantic types shared by the service and the workers: no logic, no I/O."""

from schemas.params import (
    ClipParams,
    FineTuneParams,
    ModelSpec,
    PruneParams,
    TrainParams,
    TrainPruneParams,
)
from schemas.report import (
    AccuracyReport,
    ClipStats,
    LatencyReport,
    LayerReport,
    OnnxReport,
    Report,
    SensitivityPoint,
    SizeReport,
    SweepPoint,
    TrainingReport,
)

__all__ = [
    "AccuracyReport",
    "ClipParams",
    "ClipStats",
    "FineTuneParams",
    "LatencyReport",
    "LayerReport",
    "ModelSpec",
    "OnnxReport",
    "PruneParams",
    "Report",
    "SensitivityPoint",
    "SizeReport",
    "SweepPoint",
    "TrainParams",
    "TrainPruneParams",
    "TrainingReport",
]
