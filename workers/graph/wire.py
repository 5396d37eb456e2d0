"""Protobuf's wire format where the protobuf runtime cannot help: writing a message field by
field (workers/graph/encoding.py streams a model so), and reading a model's top-level fields
without its graph. Only what those need."""

import io
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from google.protobuf.message import DecodeError
from onnx import ModelProto


def varint_bytes(value: int) -> bytes:
    """A non-negative integer as protobuf writes a varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# ModelProto's field numbers: its graph, nearly all of a model's bytes, and the wire types a
# top-level field can have (proto3 ONNX has no groups).
GRAPH_FIELD = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
FIXED_SIZES = {FIXED64: 8, FIXED32: 4}


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
