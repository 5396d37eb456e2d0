"""Generated inputs (a prune job without eval_data): as many rows as fit the cap, run a few at
a time when each row is large, so that a run's activations stay bounded."""

import numpy as np

from workers.evaluate.data import InputSpec
from workers.evaluate.runtime import GENERATED_ROWS, MAX_RUN_ELEMENTS, generated_runs


def rows(runs: list[dict[str, np.ndarray]], name: str) -> list[int]:
    return [len(feeds[name]) for feeds in runs]


def test_a_narrow_input_runs_every_row_at_once():
    runs = generated_runs([InputSpec("X", np.dtype(np.float32), (None, 4096))])
    assert rows(runs, "X") == [GENERATED_ROWS]


def test_an_image_input_runs_a_few_rows_at_a_time():
    image = InputSpec("image", np.dtype(np.float32), (None, 3, 224, 224))
    runs = generated_runs([image, InputSpec("scale", np.dtype(np.int64), (1,))])
    per_run = MAX_RUN_ELEMENTS // (3 * 224 * 224)  # 6
    assert rows(runs, "image") == [per_run] * 10 + [GENERATED_ROWS - 10 * per_run]
    assert all(feeds["image"][0].size * per_run <= MAX_RUN_ELEMENTS for feeds in runs)
    assert all(feeds["scale"].shape == (1,) for feeds in runs)
    # the rows differ from run to run: one generator draws them all
    assert not np.array_equal(runs[0]["image"], runs[1]["image"])


def test_inputs_without_a_batch_dim_run_once():
    runs = generated_runs([InputSpec("x", np.dtype(np.float32), (3, 5))])
    assert len(runs) == 1 and runs[0]["x"].shape == (3, 5)
