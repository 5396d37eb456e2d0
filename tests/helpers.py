"""Small helpers shared by the tests: run a model in onnxruntime, read its weights back."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from workers.graph.weights import find_weights
from workers.nn.masks import count_to_prune

# Models onnx installs as its own test data: early PyTorch exports (values named 0, 1, 2, ...),
# model-zoo architectures, small graphs.
ONNX_TEST_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def run(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    return [
        np.array([[row[key] for key in sorted(row)] for row in out])
        if isinstance(out, list)
        else out
        for out in outputs
    ]


def weights(model: onnx.ModelProto | bytes) -> dict[str, np.ndarray]:
    if isinstance(model, bytes):
        model = onnx.load_model_from_string(model)
    return {slot.name: slot.read() for slot in find_weights(model)}


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def reference_masks(weights: list[np.ndarray], sparsity: float, scope: str) -> list[np.ndarray]:
    """The plain way, holding every magnitude at once: what magnitude_masks must equal bit for
    bit (partition for the k-th, then the first ties by position)."""
    groups = [[w] for w in weights] if scope == "layer" else [weights]
    masks = []
    for group in groups:
        magnitudes = np.concatenate([np.abs(w).ravel() for w in group])
        k = count_to_prune(sparsity, magnitudes.size)
        pruned = np.zeros(magnitudes.size, dtype=bool)
        if k >= magnitudes.size:
            pruned[:] = True
        elif k > 0:
            kth = np.partition(magnitudes, k - 1)[k - 1]
            pruned = magnitudes < kth
            missing = k - int(pruned.sum())
            pruned[np.flatnonzero(magnitudes == kth)[:missing]] = True
        bounds = np.cumsum([0] + [w.size for w in group])
        masks += [
            ~pruned[a:b].reshape(w.shape)
            for w, a, b in zip(group, bounds[:-1], bounds[1:], strict=True)
        ]
    return masks
