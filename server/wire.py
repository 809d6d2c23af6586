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


_ONE_BYTE = [bytes([n]) for n in range(128)]


def tagged(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field whose tag is already encoded; the cheap form
    for hot paths that build the same fields over and over."""
    n = len(data)
    return tag + (_ONE_BYTE[n] if n < 128 else varint(n)) + data


def length_delimited(number: int, data: bytes) -> bytes:
    """Field ``number`` holding ``data`` (a string, bytes or a serialized message)."""
    return tagged(varint(number << 3 | 2), data)


def varint_field(number: int, value: int) -> bytes:
    """Field ``number`` holding a non-negative integer."""
    return varint(number << 3) + varint(value)
