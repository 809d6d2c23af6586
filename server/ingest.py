"""Reading a file batch's JSONL input: parse, validate, store in bulk.

The file is read and parsed in chunks on a worker thread, so memory stays flat
whatever the file size and the event loop keeps serving while a big file is
read. Every line is validated before any request runs: one bad line fails the
batch, naming up to ``MAX_VIOLATIONS`` bad line numbers, and the requests
already stored are dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from google.rpc import code_pb2, status_pb2

from longbatch.v1 import content_pb2

from .config import Limits
from .domain import Batch, BatchKind, NewItem
from .errors import make_status
from .jsonl import LineError, parse_embed_line, parse_generate_line
from .validate import MAX_VIOLATIONS, Violations, validate_embed_request, validate_generate_request

CHUNK_LINES = 5000
_FIELD = "batch.input_config.file_name"


class IngestFailed(Exception):
    """The input cannot run; ``status`` becomes the batch's error."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


@dataclass
class _Chunk:
    items: list[NewItem] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)
    """(line number, problem) for invalid lines."""
    eof: bool = False


class _LineParser:
    """Thread-side state: reads lines and turns them into stored requests."""

    def __init__(self, f: BinaryIO, kind: BatchKind, model: str, limits: Limits) -> None:
        self._f = f
        self._model = model
        self._limits = limits
        self._lineno = 0
        self.count = 0
        self._violations = Violations()  # reused while lines are valid
        self._parse: Callable[[bytes], tuple[str, content_pb2.GenerateContentRequest]] | Callable[
            [bytes], tuple[str, content_pb2.EmbedContentRequest]]
        if kind is BatchKind.GENERATE:
            self._parse, self._check = parse_generate_line, validate_generate_request
        else:
            self._parse, self._check = parse_embed_line, validate_embed_request  # type: ignore[assignment]

    def next_chunk(self, keep_items: bool) -> _Chunk:
        chunk = _Chunk()
        limit = self._limits.max_file_lines
        for _ in range(CHUNK_LINES):
            raw = self._f.readline()
            if not raw:
                chunk.eof = True
                return chunk
            self._lineno += 1
            line = raw.strip()
            if not line:
                continue  # blank lines (and the last newline) are allowed
            if self.count >= limit:
                chunk.bad.append((self._lineno, f"the file has more than {limit} request lines"))
                chunk.eof = True
                return chunk
            problem = self._line(line, chunk if keep_items else None)
            if problem:
                chunk.bad.append((self._lineno, problem))
        return chunk

    def _line(self, line: bytes, chunk: _Chunk | None) -> str | None:
        idx = self.count
        self.count += 1
        try:
            key, request = self._parse(line)
        except LineError as e:
            return str(e)
        if request.model and request.model != self._model:
            return f"request.model names {request.model[:80]!r} but the batch runs {self._model!r}"
        v = self._violations
        self._check(request, "request", v)  # type: ignore[arg-type]
        if v.items:
            field_name, problem = v.items[0]
            self._violations = Violations()
            return f"{field_name} {problem}"
        payload = request.SerializeToString()
        if len(payload) > self._limits.max_request_bytes:
            return f"request is {len(payload)} bytes; the limit is {self._limits.max_request_bytes}"
        if chunk is not None:
            chunk.items.append(NewItem(idx=idx, key=key, metadata=None, payload=payload))
        return None


async def ingest(
    batch: Batch, path: Path, limits: Limits, append: Callable[[list[NewItem]], Awaitable[None]]
) -> int:
    """Read ``path`` for ``batch``, storing requests through ``append``.

    Returns the number of requests, or raises IngestFailed (nothing stored
    then counts: the caller drops what was appended).
    """
    try:
        f = await asyncio.to_thread(path.open, "rb")
    except OSError as e:
        raise IngestFailed(make_status(code_pb2.NOT_FOUND, f"input file files/{batch.input_file} cannot be read",
                                       "INPUT_FILE_MISSING", [(_FIELD, e.strerror or "cannot be read")])) from None
    bad: list[tuple[int, str]] = []
    total_bad = 0
    try:
        parser = _LineParser(f, batch.kind, batch.model, limits)
        while True:
            chunk = await asyncio.to_thread(parser.next_chunk, not bad)
            if chunk.bad:
                total_bad += len(chunk.bad)
                bad.extend(chunk.bad[: MAX_VIOLATIONS - len(bad)])
            elif chunk.items and not bad:
                await append(chunk.items)
            if chunk.eof or len(bad) >= MAX_VIOLATIONS:
                break
    finally:
        await asyncio.to_thread(f.close)
    if bad:
        first_line, first_problem = bad[0]
        more = f" ({total_bad} bad lines seen" + (", stopped reading at 100)" if len(bad) >= MAX_VIOLATIONS else ")")
        raise IngestFailed(make_status(
            code_pb2.INVALID_ARGUMENT,
            f"input file files/{batch.input_file} is invalid: line {first_line}: {first_problem}{more}",
            "INVALID_INPUT_FILE",
            [(_FIELD, f"line {n}: {problem}") for n, problem in bad],
        ))
    if parser.count == 0:
        raise IngestFailed(make_status(
            code_pb2.INVALID_ARGUMENT, f"input file files/{batch.input_file} has no request lines",
            "EMPTY_INPUT_FILE", [(_FIELD, "has no request lines")],
        ))
    return parser.count
