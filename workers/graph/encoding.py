"""Writing a pruned model to bytes: dense, sparse (ONNX sparse_initializer) or int8.

Every encoding yields a file onnxruntime loads as it is; the caller evaluates exactly these bytes.
"""

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from schemas.vocabulary import Encoding
from workers.errors import UnsupportedModelError
from workers.graph.load import serialize
from workers.graph.walk import iter_graphs
from workers.graph.weights import find_weights

INDEX_BYTES = 8  # sparse_initializer indices are int64, one linear index per nonzero


def encode(model: ModelProto, encoding: Encoding, pruned: set[str]) -> tuple[bytes, list[str]]:
    """The model's bytes in `encoding`, and notes on what was decided along the way.

    `pruned` names the weights that pruning touched: only those are stored sparse.
    """
    return ENCODERS[encoding](model, pruned)


def dense(model: ModelProto, pruned: set[str]) -> tuple[bytes, list[str]]:
    """Zeros kept in place: the file is as large as the original, and gzips well."""
    return serialize(model), []


def sparse(model: ModelProto, pruned: set[str]) -> tuple[bytes, list[str]]:
    """Pruned weights as ONNX sparse_initializer (COO), where that is smaller."""
    model = ModelProto.FromString(serialize(model))  # leave the caller's model dense
    kept_dense = []
    for graph, _ in iter_graphs(model.graph):
        # An initializer that is also a graph input is an overridable default: keep it dense.
        inputs = {value.name for value in graph.input}
        for position in reversed(range(len(graph.initializer))):
            tensor = graph.initializer[position]
            if tensor.name not in pruned or tensor.name in inputs:
                continue
            array = numpy_helper.to_array(tensor)
            flat_index = np.flatnonzero(array).astype(np.int64)
            if flat_index.size * (array.itemsize + INDEX_BYTES) >= array.nbytes:
                kept_dense.append(tensor.name)
                continue
            values = numpy_helper.from_array(array.ravel()[flat_index], tensor.name)
            indices = numpy_helper.from_array(flat_index, "")
            graph.sparse_initializer.append(
                helper.make_sparse_tensor(values, indices, list(array.shape))
            )
            del graph.initializer[position]
    notes = []
    if kept_dense:
        notes.append(
            "sparse: kept dense where COO storage would be larger (below ~67% zeros for "
            "float32): " + ", ".join(kept_dense)
        )
    return serialize(model), notes


def _require_float32_weights(model: ModelProto) -> None:
    """onnxruntime's dynamic quantization handles float32 weights; with others it leaves them
    as they are or writes a model that does not load."""
    for slot in find_weights(model):
        if isinstance(slot.holder, TensorProto) and slot.holder.data_type != TensorProto.FLOAT:
            kind = TensorProto.DataType.Name(slot.holder.data_type).lower()
            raise UnsupportedModelError(
                f"encoding int8 quantizes float32 weights; weight {slot.name!r} is {kind}: "
                "use encoding dense or sparse"
            )


def int8(model: ModelProto, pruned: set[str]) -> tuple[bytes, list[str]]:
    """onnxruntime's dynamic quantization of the pruned model (float32 weights only)."""
    _require_float32_weights(model)
    return _quantize(model), [
        "int8: onnxruntime dynamic quantization (QInt8, symmetric, so pruned zeros stay zero); "
        "internal tensor names shortened and shape annotations dropped (inputs and outputs keep "
        "their names)"
    ]


def _quantize(model: ModelProto) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="clipprune-int8-") as tmp:
        out = Path(tmp) / "model.int8.onnx"
        # The quantizer advises "pre-processing" on the root logger for every model; it is
        # advice to a person at a console, not something a job's caller can act on.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(model, out, weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return serialize(compact(ModelProto.FromString(out.read_bytes())))


ENCODERS: dict[Encoding, Callable[[ModelProto, set[str]], tuple[bytes, list[str]]]] = {
    "dense": dense,
    "sparse": sparse,
    "int8": int8,
}


def compact(model: ModelProto) -> ModelProto:
    """The same computation in fewer bytes: on a small quantized model the names the quantizer
    writes ("coefficient_quantized_output_0", ...) outweigh the weights. Internal value and
    initializer names become short ones, node names and doc strings go, and value_info (shape
    annotations onnxruntime infers again) is dropped. The model's inputs and outputs keep
    their names, so callers see no difference."""
    interface = {value.name for value in [*model.graph.input, *model.graph.output]}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in interface:
            return name
        return short.setdefault(name, format(len(short), "x"))

    for graph, _ in iter_graphs(model.graph):
        del graph.value_info[:]
        for tensor in graph.initializer:
            tensor.name = rename(tensor.name)
        for sparse in graph.sparse_initializer:
            sparse.values.name = rename(sparse.values.name)
        for value in [*graph.input, *graph.output]:
            value.name = rename(value.name)
        for node in graph.node:
            node.name = ""
            node.doc_string = ""
            node.input[:] = [rename(name) for name in node.input]
            node.output[:] = [rename(name) for name in node.output]
    return model
