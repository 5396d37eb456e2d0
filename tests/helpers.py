"""Small helpers shared by the tests: run a model in onnxruntime, read its weights back."""

import numpy as np
import onnx
import onnxruntime as ort

from workers.weights import find_weights


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
