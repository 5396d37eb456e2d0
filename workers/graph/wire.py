"""Protobuf's wire format where the protobuf runtime cannot help: writing a message field by
field (workers/graph/encoding.py streams a model so), reading a model's top-level fields
without its graph, and finding where its initializers' raw_data lie in the file, so that a
model can be parsed without them (workers/graph/held.py). Only what those need."""

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from google.protobuf.message import DecodeError
from onnx import GraphProto, ModelProto, TensorProto


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
RAW_DATA_FIELD = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
DATA_TYPE_FIELD = TensorProto.DESCRIPTOR.fields_by_name["data_type"].number
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


def _read_varint(stream: BinaryIO) -> int | None:
    """The next varint of `stream`, None at its end."""
    value = shift = 0
    while byte := stream.read(1):
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    if shift:
        raise DecodeError("the model ends inside a varint")
    return None


def _field_varint(stream: BinaryIO) -> int:
    value = _read_varint(stream)
    if value is None:
        raise DecodeError("the model ends inside a field")
    return value


def _top_level_fields(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Each top-level field of a serialized ModelProto as (tag, the bytes after it) but the
    graph, which is skipped unread."""
    while (tag := _read_varint(stream)) is not None:
        wire = tag & 7
        if wire == VARINT:
            yield tag, varint_bytes(_field_varint(stream))
        elif wire in FIXED_SIZES:
            yield tag, stream.read(FIXED_SIZES[wire])
        elif wire == LENGTH_DELIMITED:
            length = _field_varint(stream)
            if tag >> 3 == GRAPH_FIELD:
                stream.seek(length, io.SEEK_CUR)
            else:
                yield tag, varint_bytes(length) + stream.read(length)
        else:
            raise DecodeError(f"the model has a top-level field of wire type {wire}")


def model_header(model: Path | bytes) -> ModelProto:
    """The model without its graph (IR version, opsets, metadata...), read from the file
    field by field: parsing a 270 MB model whole for these took 0.3 s, and its read as long."""
    with model.open("rb") if isinstance(model, Path) else io.BytesIO(model) as stream:
        kept = b"".join(varint_bytes(tag) + rest for tag, rest in _top_level_fields(stream))
    return ModelProto.FromString(kept)


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


@dataclass(frozen=True)
class Stripped:
    """A serialized model without the data of its main graph's large initializers.

    `spans[i]` is where initializer i's raw_data lies in the original bytes, as (start, length),
    for each initializer of the types asked for written plainly (only PLAIN_TENSOR_FIELDS,
    raw_data last, as protobuf writes them), else None; `stripped` are the initializers whose
    raw_data the skeleton leaves out."""

    skeleton: bytes
    spans: list[tuple[int, int] | None]
    stripped: frozenset[int]


def _as_protobuf_writes(data: memoryview, field: Field) -> bool:
    """Whether the field's tag (and length) are the varints protobuf writes: a parser also
    takes longer ones, which a skeleton built anew would not keep."""
    header = varint_bytes(field.number << 3 | field.wire)
    if field.wire == LENGTH_DELIMITED:
        header += varint_bytes(field.end - field.value)
    return data[field.start : field.value] == header


def _plain_raw_data(data: memoryview, tensor: Field, types: frozenset[int]) -> Field | None:
    """The raw_data field of an initializer of one of `types` written plainly, else None."""
    raw, data_type = None, None
    for count, field in enumerate(fields(data, tensor.value, tensor.end)):
        if raw is not None or PLAIN_TENSOR_FIELDS.get(field.number) != field.wire:
            return None  # a field after raw_data, or one pruning would not write back
        if count == MAX_PLAIN_FIELDS:
            return None
        if field.number == RAW_DATA_FIELD:
            raw = field
        elif field.number == DATA_TYPE_FIELD:
            data_type, _ = _varint_at(data, field.value, field.end)
    plain = (
        raw is not None
        and data_type in types
        and _as_protobuf_writes(data, tensor)
        and _as_protobuf_writes(data, raw)
    )
    return raw if plain else None


def _length_delimited(number: int, value: bytes) -> bytes:
    return varint_bytes(number << 3 | LENGTH_DELIMITED) + varint_bytes(len(value)) + value


def strip_initializer_data(
    data: bytes, min_bytes: int, types: frozenset[int], max_fields: int
) -> Stripped | None:
    """`data` with the raw_data of each plainly written main-graph initializer of `types` of at
    least `min_bytes` left out; None when the model has no single graph field to find them in,
    or more than `max_fields` fields at the top or in the graph: this scan runs in Python,
    about a microsecond a field, where protobuf's parser runs in C (parse_model takes those)."""
    view = memoryview(data)
    graphs = []
    for count, field in enumerate(fields(view, 0, len(view))):
        if count == max_fields:
            return None
        if field.number == GRAPH_FIELD and field.wire == LENGTH_DELIMITED:
            graphs.append(field)
    if len(graphs) != 1 or not _as_protobuf_writes(view, graphs[0]):
        return None  # protobuf would merge several graph fields into one
    graph = graphs[0]
    # the graph's bytes as runs of the original between the initializers written anew: a
    # piece per field would cost a hundred bytes for a field of two
    pieces: list[bytes | memoryview] = []
    spans: list[tuple[int, int] | None] = []
    stripped: set[int] = set()
    kept_from = graph.value
    for count, field in enumerate(fields(view, graph.value, graph.end)):
        if count == max_fields:
            return None
        if field.number != INITIALIZER_FIELD or field.wire != LENGTH_DELIMITED:
            continue
        raw = _plain_raw_data(view, field, types)
        spans.append(None if raw is None else (raw.value, raw.end - raw.value))
        if raw is not None and raw.end - raw.value >= min_bytes:
            stripped.add(len(spans) - 1)
            pieces += [
                view[kept_from : field.start],
                _length_delimited(INITIALIZER_FIELD, bytes(view[field.value : raw.start])),
            ]
            kept_from = field.end
    pieces.append(view[kept_from : graph.end])
    skeleton = b"".join(
        [view[: graph.start], _length_delimited(GRAPH_FIELD, b"".join(pieces)), view[graph.end :]]
    )
    return Stripped(skeleton, spans, frozenset(stripped))
