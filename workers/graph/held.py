"""A model whose large weights stay in the file's bytes, outside protobuf.

protobuf's runtime (upb) parses a model into one arena and frees none of it until the whole model
goes: each weight written back keeps its old bytes beside the new, so a pruned 270 MB model
costs 540 MB, and its file as bytes 270 MB more. A held model is parsed without the data of its
main graph's large weights, initializers and Constant values (a skeleton of a few kB for that
model); their values are NumPy views of the file's bytes, copied once pruning is sure to hold
the model (`own`) and changed where they lie, and that copy is the file written out. It holds
what keeps the file's layout: values changed in place, shapes and dtypes unchanged, written
dense (workers/compress/prune.py says when).

The copy is protobuf's own serialization of the pruned model byte for byte: the skeleton is only
held when protobuf writes it back as it was read, and a held tensor has the fields pruning writes
back (name, type, dims, raw_data) and no others.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import ModelProto, TensorProto, helper

from workers.graph.load import parse_skeleton
from workers.graph.weights import WeightSlot
from workers.graph.wire import tensor_at

# Smaller initializers stay in the skeleton as well (they are views of the copy too): shape
# inference reads the small ones, and stripping saves nothing worth a field of its own there.
HELD_MIN_BYTES = 64 * 1024
# Types whose raw_data NumPy views as its values (little-endian, as ONNX stores them).
HELD_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})


@dataclass
class HeldModel:
    skeleton: ModelProto
    # the file: the caller's bytes, read-only, until `own` copies them to change in place
    buffer: bytes | bytearray
    # id of a main-graph initializer or Constant value of the skeleton (of HELD_TYPES) ->
    # (start, length) of its raw_data in buffer
    spans: dict[int, tuple[int, int]]
    # the tensors `spans` is keyed by: protobuf keeps one wrapper per message while it is
    # referenced, so these ids stay theirs
    tensors: list[TensorProto] = field(repr=False)

    def own(self) -> None:
        """Copy the file to change its weights where they lie: only once pruning will, so a
        model found unfit to hold costs no copy."""
        if not isinstance(self.buffer, bytearray):
            self.buffer = bytearray(self.buffer)

    def values(self, tensor: TensorProto) -> np.ndarray | None:
        """A view of the tensor's values in the buffer (writable once owned); None when it is
        not held."""
        span = self.spans.get(id(tensor))
        if span is None:
            return None
        start, length = span
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type).newbyteorder("<")
        flat = np.frombuffer(self.buffer, dtype, length // dtype.itemsize, start)
        return flat.reshape(tuple(tensor.dims))

    def attach(self, slots: list[WeightSlot]) -> bool:
        """Point each slot that is held at its values in the buffer; whether all were."""
        attached = True
        for slot in slots:
            values = self.values(slot.holder) if isinstance(slot.holder, TensorProto) else None
            attached &= values is not None
            slot.held = values
        return attached

    def write(self, path: Path) -> None:
        path.write_bytes(self.buffer)


def hold(data: bytes) -> HeldModel | None:
    """The model in `data` held (checked as parse_model checks it), or None when it cannot be:
    then parse_model reads it."""
    parsed = parse_skeleton(data, HELD_MIN_BYTES, HELD_TYPES)
    if parsed is None:
        return None
    skeleton, stripped = parsed
    tensors = {path: tensor_at(skeleton.graph, path) for path in stripped.spans}
    spans = {id(tensors[path]): span for path, span in stripped.spans.items()}
    return HeldModel(skeleton, data, spans, list(tensors.values()))
