"""Byte counts as people read them, for the client and the server alike.

It imports nothing, so that the server (its upload and quota errors) can use
the client's formatting without the client's terminal libraries.
"""

from __future__ import annotations

_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_bytes(size: int, *, fixed: bool = True) -> str:
    """Formats a byte count with binary units: ``512 B``, ``1.5 KiB``, ``12.3 MiB``.

    Args:
        size: the count; GiB is the largest unit (``3072.0 GiB``).
        fixed: always one decimal (``3.0 KiB``), so that a progress line
            redrawn as the count grows keeps its width; False drops a ``.0``
            (``2 GiB``), as a limit reads in an error message.
    """
    for unit, scale in _UNITS:
        if size >= scale:
            text = f"{size / scale:.1f}"
            return f"{text.removesuffix('.0') if not fixed else text} {unit}"
    return f"{size} B"
