"""Protobuf's wire format where the protobuf runtime cannot help: writing a message field by
field (workers/graph/encoding.py streams a model so), reading a model's top-level fields
without its graph (the file mapped, the graph skipped unread), and finding where its weights'
raw_data lie in the file, so that a model can be parsed without them (workers/graph/held.py).
Only what those need."""

import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto


def varint_bytes(value: int) -> bytes:
    """A non-negative integer as protobuf writes a varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# The wire types a field can have (ONNX has no groups), and the field numbers on the way to the
# bytes of a model's weights: its graph, the graph's initializers, a tensor's raw_data.
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
FIXED_SIZES = {FIXED64: 8, FIXED32: 4}
GRAPH_FIELD = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER_FIELD = GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
NODE_FIELD = GraphProto.DESCRIPTOR.fields_by_name["node"].number
NODE_OP_TYPE_FIELD = NodeProto.DESCRIPTOR.fields_by_name["op_type"].number
NODE_ATTRIBUTE_FIELD = NodeProto.DESCRIPTOR.fields_by_name["attribute"].number
ATTRIBUTE_NAME_FIELD = AttributeProto.DESCRIPTOR.fields_by_name["name"].number
ATTRIBUTE_TENSOR_FIELD = AttributeProto.DESCRIPTOR.fields_by_name["t"].number
RAW_DATA_FIELD = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
DATA_TYPE_FIELD = TensorProto.DESCRIPTOR.fields_by_name["data_type"].number
NAME_FIELD = TensorProto.DESCRIPTOR.fields_by_name["name"].number
# A weight written plainly has a field per dimension and three more: past this, it is not one.
MAX_PLAIN_FIELDS = 64
# What numpy_helper.from_array writes, and all that pruning writes back, each field of the wire
# type protobuf gives it (another is an unknown field to it): a tensor of only these fields is
# written again field for field as it was read, its raw_data (the last) aside.
PLAIN_TENSOR_FIELDS = {
    TensorProto.DESCRIPTOR.fields_by_name[name].number: wire
    for name, wire in (
        ("dims", VARINT),
        ("data_type", VARINT),
        ("name", LENGTH_DELIMITED),
        ("raw_data", LENGTH_DELIMITED),
    )
}


@dataclass(frozen=True)
class Field:
    """One field of a serialized message: its number and wire type, where its tag starts,
    where its value starts (past a length-delimited field's length) and where it ends."""

    number: int
    wire: int
    start: int
    value: int
    end: int


def _varint_at(data: memoryview, position: int, stop: int) -> tuple[int, int]:
    """The varint at `position`, and where the next byte is."""
    value = shift = 0
    while position < stop:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise DecodeError("the model ends inside a varint")


def fields(data: memoryview, start: int, stop: int) -> Iterator[Field]:
    """The fields of the message serialized in data[start:stop], in the order they lie."""
    position = start
    while position < stop:
        tag, value = _varint_at(data, position, stop)
        wire = tag & 7
        if wire == VARINT:
            _, end = _varint_at(data, value, stop)
        elif wire in FIXED_SIZES:
            end = value + FIXED_SIZES[wire]
        elif wire == LENGTH_DELIMITED:
            length, value = _varint_at(data, value, stop)
            end = value + length
        else:
            raise DecodeError(f"the model has a field of wire type {wire}")
        if end > stop:
            raise DecodeError("the model ends inside a field")
        yield Field(tag >> 3, wire, position, value, end)
        position = end


@contextmanager
def _viewed(model: Path | bytes) -> Iterator[memoryview]:
    """The model's bytes as a memoryview: a file is mapped, so what is not read is not loaded."""
    if isinstance(model, bytes) or model.stat().st_size == 0:
        data = model if isinstance(model, bytes) else b""
        with memoryview(data) as view:
            yield view
        return
    with (
        model.open("rb") as file,
        mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        memoryview(mapped) as view,
    ):
        yield view


def model_header(model: Path | bytes) -> ModelProto:
    """The model without its graph (IR version, opsets, metadata...), read field by field from
    the file, mapped: parsing a 270 MB model whole for these took 0.3 s, and its read as long."""
    with _viewed(model) as view:
        kept = b"".join(
            bytes(view[field.start : field.end])
            for field in fields(view, 0, len(view))
            if field.number != GRAPH_FIELD or field.wire != LENGTH_DELIMITED
        )
    return ModelProto.FromString(kept)


# Where a tensor sits in the main graph: (INITIALIZER_FIELD, i) is graph.initializer[i];
# (NODE_FIELD, n, a) is graph.node[n].attribute[a].t, the value of a Constant node.
TensorPath = tuple[int, ...]


def tensor_at(graph: GraphProto, path: TensorPath) -> TensorProto:
    if path[0] == INITIALIZER_FIELD:
        return graph.initializer[path[1]]
    return graph.node[path[1]].attribute[path[2]].t


@dataclass(frozen=True)
class Stripped:
    """A serialized model without the data of its main graph's large weights.

    `spans[path]` is where the raw_data of the tensor at `path` lies in the original bytes, as
    (start, length), for each initializer and Constant value of the types asked for written
    plainly (only PLAIN_TENSOR_FIELDS, raw_data last, as protobuf writes them); `stripped` are
    those whose raw_data the skeleton leaves out."""

    skeleton: bytes
    spans: dict[TensorPath, tuple[int, int]]
    stripped: frozenset[TensorPath]


class _OverBudget(Exception):
    pass


class _Scan:
    """What a scan found, and the fields it may still read: it runs in Python, about a
    microsecond a field, where protobuf's parser runs in C."""

    def __init__(self, data: bytes, min_bytes: int, types: frozenset[int], max_fields: int):
        self.view = memoryview(data)
        self.min_bytes, self.types, self.left = min_bytes, types, max_fields
        self.spans: dict[TensorPath, tuple[int, int]] = {}
        self.stripped: set[TensorPath] = set()

    def fields(self, start: int, stop: int) -> Iterator[Field]:
        for field in fields(self.view, start, stop):
            self.left -= 1
            if self.left < 0:
                raise _OverBudget
            yield field

    def holds(self, field: Field, value: bytes) -> bool:
        return self.view[field.value : field.end] == value

    def rewritten(self, outer: Field, changed: list[tuple[Field, bytes]]) -> bytes:
        """`outer` written anew with each (inner field, its new bytes) in place: runs of the
        original between them, a piece per field would cost a hundred bytes for a field of two."""
        pieces: list[bytes | memoryview] = []
        kept_from = outer.value
        for inner, new in changed:
            pieces += [self.view[kept_from : inner.start], new]
            kept_from = inner.end
        pieces.append(self.view[kept_from : outer.end])
        return _length_delimited(outer.number, b"".join(pieces))

    def tensor(self, field: Field, path: TensorPath) -> bytes | None:
        """The tensor written without its raw_data when it is plain and large, else None."""
        raw = _plain_raw_data(self.view, field, self.types)
        if raw is None:
            return None
        self.spans[path] = (raw.value, raw.end - raw.value)
        if raw.end - raw.value < self.min_bytes:
            return None
        self.stripped.add(path)
        return _length_delimited(field.number, bytes(self.view[field.value : raw.start]))

    def node(self, field: Field, path: TensorPath) -> bytes | None:
        """A Constant node written without its value's raw_data, else None. In protobuf's order
        op_type comes before the attributes, and an attribute's name before its tensor."""
        changed, attribute = [], 0
        for inner in self.fields(field.value, field.end):
            if inner.number == NODE_OP_TYPE_FIELD and not self.holds(inner, b"Constant"):
                return None
            if inner.number != NODE_ATTRIBUTE_FIELD or inner.wire != LENGTH_DELIMITED:
                continue
            if (new := self.attribute(inner, (*path, attribute))) is not None:
                changed.append((inner, new))
            attribute += 1
        if not changed or not _as_protobuf_writes(self.view, field):
            return None
        return self.rewritten(field, changed)

    def attribute(self, field: Field, path: TensorPath) -> bytes | None:
        changed = []
        for inner in self.fields(field.value, field.end):
            if inner.number == ATTRIBUTE_NAME_FIELD and not self.holds(inner, b"value"):
                return None
            tensor = inner.number == ATTRIBUTE_TENSOR_FIELD and inner.wire == LENGTH_DELIMITED
            if tensor and (new := self.tensor(inner, path)) is not None:
                changed.append((inner, new))
        if not changed or not _as_protobuf_writes(self.view, field):
            return None
        return self.rewritten(field, changed)

    def graph(self, field: Field) -> bytes:
        changed, counts = [], {INITIALIZER_FIELD: 0, NODE_FIELD: 0}
        for inner in self.fields(field.value, field.end):
            if inner.number not in counts or inner.wire != LENGTH_DELIMITED:
                continue
            path = (inner.number, counts[inner.number])
            counts[inner.number] += 1
            scan = self.tensor if inner.number == INITIALIZER_FIELD else self.node
            if (new := scan(inner, path)) is not None:
                changed.append((inner, new))
        return self.rewritten(field, changed)


def _as_protobuf_writes(data: memoryview, field: Field) -> bool:
    """Whether the field's tag (and length) are the varints protobuf writes: a parser also
    takes longer ones, which a skeleton built anew would not keep."""
    header = varint_bytes(field.number << 3 | field.wire)
    if field.wire == LENGTH_DELIMITED:
        header += varint_bytes(field.end - field.value)
    return data[field.start : field.value] == header


def _plain_raw_data(data: memoryview, tensor: Field, types: frozenset[int]) -> Field | None:
    """The raw_data field of a tensor of one of `types` written plainly, else None. Its name
    must be written, even empty: pruning's write-back always writes one."""
    raw, data_type, named = None, None, False
    for count, field in enumerate(fields(data, tensor.value, tensor.end)):
        if raw is not None or PLAIN_TENSOR_FIELDS.get(field.number) != field.wire:
            return None  # a field after raw_data, or one pruning would not write back
        if count == MAX_PLAIN_FIELDS:
            return None
        if field.number == RAW_DATA_FIELD:
            raw = field
        elif field.number == DATA_TYPE_FIELD:
            data_type, _ = _varint_at(data, field.value, field.end)
        named |= field.number == NAME_FIELD
    plain = (
        raw is not None
        and named
        and data_type in types
        and _as_protobuf_writes(data, tensor)
        and _as_protobuf_writes(data, raw)
    )
    return raw if plain else None


def _length_delimited(number: int, value: bytes) -> bytes:
    return varint_bytes(number << 3 | LENGTH_DELIMITED) + varint_bytes(len(value)) + value


def strip_weight_data(
    data: bytes, min_bytes: int, types: frozenset[int], max_fields: int
) -> Stripped | None:
    """`data` without the raw_data of each plainly written main-graph initializer and Constant
    value of `types` of at least `min_bytes`; None when the model has no single graph field to
    find them in, or more than `max_fields` fields to read on the way (parse_model takes it)."""
    scan = _Scan(data, min_bytes, types, max_fields)
    try:
        graphs = [
            field
            for field in scan.fields(0, len(scan.view))
            if field.number == GRAPH_FIELD and field.wire == LENGTH_DELIMITED
        ]
        if len(graphs) != 1 or not _as_protobuf_writes(scan.view, graphs[0]):
            return None  # protobuf would merge several graph fields into one
        graph = scan.graph(graphs[0])
    except _OverBudget:
        return None
    view = scan.view
    skeleton = b"".join([view[: graphs[0].start], graph, view[graphs[0].end :]])
    return Stripped(skeleton, scan.spans, frozenset(scan.stripped))
