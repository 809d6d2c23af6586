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


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; a position past the
    end of ``data`` (which callers' bounds checks refuse) if it is cut."""
    end = len(data)
    if pos < end and data[pos] < 0x80:  # nearly every length on the hot paths
        return data[pos], pos + 1
    value = shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return 0, end + 1
