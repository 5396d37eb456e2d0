"""The example `make example` runs: train a digits MLP with scikit-learn, convert it with
skl2onnx, write the data as train, eval and test splits, and prune the model with the clipprune
command line, printing its summary line.

Splits (CSV, label column `digit` last): train (70%, what the MLP was trained on: the data for
`train` jobs and for `fine_tune`), eval (15%: what a job measures and a search judges on) and
test (15%, which no job sees: to judge the returned model on rows it was never chosen by)."""

import sys
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from service.cli import main

OUT = Path("build/example")
HEADER = ",".join([f"pixel{i}" for i in range(64)] + ["digit"])


def write_split(name: str, features: np.ndarray, labels: np.ndarray) -> Path:
    path = OUT / f"digits_{name}.csv"
    np.savetxt(path, np.c_[features, labels], delimiter=",", header=HEADER, comments="", fmt="%g")
    return path


def build() -> tuple[Path, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    features, labels = load_digits(return_X_y=True)
    features = features.astype(np.float32) / 16.0
    x_train, x_rest, y_train, y_rest = train_test_split(
        features, labels, test_size=0.3, random_state=0
    )
    x_eval, x_test, y_eval, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0)
    mlp = MLPClassifier(hidden_layer_sizes=(300, 100), max_iter=300, random_state=0)
    mlp.fit(x_train, y_train)
    model = OUT / "digits_mlp.onnx"
    model.write_bytes(to_onnx(mlp, x_train[:1]).SerializeToString())
    write_split("train", x_train, y_train)
    write_split("test", x_test, y_test)
    return model, write_split("eval", x_eval, y_eval)


if __name__ == "__main__":
    model, eval_csv = build()
    out = OUT / "digits_mlp.pruned.onnx"
    args = ["prune", str(model), "-o", str(out), "--sparsity", "0.8", "--eval-data", str(eval_csv)]
    print("clipprune " + " ".join(args), file=sys.stderr)
    sys.exit(main(args))
