"""The training loop: mini-batches, clipped gradients, masks that keep pruned weights at zero,
gradual or one-shot pruning, early stopping, and the statistics the report shows."""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from schemas.params import ClipParams, FineTuneParams, TrainParams
from schemas.report import ClipStats, TrainingReport
from schemas.vocabulary import Head, Optimizer, PruneSchedule, Scope
from workers.errors import InputError
from workers.nn.clipping import clip_gradients
from workers.nn.masks import magnitude_masks
from workers.nn.network import HEADS, Loss, Network, distilled_loss
from workers.nn.optimizers import OPTIMIZERS

# Gradual pruning (Zhu & Gupta 2017) ramps sparsity up over this share of the epochs and
# fine-tunes with the final mask for the rest.
GRADUAL_RAMP_SHARE = 0.75

EpochProgress = Callable[[int, int], None]  # (epochs done, epochs in all)
Validation = Callable[[np.ndarray], float]  # the validation rows' logits -> score, higher better


TRAINING_ADVICE = (
    "lower learning_rate or clip gradients (clip.mode global_norm with a threshold near the "
    "typical gradient norm)"
)


class TrainingDivergedError(InputError):
    title = "Training diverged"


@dataclass(frozen=True)
class PruneTarget:
    sparsity: float | None
    threshold: float | None
    scope: Scope
    schedule: PruneSchedule
    prunable: tuple[bool, ...] | None = None  # which weight matrices may be pruned; None: all


@dataclass(frozen=True)
class FitSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: Optimizer
    clip: ClipParams
    weight_decay: float = 0.0
    patience: int | None = None
    # the gain in validation score over the last epoch that made one which resets the patience
    # count (Keras' min_delta); smaller gains still pick the epoch kept
    min_gain: float = 0.0
    prune: PruneTarget | None = None

    @classmethod
    def of(
        cls, params: TrainParams | FineTuneParams, prune: PruneTarget | None, **extra: Any
    ) -> "FitSettings":
        """The settings a train job's or a fine-tuning's params ask for."""
        return cls(
            epochs=params.epochs,
            batch_size=params.batch_size,
            learning_rate=params.learning_rate,
            optimizer=params.optimizer,
            clip=params.clip,
            prune=prune,
            **extra,
        )


@dataclass(frozen=True)
class Teacher:
    """A model to learn from beside the labels (Hinton et al. 2015): its logits on every training
    row, computed once; the loss is (1 - alpha) distillation at `temperature` + alpha the
    head's loss on the labels."""

    logits: np.ndarray  # [rows, out], in the training rows' order
    temperature: float
    alpha: float

    def loss(self, head: Head, batch: np.ndarray) -> Loss:
        """The blended loss of the rows `batch` of the training data."""
        rule = HEADS[head]
        return partial(
            distilled_loss,
            rule.loss,
            rule.distillation,
            self.logits[batch],
            self.temperature,
            self.alpha,
        )


@dataclass
class EarlyStopping:
    """The best weights seen, and when to stop: after `patience` epochs whose score did not
    beat the last gain by `min_gain` (Keras' min_delta); a smaller gain still makes its weights
    the best. patience None: every epoch is trained and the last one kept, nothing chosen."""

    patience: int | None
    min_gain: float
    best: tuple[float, list[np.ndarray]] | None = None
    gained: float = -np.inf  # the last score that beat the one before by min_gain
    since_gain: int = 0

    def stop_after(self, score: float, params: list[np.ndarray]) -> bool:
        if self.patience is None:
            return False
        if self.best is None or score > self.best[0]:
            self.best = (score, [p.copy() for p in params])
        if score > self.gained + self.min_gain:
            self.gained, self.since_gain = score, 0
            return False
        self.since_gain += 1
        return self.patience is not None and self.since_gain >= self.patience

    def restore_best(self, params: list[np.ndarray]) -> None:
        if self.best is not None:
            for p, saved in zip(params, self.best[1], strict=True):
                p[...] = saved


@dataclass
class History:
    loss: list[float] = field(default_factory=list)  # mean training loss per epoch
    validation: list[float] = field(default_factory=list)  # validation metric per epoch
    grad_norms: list[float] = field(default_factory=list)  # global norm before clipping, per step
    clipped: list[bool] = field(default_factory=list)  # did clipping change the step
    stopped_early: bool = False

    def record_step(
        self,
        loss: float,
        norm: float,
        grads: list[np.ndarray],
        clipped: list[np.ndarray],
        epoch: int,
        what: str,
        advice: str,
    ) -> None:
        """Keep a step's gradient norm and whether clipping changed it; a non-finite loss or
        norm is refused as diverged, naming the step, the epoch and `advice`."""
        if not (np.isfinite(loss) and np.isfinite(norm)):
            raise TrainingDivergedError(
                f"{what} diverged at step {len(self.grad_norms) + 1} (epoch {epoch + 1}): "
                f"loss {loss}, gradient norm {norm}; {advice}"
            )
        self.grad_norms.append(norm)
        self.clipped.append(any(c is not g for c, g in zip(clipped, grads, strict=True)))


