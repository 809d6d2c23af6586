"""Progress display for the CLI: a status line redrawn in place on a terminal.

The formatting functions are pure so they can be tested; ``LiveLine`` is the
only part that writes.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 12


def format_duration(seconds: float) -> str:
    """Formats a duration compactly: ``42s``, ``3m05s``, ``2h07m``."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def format_bytes(size: int) -> str:
    """Formats a byte count with binary units: ``512 B``, ``1.5 KiB``, ``12.3 MiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """Renders ``[#######-----]``; full only when every request is done."""
    filled = width * done // total if total > 0 else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def render_progress(
    name: str,
    state: str,
    done: int,
    total: int,
    rate: float | None = None,
    eta_s: float | None = None,
) -> str:
    """Renders one status line of a batch.

    Example: ``batches/x  RUNNING  [#########---]  3,412/5,000  68%  1,234 req/s  ETA 2s``.

    Args:
        name: The batch name.
        state: The state without its ``BATCH_STATE_`` prefix.
        done: Requests finished (succeeded, failed, cancelled or expired).
        total: Requests in the batch; 0 while a file batch is being validated.
        rate: Finished requests per second, or None when not yet known.
        eta_s: Seconds left, or None when not known.
    """
    percent = 100 * done // total if total > 0 else 0
    parts = [name, state, render_bar(done, total), f"{done:,}/{total:,}", f"{percent}%"]
    if rate is not None:
        parts.append(f"{rate:,.0f} req/s")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


class RateMeter:
    """Requests per second over a sliding window of samples.

    Args:
        window_s: How far back samples count, in seconds.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> None:
        """Records that ``done`` requests were finished at time ``now`` (seconds)."""
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Requests per second, or None until samples span at least half a second."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 0.5:
            return None
        return max(0.0, (d1 - d0) / (t1 - t0))


class LiveLine:
    """Shows a changing status line.

    On a terminal the line is redrawn in place with ``\\r``; elsewhere (a log,
    a pipe) a plain line is written when the ``key`` changes (e.g. the batch
    state) and otherwise at most every ``every_s`` seconds, with the last
    line always written by ``close()``.

    Args:
        stream: Where to write, usually stderr.
        tty: Whether to redraw in place; defaults to ``stream.isatty()``.
        every_s: Seconds between plain lines when not on a terminal.
        clock: Monotonic time source, replaceable in tests.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._every_s = every_s
        self._clock = clock
        self._drawn = 0
        self._last_key: object = None
        self._last_written = float("-inf")
        self._pending: str | None = None

    def show(self, line: str, key: object = None) -> None:
        """Displays ``line``; ``key`` marks a change worth a plain line at once."""
        if self._tty:
            # Keep under the terminal width: a wrapped line cannot be redrawn with \r.
            line = line[: max(20, shutil.get_terminal_size().columns - 1)]
            self._stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
            self._stream.flush()
            self._drawn = len(line)
            return
        now = self._clock()
        if key != self._last_key or now - self._last_written >= self._every_s:
            self._stream.write(line + "\n")
            self._stream.flush()
            self._last_key, self._last_written, self._pending = key, now, None
        else:
            self._pending = line

    def close(self) -> None:
        """Ends the display: moves past the line, or writes the last unwritten one."""
        if self._tty and self._drawn:
            self._stream.write("\n")
        elif self._pending is not None:
            self._stream.write(self._pending + "\n")
        self._stream.flush()
        self._drawn, self._pending = 0, None
