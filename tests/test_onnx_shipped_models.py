"""Every model onnx ships as its own test data, installed with it: early PyTorch exports (values
named 0, 1, 2, ..., opsets 6 to 9, initializers listed as inputs), model-zoo architectures whose
weights are computed in the graph, and small hand-written graphs. A prune job on each ends with
a model onnxruntime loads (where it loads the original), or with a clear one-line refusal;
never an internal error. A sweep over them found int8 writing files that did not load, in jobs
that succeeded, for 28 of these models."""

import onnxruntime as ort
import pytest
from helpers import ONNX_TEST_DATA

from schemas import PruneParams
from workers.errors import MAX_MESSAGE, InputError
from workers.jobs import run_prune_job

MODELS = sorted([*ONNX_TEST_DATA.glob("*/*/model.onnx"), *ONNX_TEST_DATA.glob("light/*.onnx")])


def loads(data: bytes) -> bool:
    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's errors are untyped
        return False
    return True


def test_the_set_is_there():
    assert len(MODELS) >= 140  # onnx 1.2x ships 149


@pytest.mark.parametrize("encoding", ["dense", "int8"])
@pytest.mark.parametrize("path", MODELS, ids=lambda path: str(path.relative_to(ONNX_TEST_DATA)))
def test_a_job_ends_with_a_model_that_loads_or_a_clear_refusal(path, encoding, job_dir):
    original = path.read_bytes()
    (job_dir / "input" / "model.onnx").write_bytes(original)
    params = PruneParams(sparsity=0.3, encoding=encoding)
    try:
        run_prune_job(job_dir, params, lambda stage, fraction: None)
    except InputError as refused:
        message = str(refused)
        assert len(message) <= MAX_MESSAGE and "\n" not in message, message
        return
    if loads(original):
        assert loads((job_dir / "model.onnx").read_bytes())
