"""A train job that prunes can return a smaller file: prune.encoding stores the pruned model
sparse, int8 or float16, and the report measures the file it returns."""

import numpy as np
import onnx
import pytest
from pydantic import ValidationError

from schemas.params import TrainParams
from workers.jobs import run_train_job


def csv_bytes(features: np.ndarray, labels: np.ndarray) -> bytes:
    header = ",".join([f"p{i}" for i in range(features.shape[1])] + ["y"])
    rows = "\n".join(",".join(f"{v:g}" for v in row) for row in np.c_[features, labels])
    return f"{header}\n{rows}\n".encode()


def train(job_dir, digits, encoding: str):
    (job_dir / "input" / "train_data").write_bytes(csv_bytes(*digits))
    params = TrainParams.model_validate(
        {
            "model": {"hidden": [128]},
            "epochs": 5,
            "prune": {"sparsity": 0.9, "schedule": "gradual", "encoding": encoding},
        }
    )
    return run_train_job(job_dir, params)


@pytest.mark.parametrize(("encoding", "at_least"), [("sparse", 2.0), ("int8", 3.0)])
def test_prune_encoding_returns_a_smaller_file(job_dir, digits, encoding, at_least):
    report = train(job_dir, digits, encoding)
    returned = (job_dir / "model.onnx").read_bytes()
    assert report.size.compressed_bytes == len(returned)
    assert report.size.ratio >= at_least, report.size
    assert report.size.sparsity > 0.85  # 90% of the weights; biases and scaling are kept
    # measured on the file returned, which onnxruntime ran: within a point of the dense one
    assert report.accuracy is not None and report.accuracy.delta > -0.01, report.accuracy
    assert not any("prune.encoding dense" in note for note in report.notes)


def test_a_dense_pruned_train_model_is_told_to_pick_an_encoding(job_dir, digits):
    report = train(job_dir, digits, "dense")
    assert report.size.ratio == 1.0
    assert any(
        note.startswith("prune.encoding dense keeps the zeros") and "sparse or int8" in note
        for note in report.notes
    ), report.notes


def test_prune_encoding_names_its_values():
    with pytest.raises(ValidationError, match="'dense', 'sparse', 'int8' or 'float16'"):
        TrainParams.model_validate({"prune": {"sparsity": 0.5, "encoding": "auto"}})


def test_structured_train_job_removes_neurons_and_trains_the_smaller_network(job_dir, digits):
    (job_dir / "input" / "train_data").write_bytes(csv_bytes(*digits))
    params = TrainParams.model_validate(
        {
            "model": {"hidden": [128, 64]},
            "epochs": 15,
            "prune": {"sparsity": 0.75, "granularity": "structured", "encoding": "int8"},
        }
    )
    report = run_train_job(job_dir, params)
    returned = onnx.load_from_string((job_dir / "model.onnx").read_bytes())
    assert report.size.compressed_bytes == returned.ByteSize()
    # the hidden layers keep a quarter of their neurons: the file itself shrinks
    assert [layer.shape for layer in report.layers] == [[64, 32], [32, 16], [16, 10]]
    assert [layer.original_shape for layer in report.layers] == [[64, 128], [128, 64], [64, 10]]
    assert report.size.ratio > 10, report.size
    assert [group.kept for group in report.groups][:2] == [32, 16]
    # retrained after the cut: within 3 points of the dense model on the held-out split
    assert report.accuracy.delta > -0.03, report.accuracy
    assert any(note.startswith("structured: hidden neurons removed") for note in report.notes)


def test_structured_train_pruning_refuses_the_gradual_schedule():
    with pytest.raises(ValidationError, match="use schedule one_shot"):
        TrainParams.model_validate(
            {"prune": {"sparsity": 0.5, "granularity": "structured", "schedule": "gradual"}}
        )


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"model": {"type": "softmax"}}, "model.type softmax has none"),
        ({"epochs": 1500}, "give epochs at most 1000"),
    ],
)
def test_structured_train_pruning_is_refused_before_training_where_it_cannot_run(params, words):
    with pytest.raises(ValidationError, match=words):
        TrainParams.model_validate(
            {**params, "prune": {"sparsity": 0.5, "granularity": "structured"}}
        )
