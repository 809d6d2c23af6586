"""Batch outputs: inline while small, a generated JSONL responses file when not.

A done batch never changes, so an assembled inline output is cached by batch
id (bounded by bytes) and each Get after the first costs one row read.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from . import convert, jsonout
from .domain import Batch, BatchKind, ItemStatus, ResultRow, State, StoredFile, now_us
from .files import FileStorage, new_id
from .store import Store

_PAGE = 2000
# Get and Wait carry the output twice (metadata.output and response), plus
# the batch itself: keep room for both under the client's receive limit.
_COPIES = 2
_HEADROOM = 64 << 10
_RESPONSE_JSON = {BatchKind.GENERATE: jsonout.generate_response, BatchKind.EMBED: jsonout.embed_response}


class Outputs:
    """Builds, stores and caches batch outputs."""

    def __init__(self, store: Store, files: FileStorage, max_inline_output: int, cache_bytes: int = 64 << 20) -> None:
        self._store = store
        self._files = files
        self._max_inline = max_inline_output
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0

    async def rows(self, batch: Batch, start_idx: int = 0) -> AsyncIterator[ResultRow]:
        """Results in order from ``start_idx``, read page by page: up to the
        first unfinished request while the batch runs, all of them once it is
        closed (unfinished ones then read as cancelled or expired)."""
        closed = batch.closed
        rest_status, rest_result = convert.closed_item(batch.outcome)
        idx = start_idx
        while True:
            page = await self._store.results(batch.id, idx, _PAGE, to_first_pending=not closed)
            for row in page:
                if row.status is ItemStatus.PENDING:
                    row = ResultRow(row.idx, row.key, row.metadata, rest_status, rest_result)
                yield row
            if len(page) < _PAGE:
                return
            idx = page[-1].idx + 1

    async def write_if_large(self, batch: Batch) -> str | None:
        """For a closed batch, write a responses file if its output must not be
        inline; return the file id, or None for inline output."""
        if batch.outcome is State.FAILED:
            return None
        if batch.input_file is None:
            size = await self._store.output_size(batch.id)
            if size * _COPIES + _HEADROOM <= self._max_inline:
                return None
        return await self._write_file(batch)

    async def _write_file(self, batch: Batch) -> str:
        file_id = new_id()
        response_json = _RESPONSE_JSON[batch.kind]
        with self._files.writer(file_id) as out:
            lines: list[bytes] = []
            async for row in self.rows(batch):
                lines.append(_jsonl_line(row, response_json))
                if len(lines) >= _PAGE:
                    # File writes are small and sequential; keep them off the loop anyway.
                    await asyncio.to_thread(out.write, b"".join(lines))
                    lines.clear()
            await asyncio.to_thread(out.write, b"".join(lines))
        await self._store.add_file(StoredFile(
            id=file_id, seq=0, tenant=batch.tenant, display_name=f"responses of {batch.name}",
            mime_type="application/jsonl", size_bytes=out.size, sha256=out.sha256, create_time_us=now_us(),
            expire_time_us=None, source="generated",
        ))
        return file_id

    async def output(self, batch: Batch) -> bytes | None:
        """The serialized output of a done batch (None while running or FAILED)."""
        if not batch.done or batch.state is State.FAILED:
            return None
        if batch.output_file:
            return convert.file_output(batch.output_file)
        cached = self._cache.get(batch.id)
        if cached is not None:
            self._cache.move_to_end(batch.id)
            return cached
        data = convert.inline_output([row async for row in self.rows(batch)])
        self._remember(batch.id, data)
        return data

    def _remember(self, batch_id: str, data: bytes) -> None:
        if len(data) > self._cache_bytes // 4:
            return
        self._cache[batch_id] = data
        self._cached += len(data)
        while self._cached > self._cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)

    def forget(self, batch_id: str) -> None:
        """Drop a deleted batch from the cache."""
        data = self._cache.pop(batch_id, None)
        if data is not None:
            self._cached -= len(data)


def _jsonl_line(row: ResultRow, response_json: Callable[[bytes], dict[str, Any]]) -> bytes:
    line: dict[str, object] = {"key": row.key or str(row.idx)}
    if row.metadata is not None:
        line["metadata"] = jsonout.struct(row.metadata)
    if row.status is ItemStatus.SUCCEEDED:
        line["response"] = response_json(row.result)
    else:
        line["error"] = jsonout.status(row.result)
    return orjson.dumps(line) + b"\n"
