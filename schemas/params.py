"""Job parameters: what a caller may ask for, validated once at the edge."""

import itertools
from typing import TypeVar

import re2
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.vocabulary import (
    ClipMode,
    Criterion,
    Encoding,
    EncodingChoice,
    Granularity,
    HiddenActivation,
    MetricChoice,
    ModelType,
    Optimizer,
    PruneSchedule,
    Scope,
    Task,
)

MAX_HIDDEN_WEIGHTS = 2**26  # 256 MiB of float32 between hidden layers
# A training step holds each hidden layer's activations and their gradients for a whole batch.
MAX_BATCH_ACTIVATIONS = 2**25  # batch_size x the hidden widths' sum: 128 MiB of float32 a copy

# include/exclude are matched by RE2, in time linear in the name: Python's backtracking re can
# take hours on a pattern such as (a+)+$ against a long tensor name, and nothing can stop it.
_PATTERN_OPTIONS = re2.Options()
_PATTERN_OPTIONS.log_errors = False  # a caller's bad pattern is their 422, not a service log line


def name_pattern(pattern: str) -> "re2._Regexp":
    """An include/exclude pattern compiled for matching tensor names."""
    return re2.compile(pattern, options=_PATTERN_OPTIONS)


P = TypeVar("P", bound=BaseModel)


def revalidated(params: P, **changes: object) -> P:
    """`params` with `changes`, validated again as a whole: pydantic's model_copy(update=...)
    skips validation, so it could make params that no caller could have sent."""
    return type(params).model_validate({**params.model_dump(), **changes})


class _Params(BaseModel):
    # Unknown keys are an error: a typo such as "sparsty" must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class ClipParams(_Params):
    """How gradients are clipped during training (see README for each mode's formula)."""

    mode: ClipMode = "global_norm"
    threshold: float = Field(1.0, gt=0, description="The clipping threshold ε (> 0).")


MAX_FINE_TUNE_EPOCHS = 1000


class FineTuneParams(_Params):
    """Fine-tuning of the surviving weights after pruning; pruned weights stay zero."""

    epochs: int = Field(100, ge=1, le=MAX_FINE_TUNE_EPOCHS)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    batch_size: int = Field(64, ge=1, le=65536)
    optimizer: Optimizer = "adam"
    clip: ClipParams = ClipParams()
    schedule: PruneSchedule = "one_shot"
    temperature: float = Field(
        2.0,
        gt=0,
        le=100,
        description="Distillation temperature T in (0, 100], default 2: the original's and the "
        "pruned model's class logits are softened by T before their KL divergence (times T², "
        "Hinton et al. 2015; a sigmoid's one logit as its two classes); higher T weighs the "
        "small scores more. Both paths: conv nets and transformers, and the MLP fast path "
        "when alpha < 1.",
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of the task loss in [0, 1], default 0.5: with labels, fine-tuning "
        "minimises (1 - alpha) distillation from the original + alpha the task loss on the "
        "labels (cross-entropy; on the MLP fast path a regressor's squared error, distilled by "
        "squared error to the original's outputs); 0 distils only, 1 trains on the labels only. "
        "The graph path uses labels that are class indices for one class-score output.",
    )
    patience: int | None = Field(
        10,
        ge=1,
        le=1000,
        description="Early stopping, 1 to 1000 epochs or null, default 10: stop after this many "
        "epochs without a better validation score (the cosine to the original, class logits "
        "as softened probabilities, a gain of at least 0.001; on the MLP fast path with alpha "
        "1 or a regressor, the metric on the labels) and keep the best weights; null trains "
        "every epoch and keeps the last.",
    )


