"""The compression frontier of the 64-300-100-10 digits MLP (scikit-learn + skl2onnx), and of a
diabetes regressor: size ratio against held-out metric for each way of compressing.

Run: .venv/bin/python bench/frontier.py    (seeded; about a minute on 2 cores)

Targets (issue 6): a model at least 40x smaller in raw bytes within 1.0 point of the original's
held-out accuracy; max_accuracy_drop=0.01 with train data returns a model at least 10x smaller
that meets the bound on the held-out split.
"""

import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor

from schemas import PruneParams, Report
from workers.jobs import run_prune_job

FINE_TUNE = {
    "epochs": 80,
    "learning_rate": 3e-3,
    "clip": {"mode": "global_norm", "threshold": 0.25},
}
SEARCH_FINE_TUNE = {**FINE_TUNE, "epochs": 30}

METHODS: list[tuple[str, dict]] = [
    ("one-shot unstructured 90%", {"sparsity": 0.9}),
    ("fine-tuned unstructured 90%", {"sparsity": 0.9, "fine_tune": FINE_TUNE}),
    (
        "structured 88% + fine-tune",
        {"sparsity": 0.88, "granularity": "structured", "fine_tune": FINE_TUNE},
    ),
]


def npz(features: np.ndarray, labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, X=features.astype(np.float32), y=labels)
    return buffer.getvalue()


def digits_mlp() -> tuple[bytes, bytes, bytes]:
    features, labels = load_digits(return_X_y=True)
    features = (features / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.3, random_state=0
    )
    mlp = MLPClassifier(hidden_layer_sizes=(300, 100), max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(x_train, y_train)
    model = to_onnx(mlp, x_train[:1]).SerializeToString()
    return model, npz(x_train, y_train), npz(x_test, y_test)


def diabetes_mlp() -> tuple[bytes, bytes, bytes]:
    features, target = load_diabetes(return_X_y=True)
    features = features / features.std(axis=0)
    target = (target - target.mean()) / target.std()
    x_train, x_test, y_train, y_test = train_test_split(
        features, target, test_size=0.3, random_state=0
    )
    mlp = MLPRegressor(
        hidden_layer_sizes=(64,), max_iter=1000, random_state=0, alpha=10.0, early_stopping=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(x_train, y_train)
    model = to_onnx(mlp, x_train[:1].astype(np.float32)).SerializeToString()
    return model, npz(x_train, y_train), npz(x_test, y_test)


def run(model: bytes, train: bytes, held_out: bytes, params: dict) -> tuple[Report, float]:
    with tempfile.TemporaryDirectory() as tmp:
        job_dir = Path(tmp)
        (job_dir / "input").mkdir()
        (job_dir / "input" / "model.onnx").write_bytes(model)
        (job_dir / "input" / "eval_data").write_bytes(held_out)
        if "fine_tune" in params:
            (job_dir / "input" / "train_data").write_bytes(train)
        started = time.perf_counter()
        report = run_prune_job(job_dir, PruneParams.model_validate(params))
        return report, time.perf_counter() - started


def table(name: str, model: bytes, train: bytes, held_out: bytes, task: str) -> list[Report]:
    print(f"\n{name}: original {len(model):,} bytes")
    header = (
        f"{'method':<50} {'bytes':>8} {'ratio':>7} {'gzip ratio':>10} {'metric':>8} "
        f"{'delta':>8} {'s':>5}"
    )
    print(header)
    print("-" * len(header))
    rows = [(label, {**params, "encoding": encoding, "task": task})
            for label, params in METHODS for encoding in ("dense", "int8")]  # fmt: skip
    search = {
        "max_accuracy_drop": 0.01,
        "granularity": "structured",
        "encoding": "int8",
        "fine_tune": SEARCH_FINE_TUNE,
        "task": task,
    }
    rows.append(("search: max_accuracy_drop=0.01, structured+ft", search))
    reports = []
    for label, params in rows:
        report, seconds = run(model, train, held_out, params)
        size, accuracy = report.size, report.accuracy
        encoding = params.get("encoding", "dense")
        gzip_ratio = size.original_gzip_bytes / size.compressed_gzip_bytes
        print(
            f"{label + ', ' + encoding:<50} {size.compressed_bytes:>8,} {size.ratio:>6.1f}x "
            f"{gzip_ratio:>9.1f}x {accuracy.compressed:>8.4f} {accuracy.delta:>+8.4f} "
            f"{seconds:>5.1f}"
        )
        reports.append(report)
    original = reports[0].accuracy.original
    print(f"{'(original)':<50} {len(model):>8,} {1:>6.1f}x {1:>9.1f}x {original:>8.4f}")
    chosen = [point.sparsity for point in reports[-1].sweep or [] if point.chosen]
    print(f"search tried {len(reports[-1].sweep or [])} sparsities, returned {chosen or 'none'}")
    return reports


def main() -> int:
    digits = table("digits 64-300-100-10 MLP, 70/30 split, accuracy", *digits_mlp(), "auto")
    table("diabetes 10-64-1 MLP regressor, 70/30 split, r2", *diabetes_mlp(), "regression")

    best = max((r for r in digits if r.accuracy.delta >= -0.01), key=lambda r: r.size.ratio)
    search = digits[-1]
    first = best.size.ratio >= 40
    second = search.size.ratio >= 10 and search.accuracy.delta >= -0.01
    print(
        f"\ntarget 1: >= 40x smaller within 1.0 point: best {best.size.ratio:.1f}x at "
        f"{best.accuracy.delta * 100:+.2f} points -> {'PASS' if first else 'MISS'}"
    )
    print(
        f"target 2: max_accuracy_drop=0.01 with train data >= 10x and within the bound: "
        f"{search.size.ratio:.1f}x at {search.accuracy.delta * 100:+.2f} points -> "
        f"{'PASS' if second else 'MISS'}"
    )
    return 0 if first and second else 1


if __name__ == "__main__":
    sys.exit(main())
