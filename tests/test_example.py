"""`make example` leaves a model and train, eval and test splits, and the README's train,
fine-tune and search requests succeed on them."""

import subprocess
import sys
from pathlib import Path

import pytest
from server import submit

EXAMPLE = Path(__file__).parent.parent / "examples" / "prune_digits.py"
REQUESTS = {  # the README's, as sent there
    "train": {"epochs": 30, "prune": {"sparsity": 0.8, "schedule": "gradual", "encoding": "int8"}},
    "fine_tune": {
        "sparsity": 0.9,
        "encoding": "int8",
        "fine_tune": {"epochs": 30, "learning_rate": 0.003},
    },
    "search": {
        "max_accuracy_drop": 0.01,
        "granularity": "structured",
        "fine_tune": {"epochs": 30},
    },
}


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("example")
    run = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    return cwd / "build" / "example"


def test_the_example_writes_three_disjoint_splits(example):
    rows = {}
    for split in ("train", "eval", "test"):
        lines = (example / f"digits_{split}.csv").read_text().splitlines()
        assert lines[0].endswith(",digit")
        rows[split] = lines[1:]
    assert [len(rows[s]) for s in ("train", "eval", "test")] == [1257, 270, 270]
    assert (example / "digits_mlp.onnx").exists() and (example / "digits_mlp.pruned.onnx").exists()


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_the_readmes_requests_succeed_on_the_splits(client, example, request_name):
    files = {
        name: (example / f"digits_{split}.csv").read_bytes()
        for name, split in (("train_data", "train"), ("eval_data", "eval"))
    }
    kind = "train" if request_name == "train" else "prune"
    if kind == "prune":
        files["model"] = (example / "digits_mlp.onnx").read_bytes()
    job = submit(client, kind, files, REQUESTS[request_name], wait=60).json()
    assert job["status"] == "succeeded", job
    report = client.get(job["links"]["report"]).json()
    assert report["size"]["ratio"] > 2.5, report["size"]  # int8 or structured: smaller
    assert report["accuracy"]["compressed"] > 0.9, report["accuracy"]
