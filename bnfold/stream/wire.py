"""Just enough of the protobuf wire format to walk an ONNX file without parsing its tensors.

A message is a sequence of fields, each a varint tag ``number << 3 | wire_type`` followed by
its value: wire type 0 a varint, 1 eight bytes, 2 a varint length and that many bytes (a
sub-message, string, bytes or packed repeated field), 5 four bytes. :func:`fields` yields
where each field of a message lies in a buffer (``bytes``, ``memoryview`` or ``mmap``), so a
caller can copy fields verbatim, descend into a sub-message, or note the position of a
tensor's ``raw_data`` without reading it. Groups (wire types 3/4) do not occur in ONNX and
are reported as corrupt input.

Field numbers used by :mod:`bnfold.stream` (onnx.proto): ModelProto.graph = 7;
GraphProto.initializer = 5; TensorProto.dims = 1, raw_data = 9, external_data = 13,
data_location = 14; StringStringEntryProto.key = 1, value = 2.
"""

from __future__ import annotations

from typing import NamedTuple

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_DIMS = 1
TENSOR_RAW_DATA = 9
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14
ENTRY_KEY, ENTRY_VALUE = 1, 2


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


class Field(NamedTuple):
    number: int
    wire_type: int
    start: int      # first byte of the tag
    value: int      # first byte of the value (after the length prefix for LENGTH fields)
    end: int        # one past the last byte of the field
    varint: int     # the value of a VARINT field, else the length of the value


def read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def fields(buf, start: int = 0, end: int | None = None):
    """Yield every :class:`Field` of the message in ``buf[start:end]``, in file order."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        tag, value = read_varint(buf, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wire_type == VARINT:
            v, stop = read_varint(buf, value, end)
        elif wire_type == LENGTH:
            v, value = read_varint(buf, value, end)
            stop = value + v
        elif wire_type == FIXED64:
            v, stop = 8, value + 8
        elif wire_type == FIXED32:
            v, stop = 4, value + 4
        else:
            raise WireError(f"unsupported wire type {wire_type} at byte {pos}")
        if stop > end:
            raise WireError(f"field {number} at byte {pos} runs past the end of its message")
        yield Field(number, wire_type, pos, value, stop, v)
        pos = stop


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_prefix(number: int, size: int) -> bytes:
    """Tag and length of a LENGTH field whose value is ``size`` bytes."""
    return tag(number, LENGTH) + varint(size)


def length_field(number: int, payload: bytes) -> bytes:
    return length_prefix(number, len(payload)) + payload


def varint_field(number: int, value: int) -> bytes:
    return tag(number, VARINT) + varint(value)


def entry(key: str, value: str) -> bytes:
    """A StringStringEntryProto (external_data / metadata entry)."""
    return length_field(ENTRY_KEY, key.encode()) + length_field(ENTRY_VALUE, value.encode())