class PruneParams(_Params):
    """Magnitude pruning of an ONNX model. Give exactly one of sparsity, threshold,
    max_accuracy_drop."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"sparsity": 0.8, "scope": "layer", "encoding": "dense"}]},
    )

    sparsity: float | None = Field(
        None, ge=0, lt=1, description="Fraction in [0, 1) of the prunable weights to set to zero."
    )
    threshold: float | None = Field(
        None, ge=0, description="Zero every prunable weight with |w| <= threshold."
    )
    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Largest allowed metric drop (absolute, 0..1 scale); the largest sparsity "
        "that keeps it is searched for.",
    )
    scope: Scope = Field(
        "layer",
        description="layer: each tensor pruned to the sparsity on its own; global: one "
        "threshold across all prunable tensors.",
    )
    granularity: Granularity = Field(
        "unstructured",
        description="unstructured: single weights; structured: whole neurons, channels or "
        "heads removed with every coupled slice, so the file itself shrinks.",
    )
    encoding: EncodingChoice | None = Field(
        None,
        description="dense, sparse, int8, or auto: the smallest file among those that meet the "
        "bound. Default: auto for a max_accuracy_drop search, else dense.",
    )
    metric: MetricChoice = Field(
        "auto",
        description="How outputs are scored. auto: accuracy or r2 with labels; without labels "
        "top1_agreement for class scores [N, C], exact_match for integer and bool outputs, "
        "cosine for other float outputs. The report says what auto chose and why.",
    )
    include: list[str] = Field(
        default_factory=list,
        description="Regexes over initializer names to prune in addition to the default "
        "(weight inputs of MatMul, Gemm, Conv, ConvTranspose).",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Regexes over initializer names never to prune."
    )
    task: Task = Field(
        "auto",
        description="How labels are scored: classification, regression, or auto (names, or "
        "integers with at most 20 distinct values, are classes).",
    )
    label: str | None = Field(
        None, description="Label column of a CSV eval/train file; default the last column."
    )
    criterion: Criterion = Field(
        "magnitude",
        description="How weights are ranked: magnitude (|w|; structured: the RMS of a unit's "
        "weights), or activation (Wanda: |w| times the L2 norm of its input over the "
        "calibration inputs, compared within each output row; structured: the output error "
        "removing a unit causes in the layers reading it). activation needs eval_data, whose "
        "inputs are the calibration inputs.",
    )
    reconstruct: bool = Field(
        False,
        description="After the mask is chosen, update each layer's surviving weights so its "
        "outputs come as close as they can to the original's on the calibration inputs "
        "(eval_data): layer after layer in graph order, each fed the outputs of the layers "
        "already reconstructed (SparseGPT-style, least squares per output row). Needs "
        "eval_data.",
    )
    fine_tune: FineTuneParams | None = Field(
        None,
        description="Fine-tune the surviving weights on train_data after pruning (epochs, "
        "learning_rate, batch_size, optimizer, clip, schedule); pruned weights stay zero.",
    )
    sensitivity: bool = Field(
        False,
        description="Also prune each tensor alone at several sparsities and report the metric, "
        "to see which layers tolerate pruning.",
    )

    @field_validator("include", "exclude")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                name_pattern(pattern)
            except re2.error as exc:
                reason = exc.args[0].decode() if isinstance(exc.args[0], bytes) else str(exc)
                raise ValueError(
                    f"{pattern!r} is not a valid regular expression: {reason} (RE2 syntax, "
                    "matched in linear time: no backreferences or lookaround)"
                ) from exc
        return patterns

    @model_validator(mode="after")
    def _exactly_one_target(self) -> "PruneParams":
        given = [
            name
            for name in ("sparsity", "threshold", "max_accuracy_drop")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of sparsity, threshold, max_accuracy_drop"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.encoding is None:
            self.encoding = "auto" if self.max_accuracy_drop is not None else "dense"
        self._calibration_fits()
        gradual = self.fine_tune is not None and self.fine_tune.schedule == "gradual"
        if gradual and (self.granularity != "unstructured" or self.threshold is not None):
            raise ValueError(
                "fine_tune.schedule gradual ramps up the sparsity of single weights: use "
                "granularity unstructured with sparsity or max_accuracy_drop"
            )
        return self

    @property
    def calibrated(self) -> bool:
        """Whether pruning runs the model on calibration inputs (the eval_data)."""
        return self.criterion != "magnitude" or self.reconstruct

    def _calibration_fits(self) -> None:
        if self.criterion == "activation" and (self.threshold is not None or self.scope != "layer"):
            raise ValueError(
                "criterion activation compares scores within each output row (or channel "
                "group): give sparsity (or max_accuracy_drop) with scope layer, not threshold or "
                "scope global"
            )
        if self.reconstruct and self.fine_tune is not None and self.fine_tune.schedule == "gradual":
            raise ValueError(
                "reconstruct with fine_tune.schedule gradual: gradual pruning starts again from "
                "the original weights, so the reconstruction would be thrown away; use one_shot"
            )


class ModelSpec(_Params):
    """The NumPy model to train."""

    type: ModelType = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64], description="Hidden layer widths.")
    activation: HiddenActivation = "relu"

    @field_validator("hidden")
    @classmethod
    def _widths_positive(cls, hidden: list[int]) -> list[int]:
        if len(hidden) > 16 or any(not 1 <= width <= 16384 for width in hidden):
            raise ValueError("hidden takes at most 16 layers, each of width 1..16384")
        between = sum(a * b for a, b in itertools.pairwise(hidden))
        if between > MAX_HIDDEN_WEIGHTS:
            raise ValueError(
                f"hidden layers would hold {between} weights between them; the limit is "
                f"{MAX_HIDDEN_WEIGHTS}"
            )
        return hidden


class TrainPruneParams(_Params):
    """Pruning applied while training: one-shot at the end, or gradual (Zhu & Gupta 2017)."""

    sparsity: float | None = Field(None, ge=0, lt=1)
    threshold: float | None = Field(None, ge=0)
    scope: Scope = "layer"
    schedule: PruneSchedule = "one_shot"
    granularity: Granularity = Field(
        "unstructured",
        description="unstructured: single weights zeroed; structured: whole hidden neurons "
        "removed after training (ranked as a prune job ranks them), then the smaller network "
        "trained again for the same epochs, learning rate, batch size, optimizer, clipping and "
        "patience (no weight decay), so the file shrinks. mlp models only.",
    )
    encoding: Encoding = Field(
        "dense",
        description="How the pruned model is stored: dense (zeros kept; gzips well), sparse "
        "(sparse_initializer), int8 (dynamic quantization) or float16.",
    )

    @model_validator(mode="after")
    def _exactly_one_target(self) -> "TrainPruneParams":
        if (self.sparsity is None) == (self.threshold is None):
            raise ValueError("give exactly one of sparsity, threshold")
        if self.schedule == "gradual" and self.sparsity is None:
            raise ValueError("schedule gradual ramps up a sparsity; give sparsity, not threshold")
        if self.schedule == "gradual" and self.granularity == "structured":
            raise ValueError(
                "schedule gradual ramps up the sparsity of single weights; granularity "
                "structured removes neurons once, after training: use schedule one_shot"
            )
        return self


class TrainParams(_Params):
    """Training of a NumPy model on an uploaded data set, exported to ONNX."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": {"type": "mlp", "hidden": [64]},
                    "epochs": 20,
                    "clip": {"mode": "global_norm", "threshold": 1.0},
                }
            ]
        },
    )

    model: ModelSpec = Field(
        ModelSpec(),
        description="The model to train: type (linear, logistic, softmax, mlp), hidden widths "
        "and activation.",
    )
    task: Task = Field(
        "auto",
        description="classification, regression, or auto: classes when the labels are "
        "names, or integers with at most 20 distinct values; else regression.",
    )
    label: str | None = Field(None, description="Label column of a CSV file; default the last.")
    epochs: int = Field(20, ge=1, le=10000, description="Passes over the training rows.")
    batch_size: int = Field(64, ge=1, le=65536, description="Rows per gradient step.")
    learning_rate: float = Field(1e-3, gt=0, le=10, description="The optimizer's step size.")
    optimizer: Optimizer = Field("adam", description="sgd, momentum or adam.")
    weight_decay: float = Field(
        0.0, ge=0, le=1, description="L2 penalty: weight_decay * w joins each weight's gradient."
    )
    clip: ClipParams = Field(
        ClipParams(),
        description="Gradient clipping: mode (none, value, norm, global_norm, adaptive) and "
        "threshold.",
    )
    prune: TrainPruneParams | None = Field(
        None,
        description="Prune while training: sparsity or threshold, scope, schedule "
        "(one_shot at the end, or gradual) and encoding.",
    )
    validation_split: float = Field(
        0.2, gt=0, lt=1, description="Share of rows held out for validation (and the report)."
    )
    patience: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Early stopping: stop after this many epochs without a better validation "
        "metric and keep the best weights. None trains every epoch.",
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seeds the split, the initial weights and the order."
    )

    @model_validator(mode="after")
    def _batch_activations_fit(self) -> "TrainParams":
        activations = self.batch_size * sum(self.model.hidden)
        if self.model.type == "mlp" and activations > MAX_BATCH_ACTIVATIONS:
            raise ValueError(
                f"batch_size x the sum of model.hidden is {activations} activations a step; the "
                f"limit is {MAX_BATCH_ACTIVATIONS}: lower batch_size or the hidden widths"
            )
        return self

    @model_validator(mode="after")
    def _structured_prune_fits(self) -> "TrainParams":
        # Structured pruning removes hidden neurons, then trains the smaller network again for
        # `epochs` as fine-tuning does (FineTuneParams.epochs: at most MAX_FINE_TUNE_EPOCHS).
        if self.prune is None or self.prune.granularity != "structured":
            return self
        if self.model.type != "mlp":
            raise ValueError(
                "prune.granularity structured removes hidden neurons; model.type "
                f"{self.model.type} has none: use model.type mlp or granularity unstructured"
            )
        if self.epochs > MAX_FINE_TUNE_EPOCHS:
            raise ValueError(
                f"prune.granularity structured trains the pruned network again for epochs; "
                f"give epochs at most {MAX_FINE_TUNE_EPOCHS} (got {self.epochs})"
            )
        return self