def gradual_sparsity(final: float, epoch: int, ramp_epochs: int) -> float:
    """Zhu & Gupta's cubic schedule from 0: s = final * (1 - (1 - epoch / ramp)^3)."""
    progress = min(1.0, epoch / ramp_epochs)
    return final * (1.0 - (1.0 - progress) ** 3)


def weight_masks(network: Network, target: PruneTarget, sparsity: float | None) -> list[np.ndarray]:
    """1 keep / 0 prune per weight matrix; matrices the target leaves alone keep everything."""
    prunable = target.prunable or (True,) * len(network.weights)
    chosen = [w for w, may in zip(network.weights, prunable, strict=True) if may]
    keep = iter(
        magnitude_masks(
            chosen,
            sparsity=sparsity if target.threshold is None else None,
            threshold=target.threshold,
            scope=target.scope,
        )
    )
    return [
        (next(keep) if may else np.ones(w.shape, dtype=bool)).astype(w.dtype)
        for w, may in zip(network.weights, prunable, strict=True)
    ]


def apply_masks(network: Network, masks: list[np.ndarray] | None) -> None:
    if masks is not None:
        for w, mask in zip(network.weights, masks, strict=True):
            w *= mask


# Overflow is detected in the loop and reported with its step; NumPy's warnings add only noise.
@np.errstate(over="ignore", invalid="ignore")
def fit(
    network: Network,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    settings: FitSettings,
    rng: np.random.Generator,
    masks: list[np.ndarray] | None = None,
    on_epoch: EpochProgress | None = None,
    teacher: Teacher | None = None,
    validate: Validation | None = None,
) -> History:
    """Train `network` in place on standardised inputs.

    `masks` (one per weight matrix, 1 keep / 0 pruned) hold pruned weights at zero throughout.
    `teacher`: distil from its logits on x_train as well as learn y_train; None: the labels alone.
    `validate`: scores the logits of x_val each epoch; None: the head's metric against y_val.
    """
    history = History()
    params = network.params
    step = OPTIMIZERS[settings.optimizer](params, settings.learning_rate, settings.weight_decay)
    target = settings.prune
    ramp = max(1, round(GRADUAL_RAMP_SHARE * settings.epochs))
    gradual = target is not None and target.schedule == "gradual"
    stopping = EarlyStopping(settings.patience, settings.min_gain)
    rows = len(x_train)
    for epoch in range(settings.epochs):
        if gradual and 0 < epoch <= ramp:
            assert target is not None and target.sparsity is not None
            masks = weight_masks(network, target, gradual_sparsity(target.sparsity, epoch, ramp))
            apply_masks(network, masks)
        order = rng.permutation(rows)
        losses = []
        for start in range(0, rows, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            loss_of = None if teacher is None else teacher.loss(network.head, batch)
            loss, grads = network.loss_and_grads(x_train[batch], y_train[batch], loss_of)
            if masks is not None:
                for g, mask in zip(network.weight_grads(grads), masks, strict=True):
                    g *= mask
            # The loop owns these gradients, so clipping may overwrite them: it gets views (the
            # same memory, other array objects, so `c is g` below still tells a clipped tensor
            # from one left alone). Scaling in place costs a third of writing a fresh set here.
            clipped, norm = clip_gradients(
                grads,
                settings.clip.mode,
                settings.clip.threshold,
                params,
                out=[g.view() for g in grads],
            )
            history.record_step(loss, norm, grads, clipped, epoch, "training", TRAINING_ADVICE)
            step(params, clipped)
            apply_masks(network, masks)
            losses.append(loss)
        history.loss.append(float(np.mean(losses)))
        history.validation.append(
            network.score(x_val, y_val) if validate is None else validate(network.forward(x_val)[0])
        )
        if on_epoch is not None:
            on_epoch(epoch + 1, settings.epochs)
        # the best weights are kept and patience counted only once the ramp has ended
        judged = not gradual or epoch >= ramp
        if judged and stopping.stop_after(history.validation[-1], params):
            history.stopped_early = epoch + 1 < settings.epochs  # not when it ran them all
            break
    stopping.restore_best(params)
    if target is not None:
        final = weight_masks(network, target, target.sparsity)
        apply_masks(network, final)
    return history


def clip_stats(clip: ClipParams, history: History) -> ClipStats:
    norms = history.grad_norms or [0.0]
    return ClipStats(
        mode=clip.mode,
        threshold=clip.threshold,
        clipped_fraction=float(np.mean(history.clipped)) if history.clipped else 0.0,
        grad_norm_p50=float(np.median(norms)),
        grad_norm_max=float(np.max(norms)),
    )


MAX_REPORTED_STEPS = 2000  # per-step series in a report are thinned to about this many


def training_report(metric: str, clip: ClipParams, history: History) -> TrainingReport:
    stride = max(1, -(-len(history.grad_norms) // MAX_REPORTED_STEPS))
    return TrainingReport(
        loss=history.loss,
        metric=metric,
        validation=history.validation,
        clip=clip_stats(clip, history),
        stopped_early=history.stopped_early,
        grad_norm=history.grad_norms[::stride],
        clipped=history.clipped[::stride],
        step_stride=stride,
    )
