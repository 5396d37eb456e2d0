"""The example `make run` runs: train a digits MLP with scikit-learn, convert it with skl2onnx,
and prune it with the clipprune command line, printing the report."""

import sys
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from service.cli import main

OUT = Path("build/example")


def build() -> tuple[Path, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    features, labels = load_digits(return_X_y=True)
    features = features.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.3, random_state=0
    )
    mlp = MLPClassifier(hidden_layer_sizes=(300, 100), max_iter=300, random_state=0)
    mlp.fit(x_train, y_train)
    model = OUT / "digits_mlp.onnx"
    model.write_bytes(to_onnx(mlp, x_train[:1]).SerializeToString())
    eval_csv = OUT / "digits_eval.csv"
    header = ",".join([f"pixel{i}" for i in range(64)] + ["digit"])
    np.savetxt(eval_csv, np.c_[x_test, y_test], delimiter=",", header=header, comments="")
    return model, eval_csv


if __name__ == "__main__":
    model, eval_csv = build()
    out = OUT / "digits_mlp.pruned.onnx"
    args = ["prune", str(model), "-o", str(out), "--sparsity", "0.8", "--eval-data", str(eval_csv)]
    print("clipprune " + " ".join(args), file=sys.stderr)
    sys.exit(main(args))
