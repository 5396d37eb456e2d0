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
    "SizeReport",
    "SweepPoint",
    "TrainParams",
    "TrainPruneParams",
    "TrainingReport",
]
