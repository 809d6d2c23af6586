"""Protobuf wire-format pieces, for building messages from bytes we already hold."""

from __future__ import annotations


def varint(n: int) -> bytes:
    """A non-negative integer as a base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(number: int, data: bytes) -> bytes:
    """Field ``number`` holding ``data`` (a string, bytes or a serialized message)."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def varint_field(number: int, value: int) -> bytes:
    """Field ``number`` holding a non-negative integer."""
    return varint(number << 3) + varint(value)
