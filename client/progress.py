"""Progress display for the CLI: a live line on a terminal, plain lines elsewhere.

On a terminal, ``rich`` redraws one status line in place; the line is laid
out for the terminal's width each time (what matters most is kept: the
state, the counts, the percentage, then failures, the ETA, the bar, the
rate, the name), so it never wraps and a redraw never leaves a line behind. Elsewhere
(a pipe, a log, ``TERM=dumb``) a plain line is written when the state
changes and otherwise at most every few seconds.

``BatchProgress`` and ``TransferProgress`` are pure values, testable at any
width; ``LiveLine`` is the only part that writes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from longbatch.client.units import format_bytes

BAR_MIN = 10
"""Narrowest bar worth drawing, in columns; below it the bar is left out."""
BAR_MAX = 40
"""Widest bar, in columns."""
_GAP = 2
"""Columns between two parts of a line."""


def format_duration(seconds: float) -> str:
    """Formats a duration compactly: ``42s``, ``3m05s``, ``2h07m``."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


@dataclass(frozen=True)
class _Part:
    """One part of a status line: its text (None for the bar), when it is
    dropped on a narrow terminal (higher first; 0 never) and its style."""

    text: str | None
    drop: int = 0
    style: str = ""


class _StatusLine:
    """Parts laid out on one line: plain text, or fitted to a rich console's width."""

    def _parts(self) -> list[_Part]:
        raise NotImplementedError

    def _bar(self) -> tuple[int, int]:
        """The bar's (completed, total)."""
        return 0, 0

    def plain(self) -> str:
        """The line without the bar, every part kept, for logs and pipes."""
        return "  ".join(p.text for p in self._parts() if p.text is not None)

    def fit(self, width: int) -> list[_Part]:
        """The parts that fit in ``width`` columns, the bar counted at its
        narrowest; parts are dropped by rank until they fit."""
        parts = self._parts()
        ranks = sorted({p.drop for p in parts if p.drop}, reverse=True)
        for rank in [None, *ranks]:
            if rank is not None:
                parts = [p for p in parts if p.drop != rank]
            if _width(parts, BAR_MIN) <= width:
                return parts
        return parts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        parts = self.fit(width)
        grid = Table.grid(padding=(0, _GAP), pad_edge=False)
        cells: list[Text | ProgressBar] = []
        for part in parts:
            grid.add_column(no_wrap=True, overflow="ellipsis")
            if part.text is None:
                completed, total = self._bar()
                bar_width = min(BAR_MAX, BAR_MIN + width - _width(parts, BAR_MIN))
                cells.append(ProgressBar(total=max(total, 1), completed=completed, width=bar_width))
            else:
                cells.append(Text(part.text, style=part.style))
        grid.add_row(*cells)
        yield grid


def _width(parts: Iterable[_Part], bar: int) -> int:
    widths = [bar if p.text is None else len(p.text) for p in parts]
    return sum(widths) + _GAP * max(0, len(widths) - 1)


_STATE_STYLES = {"SUCCEEDED": "green", "RUNNING": "cyan", "FAILED": "red", "CANCELLED": "yellow",
                 "EXPIRED": "yellow"}
_ACTIVE = frozenset({"PENDING", "RUNNING", "SUCCEEDED"})
"""States whose progress is a fraction of the batch; a batch that ended
otherwise shows what finished, never a bar or a percentage."""


