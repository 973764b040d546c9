"""Minimal protobuf wire-format decoding (no generated code, no protobuf runtime).

Enough for the few messages the readers parse (tensor-bundle entries, the SavedModel object graph, ...).
Every length is checked against the buffer, so hostile bytes raise :class:`MalformedMessage` instead of
reading past the end or allocating without bound.
"""

from __future__ import annotations

from collections.abc import Iterator

from converter.errors import CheckpointFormatError

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


class MalformedMessage(CheckpointFormatError):
    """A serialized message is truncated or structurally invalid (callers add which file it came from)."""


def read_varint(buf: bytes, pos: int, end: int, max_bytes: int = 10) -> tuple[int, int]:
    """Decode the base-128 varint at ``pos`` (not reading past ``end``); return ``(value, next_pos)``."""
    if pos < end and buf[pos] < 0x80:  # fast path: most values in an index fit in one byte
        return buf[pos], pos + 1
    result = 0
    for index in range(max_bytes):
        if pos >= end:
            raise MalformedMessage("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
    raise MalformedMessage(f"varint longer than {max_bytes} bytes")


def read_varint32(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value, pos = read_varint(buf, pos, end, max_bytes=5)
    if value >= 1 << 32:
        raise MalformedMessage("32-bit varint out of range")
    return value, pos


def signed64(value: int) -> int:
    """Reinterpret an unsigned 64-bit varint as the two's-complement int64/int32 protobuf encodes."""
    return value - (1 << 64) if value >= 1 << 63 else value


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field_number, wire_type, value)`` for each field of a serialized message."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = read_varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise MalformedMessage("protobuf field number 0")
        value: int | bytes
        if wire == VARINT:
            value, pos = read_varint(buf, pos, end)
        elif wire in (FIXED64, FIXED32):
            width = 8 if wire == FIXED64 else 4
            if end - pos < width:
                raise MalformedMessage("truncated fixed-width protobuf field")
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wire == LENGTH_DELIMITED:
            length, pos = read_varint(buf, pos, end)
            if length > end - pos:
                raise MalformedMessage("protobuf field runs past the end of its message")
            value = buf[pos : pos + length]
            pos += length
        else:  # groups (3, 4) are deprecated and never used by these messages; 6, 7 do not exist
            raise MalformedMessage(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def expect(wire: int, value: int | bytes, expected_wire: int, what: str) -> int | bytes:
    if wire != expected_wire:
        raise MalformedMessage(f"{what} has protobuf wire type {wire}, expected {expected_wire}")
    return value


def expect_int(wire: int, value: int | bytes, what: str) -> int:
    result = expect(wire, value, VARINT, what)
    assert isinstance(result, int)
    return signed64(result)


def expect_bytes(wire: int, value: int | bytes, what: str) -> bytes:
    result = expect(wire, value, LENGTH_DELIMITED, what)
    assert isinstance(result, bytes)
    return result
