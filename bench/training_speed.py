"""Training speed of the NumPy MLP against the machine's own sgemm rate, measured in this run.

Run: .venv/bin/python bench/training_speed.py

MLP 784-512-256-10, batch 128, 10,000 synthetic samples, one epoch, global_norm clipping.
Baselines: one large float32 np.matmul (the sgemm rate), and the same loop with clipping off.
Targets (issue 7): training FLOP rate >= 70% of sgemm; clipping overhead <= 5% of step time.

FLOPs are the matmul multiply-adds the epoch actually computes (2 per multiply-add), nothing
else: per sample, forward 2 * in * out per layer, backward 2 * in * out per layer for the weight
gradient and again for the gradient at the layer's input, except the first layer, whose input
gradient nobody needs and the loop does not compute. The epoch's validation forward pass over
256 samples is computed inside the timed run, so it counts too. Bias adds, activations, softmax,
clipping and the optimizer are work without counted FLOPs. (The usual 6 * weights * samples
would credit the first layer's input gradient, a quarter of the FLOPs here, which is never
computed.)
"""

import itertools
import sys
import time

import numpy as np

from schemas.params import ClipParams
from workers.nn.fit import FitSettings, fit
from workers.nn.network import initialise

SIZES = [784, 512, 256, 10]
BATCH, SAMPLES, REPEATS = 128, 10_000, 7
VALIDATION = 256  # samples scored after the epoch


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def sgemm_rate() -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    b = rng.standard_normal((2048, 2048), dtype=np.float32)
    a @ b  # warm up the BLAS threads
    return 2 * 2048**3 / best_of(REPEATS, lambda: a @ b)


def epoch_runner(mode: str):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((SAMPLES, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], SAMPLES)
    settings = FitSettings(
        epochs=1,
        batch_size=BATCH,
        learning_rate=1e-3,
        optimizer="adam",
        clip=ClipParams(mode=mode, threshold=1.0),
    )

    def one_epoch() -> float:
        """Seconds to train a fresh network for one epoch; drawing its initial weights (10 ms
        of float64 normals, not training) happens before the clock starts."""
        network = initialise(SIZES, ["relu", "relu"], "softmax", np.random.default_rng(0))
        started = time.perf_counter()
        fit(network, x, y, x[:VALIDATION], y[:VALIDATION], settings, np.random.default_rng(0))
        return time.perf_counter() - started

    return one_epoch


def epoch_flops() -> int:
    """Matmul FLOPs of one epoch as the loop computes them (see the module docstring)."""
    layers = [fan_in * fan_out for fan_in, fan_out in itertools.pairwise(SIZES)]
    forward = 2 * sum(layers)  # per sample: h @ W
    weight_grads = 2 * sum(layers)  # h.T @ dz
    input_grads = 2 * sum(layers[1:])  # dz @ W.T, not for the first layer
    return (forward + weight_grads + input_grads) * SAMPLES + forward * VALIDATION


def main() -> int:
    flops = epoch_flops()
    rate = sgemm_rate()
    # Alternate the two loops and keep each one's best, so a noisy neighbour hurts both alike.
    runs = {mode: epoch_runner(mode) for mode in ("none", "global_norm")}
    best = {mode: float("inf") for mode in runs}
    for _ in range(REPEATS):
        for mode, run in runs.items():
            best[mode] = min(best[mode], run())
    plain, clipped = best["none"], best["global_norm"]
    achieved = flops / clipped
    share = achieved / rate
    overhead = clipped / plain - 1
    print(f"{'':<34} {'baseline':>12} {'figure':>12} {'ratio':>8}  target")
    print(
        f"{'training FLOP rate (GFLOP/s)':<34} {rate / 1e9:>12.1f} {achieved / 1e9:>12.1f} "
        f"{share:>8.2f}  >= 0.70 {'PASS' if share >= 0.7 else 'MISS'}"
    )
    print(
        f"{'epoch with clipping (s)':<34} {plain:>12.3f} {clipped:>12.3f} {1 + overhead:>8.3f}  "
        f"<= 1.05 {'PASS' if overhead <= 0.05 else 'MISS'}"
    )
    try:
        import torch  # noqa: F401  (informational only; not a dependency)
    except ImportError:
        print("PyTorch not installed: no comparison (informational)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