@dataclass(frozen=True)
class BatchProgress(_StatusLine):
    """The status line of a batch being waited for.

    Example (plain): ``batches/x  RUNNING  3,412/5,000  68%  1,234 req/s  ETA 2s``.

    Attributes:
        name: The batch name.
        state: The state without its ``BATCH_STATE_`` prefix.
        finished: Requests answered, succeeded or failed (not cancelled or expired).
        total: Requests in the batch; 0 while a file batch is being validated.
        rate: Finished requests per second, or None when not yet known.
        eta_s: Seconds left, or None when not known.
        validating: A file batch whose input is still being read and validated.
        failed: Of the finished requests, those that failed: shown, so that a
            batch whose every request failed does not read as a success.
    """

    name: str
    state: str
    finished: int
    total: int
    rate: float | None = None
    eta_s: float | None = None
    validating: bool = False
    failed: int = 0

    def _parts(self) -> list[_Part]:
        parts = [_Part(self.name, drop=9), _Part(self.state, style=_STATE_STYLES.get(self.state, ""))]
        if self.validating:
            return [*parts, _Part("validating input")]
        counts = f"{self.finished:,}/{self.total:,}"
        if self.state not in _ACTIVE:
            if not self.total:  # a file batch that failed before any request was read
                return parts
            parts.append(_Part(f"{counts} finished"))
            if self.failed:
                parts.append(_Part(f"{self.failed:,} failed", drop=4, style="red"))
            return parts
        percent = 100 * self.finished // self.total if self.total > 0 else 0
        parts += [_Part(None, drop=6), _Part(counts), _Part(f"{percent}%", drop=3)]
        if self.failed:
            parts.append(_Part(f"{self.failed:,} failed", drop=4, style="red"))
        if self.rate is not None:
            parts.append(_Part(f"{self.rate:,.0f} req/s", drop=7))
        if self.eta_s is not None:
            parts.append(_Part(f"ETA {format_duration(self.eta_s)}", drop=5))
        return parts

    def _bar(self) -> tuple[int, int]:
        return self.finished, self.total


@dataclass(frozen=True)
class TransferProgress(_StatusLine):
    """The status line of an upload or download.

    Example (plain): ``uploading in.jsonl  1.5 MiB/3.0 MiB  50%``.

    Attributes:
        label: What is moving, e.g. ``uploading in.jsonl``.
        done: Bytes moved so far.
        total: Bytes in all, or None when not known (a download).
    """

    label: str
    done: int
    total: int | None = None

    def _parts(self) -> list[_Part]:
        if self.total is None:
            return [_Part(self.label, drop=9), _Part(format_bytes(self.done))]
        percent = 100 * self.done // max(self.total, 1)
        return [_Part(self.label, drop=9), _Part(None, drop=6),
                _Part(f"{format_bytes(self.done)}/{format_bytes(self.total)}"), _Part(f"{percent}%", drop=3)]

    def _bar(self) -> tuple[int, int]:
        return self.done, self.total or 0


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


def is_live(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal that can redraw a line in place."""
    console = Console(file=stream)
    return console.is_terminal and not console.is_dumb_terminal


class LiveLine:
    """Shows a changing status line.

    On a terminal ``rich`` redraws it in place, fitted to the width, and
    ``close()`` clears it (what follows, a summary say, takes its place).
    Elsewhere a plain line is written when the ``key`` changes (e.g. the batch
    state) and otherwise at most every ``every_s`` seconds, with the last
    line always written by ``close()``.

    Args:
        stream: Where to write, usually stderr.
        live: Whether to redraw in place; defaults to ``is_live(stream)``.
        every_s: Seconds between plain lines when not on a terminal.
        clock: Monotonic time source, replaceable in tests.
        console: The rich console to draw on (tests give one of a set width).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        live: bool | None = None,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        console: Console | None = None,
    ) -> None:
        self._stream = stream
        self._console = console or Console(file=stream, highlight=False)
        self._live_mode = is_live(stream) if live is None else live
        self._live: Live | None = None
        self._every_s = every_s
        self._clock = clock
        self._last_key: object = None
        self._last_written = float("-inf")
        self._pending: str | None = None

    def show(self, line: _StatusLine, key: object = None) -> None:
        """Displays ``line``; ``key`` marks a change worth a plain line at once."""
        if self._live_mode:
            if self._live is None:
                # Redrawn only here, when something changed: no refresh thread.
                self._live = Live(line, console=self._console, auto_refresh=False, transient=True,
                                  redirect_stdout=False, redirect_stderr=False)
                self._live.start(refresh=True)
            else:
                self._live.update(line, refresh=True)
            return
        now = self._clock()
        text = line.plain()
        if key != self._last_key or now - self._last_written >= self._every_s:
            self._stream.write(text + "\n")
            self._stream.flush()
            self._last_key, self._last_written, self._pending = key, now, None
        else:
            self._pending = text

    def close(self) -> None:
        """Ends the display: clears the live line, or writes the last unwritten one."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        elif self._pending is not None:
            self._stream.write(self._pending + "\n")
        self._stream.flush()
        self._pending = None
