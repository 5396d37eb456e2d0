"""Progress of a job as (stage, fraction): the backend decides where it is shown or stored."""

from collections.abc import Callable

from workers.nn.fit import EpochProgress

Progress = Callable[[str, float], None]


def no_progress(stage: str, fraction: float) -> None:
    """The default progress callback: progress goes nowhere."""


def epoch_progress(progress: Progress, start: float, end: float) -> EpochProgress:
    def on_epoch(done: int, total: int) -> None:
        progress(f"epoch {done}/{total}", start + (end - start) * done / total)

    return on_epoch
