"""Reading a file batch's JSONL input: parse, validate, store in bulk.

The file is cut into byte ranges on line boundaries; each range is parsed and
validated by a worker process (parsing is CPU-bound and the GIL would keep it
on one core), a few ranges ahead of the one being stored, so memory stays flat
whatever the file size and the event loop keeps serving. Small files are
parsed on a thread instead, sparing the process start.

Every line is validated before any request runs: one bad line fails the
batch, naming up to ``MAX_VIOLATIONS`` bad line numbers, and the requests
already stored are dropped by the caller.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from google.rpc import code_pb2, status_pb2

from .config import Limits
from .domain import Batch, BatchKind
from .errors import make_status
from .jsonl import LineError, parse_embed_line, parse_generate_line, plain_generate_payload
from .validate import MAX_VIOLATIONS, Violations, validate_embed_request, validate_generate_request
from .workers import WorkerPool

RANGE_BYTES = 4 << 20
"""Bytes parsed per task: large enough to amortize the hop to a worker."""
MAX_LINE_BYTES = 8 << 20
"""A longer line is refused without being read into memory whole."""
SMALL_FILE_BYTES = 1 << 20
"""Files up to this size are parsed on a thread (no worker process start)."""
_AHEAD = 3
_FIELD = "batch.input_config.file_name"


class IngestFailed(Exception):
    """The input cannot run; ``status`` becomes the batch's error."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


@dataclass
class RangeResult:
    """What one byte range of the input held."""

    lines: int = 0
    """Physical lines, blank ones included (for line numbers)."""
    requests: int = 0
    """Request lines, valid or not (for request indexes)."""
    rows: list[int | str | bytes] = field(default_factory=list)
    """When the range was valid and ``keep`` was asked, its requests as
    (offset in the range, key, serialized request) triples, back to back."""
    bad: list[tuple[int, str]] = field(default_factory=list)
    """(line number within the range, 1-based; problem), at most MAX_VIOLATIONS."""


def split_ranges(path: Path, target: int | None = None) -> list[tuple[int, int]]:
    """Byte ranges of about ``target`` bytes, each ending after a newline."""
    target = target or RANGE_BYTES
    size = path.stat().st_size
    ranges = []
    with path.open("rb") as f:
        start = 0
        while start < size:
            end = min(start + target, size)
            if end < size:
                f.seek(end)
                while True:  # to the end of the line, in bounded reads
                    rest = f.readline(1 << 16)
                    end += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
            ranges.append((start, end))
            start = end
    return ranges


def parse_range(path: str, start: int, end: int, kind: str, model: str, max_request_bytes: int,
                keep: bool) -> RangeResult:
    """Parse and validate the lines in ``[start, end)`` (runs in a worker)."""
    generate = kind == BatchKind.GENERATE.value
    parse = parse_generate_line if generate else parse_embed_line
    check = validate_generate_request if generate else validate_embed_request
    out = RangeResult()
    violations = Violations()
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            raw = f.readline(MAX_LINE_BYTES)
            if not raw:
                break
            pos += len(raw)
            out.lines += 1
            if len(raw) == MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (more := f.readline(1 << 16)) and not more.endswith(b"\n"):
                    pos += len(more)
                pos += len(more)
                out.requests += 1
                _bad(out, f"line is longer than {MAX_LINE_BYTES} bytes")
                continue
            line = raw.strip()
            if not line:
                continue  # blank lines (and the last newline) are allowed
            out.requests += 1
            plain = plain_generate_payload(line) if generate else None
            if plain is not None:
                key, payload = plain
            else:
                try:
                    key, request = parse(line)
                except LineError as e:
                    _bad(out, str(e))
                    continue
                if request.model and request.model != model:
                    _bad(out, f"request.model names {request.model[:80]!r} but the batch runs {model!r}")
                    continue
                check(request, "request", violations)  # type: ignore[arg-type]
                if violations.items:
                    field_name, problem = violations.items[0]
                    violations = Violations()
                    _bad(out, f"{field_name} {problem}")
                    continue
                payload = request.SerializeToString()
            if len(payload) > max_request_bytes:
                _bad(out, f"request is {len(payload)} bytes; the limit is {max_request_bytes}")
            elif keep and not out.bad:
                out.rows += (out.requests - 1, key, payload)
    return out


def _bad(out: RangeResult, problem: str) -> None:
    if len(out.bad) < MAX_VIOLATIONS:
        out.bad.append((out.lines, problem))
    out.rows.clear()


async def ingest(
    batch: Batch, path: Path, limits: Limits, append: Callable[[int, list[int | str | bytes]], Awaitable[None]],
    pool: WorkerPool | None = None,
) -> int:
    """Read ``path`` for ``batch``, storing requests through ``append``
    (Store.append_requests without the batch id).

    Returns the number of requests, or raises IngestFailed (the caller drops
    whatever was appended).
    """
    try:
        ranges = await asyncio.to_thread(split_ranges, path)
    except OSError as e:
        raise IngestFailed(make_status(code_pb2.NOT_FOUND, f"input file files/{batch.input_file} cannot be read",
                                       "INPUT_FILE_MISSING", [(_FIELD, e.strerror or "cannot be read")])) from None
    executor = pool.get() if pool is not None and ranges and ranges[-1][1] > SMALL_FILE_BYTES else None
    loop = asyncio.get_running_loop()
    bad: list[tuple[int, str]] = []
    total_bad = count = line_base = 0
    limit = limits.max_file_lines
    pending: deque[asyncio.Future[RangeResult]] = deque()
    next_range = 0
    try:
        while next_range < len(ranges) or pending:
            while next_range < len(ranges) and len(pending) < _AHEAD:
                start, end = ranges[next_range]
                pending.append(loop.run_in_executor(
                    executor, parse_range, str(path), start, end, batch.kind.value, batch.model,
                    limits.max_request_bytes, not bad,
                ))
                next_range += 1
            result = await pending.popleft()
            total_bad += len(result.bad)
            bad.extend((line_base + n, problem) for n, problem in result.bad[: MAX_VIOLATIONS - len(bad)])
            if count + result.requests > limit:
                bad.append((line_base + result.lines, f"the file has more than {limit} request lines"))
                total_bad += 1
                break
            if not bad and result.rows:
                await append(count, result.rows)
            count += result.requests
            line_base += result.lines
            if len(bad) >= MAX_VIOLATIONS:
                break
    finally:
        for fut in pending:
            fut.cancel()
    if bad:
        first_line, first_problem = bad[0]
        more = f" ({total_bad} bad lines seen" + (", stopped reading at 100)" if len(bad) >= MAX_VIOLATIONS else ")")
        raise IngestFailed(make_status(
            code_pb2.INVALID_ARGUMENT,
            f"input file files/{batch.input_file} is invalid: line {first_line}: {first_problem}{more}",
            "INVALID_INPUT_FILE",
            [(_FIELD, f"line {n}: {problem}") for n, problem in bad[:MAX_VIOLATIONS]],
        ))
    if count == 0:
        raise IngestFailed(make_status(
            code_pb2.INVALID_ARGUMENT, f"input file files/{batch.input_file} has no request lines",
            "EMPTY_INPUT_FILE", [(_FIELD, "has no request lines")],
        ))
    return count



