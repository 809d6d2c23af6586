"""Batch outputs: inline while small, a generated JSONL responses file when not.

A done batch never changes, so an assembled inline output is cached by batch
id (bounded by bytes) and each Get after the first costs one row read.

Rendering a responses file is ~7 µs of JSON per line; for a million lines
that would hold the event loop for seconds on one core. Pages of rows are
rendered by the worker processes instead, a few pages ahead of the one being
written, so memory stays bounded and lines stay in order.

A file batch's responses file is drafted while the batch runs: a result never
changes once recorded, so each page whose requests have all finished is final
however the batch ends, and is rendered then, on the core the executor leaves
free, rather than all at the end. Closing the batch renders only the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Executor

import orjson

from . import convert, jsonout
from .domain import Batch, BatchKind, ItemStatus, ResultRow, State, StoredFile, now_us
from .files import FileBytes, HashingWriter, NewFile, new_id
from .store import ResultReader, Store
from .workers import WorkerPool

log = logging.getLogger("longbatch.outputs")

_PAGE = 2000
_RENDER_PAGE = 4000
"""Lines per rendering task: enough to amortize the hop to a worker (~0.3 ms)."""
_RENDER_AHEAD = 4
_READ_ROWS = 500
"""Rows a worker reads and renders at a time within its range."""
_POOL_MIN = 2 * _RENDER_PAGE
_DRAFT_POLL_S = 0.05
_DRAFT_POLL_MAX_S = 0.25
"""How often a draft looks again for a finished page while none is: from
every 50 ms, backing off to every 250 ms."""
# Get and Wait carry the output twice (metadata.output and response), plus
# the batch itself: keep room for both under the client's receive limit.
_COPIES = 2
_HEADROOM = 64 << 10
_RESPONSE_JSON: dict[BatchKind, Callable[[bytes], bytes]] = {
    BatchKind.GENERATE: jsonout.generate_response_json,
    BatchKind.EMBED: jsonout.embed_response_json,
}


async def result_rows(store: Store, batch: Batch, start_idx: int = 0) -> AsyncGenerator[ResultRow, None]:
    """Results in order from ``start_idx``, read page by page: up to the
    first unfinished request while the batch runs, all of them once it is
    closed (unfinished ones then read as cancelled or expired)."""
    closed = batch.closed
    rest_status, rest_result = convert.closed_item(batch.outcome)
    idx = start_idx
    while True:
        page = await store.results(batch.id, idx, _PAGE, to_first_pending=not closed)
        for row in page:
            if row.status is ItemStatus.PENDING:
                row = ResultRow(row.idx, row.key, row.metadata, rest_status, rest_result)
            yield row
        if len(page) < _PAGE:
            return
        idx = page[-1].idx + 1


class Outputs:
    """Builds, stores and caches batch outputs."""

    def __init__(self, store: Store, files: FileBytes, max_inline_output: int, cache_bytes: int = 64 << 20,
                 workers: WorkerPool | None = None) -> None:
        self._store = store
        self._files = files
        self._workers = workers
        self._max_inline = max_inline_output
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._drafts: dict[str, _Draft] = {}

    def rows(self, batch: Batch, start_idx: int = 0) -> AsyncIterator[ResultRow]:
        """The batch's results; see :func:`result_rows`."""
        return result_rows(self._store, batch, start_idx)

    def begin(self, batch: Batch) -> None:
        """Start drafting the responses file of a running file batch (see the
        module docstring); nothing for batches too small to be worth it."""
        if batch.input_file is None or batch.request_count < _POOL_MIN or batch.id in self._drafts:
            return
        pool = self._workers.get() if self._workers is not None else None
        reader = self._store.result_reader(batch) if pool is not None else None
        if pool is None or reader is None:
            return
        file_id = new_id()
        draft = _Draft(file_id, self._files.create(file_id))
        draft.task = asyncio.create_task(self._draft(draft, batch, pool, reader), name=f"draft-{batch.id}")
        self._drafts[batch.id] = draft

    async def _draft(self, draft: _Draft, batch: Batch, pool: Executor, reader: ResultReader) -> None:
        """Render, in order, each page whose requests have all finished, until
        the batch closes."""
        loop = asyncio.get_running_loop()
        kind, count = batch.kind.value, batch.request_count
        lo = 0  # the first request not yet handed to a worker
        pending: deque[tuple[int, asyncio.Future[bytes]]] = deque()
        wait = _DRAFT_POLL_S
        try:
            while lo < count or pending:
                while not draft.closing.is_set() and lo < count and len(pending) < _RENDER_AHEAD:
                    hi = min(lo + _RENDER_PAGE, count)
                    if await self._store.finished_count(batch, lo, hi) < hi - lo:
                        break
                    pending.append((hi, loop.run_in_executor(pool, render_range, reader, kind, None, lo, hi)))
                    lo = hi
                    wait = _DRAFT_POLL_S
                if pending:
                    hi, rendered = pending[0]
                    data = await rendered
                    pending.popleft()
                    await asyncio.to_thread(draft.file.write, data)
                    draft.rendered = hi
                elif draft.closing.is_set():
                    return
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(draft.closing.wait(), wait)
                    # A slow batch is looked at less often.
                    wait = min(2 * wait, _DRAFT_POLL_MAX_S)
        finally:
            for _, rendered in pending:
                rendered.cancel()

    def _discard(self, batch_id: str) -> None:
        draft = self._drafts.pop(batch_id, None)
        if draft is not None:
            draft.task.cancel()
            draft.task.add_done_callback(draft.dropped)

    async def close(self) -> None:
        """Stop every draft and drop its bytes (the batches resume, and draft
        again, at the next start)."""
        drafts = list(self._drafts.values())
        self._drafts.clear()
        for draft in drafts:
            draft.task.cancel()
        await asyncio.gather(*(d.task for d in drafts), return_exceptions=True)
        for draft in drafts:
            draft.file.abort()

    async def write_if_large(self, batch: Batch) -> str | None:
        """For a closed batch, write a responses file if its output must not be
        inline; return the file id, or None for inline output."""
        if batch.outcome is State.FAILED:
            self._discard(batch.id)
            return None
        if batch.input_file is None:
            size = await self._store.output_size(batch.id)
            if size * _COPIES + _HEADROOM <= self._max_inline:
                return None
        return await self._write_file(batch)

    async def _take_draft(self, batch_id: str) -> tuple[str, NewFile, int] | None:
        """The batch's draft, stopped: file id, file and requests rendered."""
        draft = self._drafts.pop(batch_id, None)
        if draft is None:
            return None
        draft.closing.set()
        try:
            await draft.task
        except Exception:
            # The close renders everything the draft did not: nothing is lost.
            log.exception("drafting the responses of batches/%s failed; rendering them whole", batch_id)
            draft.file.abort()
            return None
        except asyncio.CancelledError:
            draft.task.cancel()
            draft.file.abort()
            raise
        return draft.file_id, draft.file, draft.rendered

    async def _write_file(self, batch: Batch) -> str:
        drafted = await self._take_draft(batch.id)
        if drafted is None:
            file_id = new_id()
            drafted = (file_id, self._files.create(file_id), 0)
        file_id, out, start = drafted
        began = time.monotonic()
        try:
            # A small output is cheaper to render here than to start workers for.
            large = batch.request_count - start >= _POOL_MIN
            pool = self._workers.get() if self._workers is not None and large else None
            reader = self._store.result_reader(batch) if pool is not None else None
            if pool is None or reader is None:
                page: list[_Line] = []
                async for row in self.rows(batch, start):
                    page.append((row.idx, row.key or str(row.idx), row.metadata, int(row.status), row.result))
                    if len(page) >= _RENDER_PAGE:
                        await asyncio.to_thread(out.write, render_lines(batch.kind.value, page))
                        page = []
                await asyncio.to_thread(out.write, render_lines(batch.kind.value, page))
            else:
                await self._render_in(pool, reader, batch, out, start)
            await self._files.commit(out)
        except BaseException:
            out.abort()
            raise
        await self._store.add_file(StoredFile(
            id=file_id, seq=0, tenant=batch.tenant, display_name=f"responses of {batch.name}",
            mime_type="application/jsonl", size_bytes=out.size, sha256=out.sha256, create_time_us=now_us(),
            expire_time_us=None, source="generated",
        ))
        log.info("%s: responses file files/%s written, %d bytes; %d of %d lines drafted while it ran, the rest "
                 "took %.2f s", batch.name, file_id, out.size, start, batch.request_count, time.monotonic() - began)
        return file_id

    @staticmethod
    async def _render_in(pool: Executor, reader: ResultReader, batch: Batch, out: HashingWriter, start: int) -> None:
        """Render the responses file from request ``start`` on in worker
        processes, each reading its own idx range, a few ranges ahead of the
        one being written."""
        loop = asyncio.get_running_loop()
        rest_status, rest_result = convert.closed_item(batch.outcome)
        kind, rest = batch.kind.value, (int(rest_status), rest_result)
        ranges = deque((lo, min(lo + _RENDER_PAGE, batch.request_count))
                       for lo in range(start, batch.request_count, _RENDER_PAGE))
        pending: deque[tuple[int, int, asyncio.Future[bytes]]] = deque()
        try:
            while ranges or pending:
                while ranges and len(pending) < _RENDER_AHEAD:
                    lo, hi = ranges.popleft()
                    pending.append((lo, hi, loop.run_in_executor(pool, render_range, reader, kind, rest, lo, hi)))
                lo, hi, rendered = pending.popleft()
                try:
                    data = await rendered
                except Exception:
                    # A broken worker pool must not lose the output.
                    log.exception("rendering results %d..%d in a worker failed; rendering here", lo, hi)
                    data = render_range(reader, kind, rest, lo, hi)
                # Writing and hashing release the GIL; keep them off the loop.
                await asyncio.to_thread(out.write, data)
        finally:
            for _, _, rendered in pending:
                rendered.cancel()

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


class _Draft:
    """A responses file being rendered while its batch runs."""

    def __init__(self, file_id: str, file: NewFile) -> None:
        self.file_id = file_id
        self.file = file
        self.rendered = 0
        """Requests whose lines are in the file (always a prefix)."""
        self.closing = asyncio.Event()
        self.task: asyncio.Task[None]

    def dropped(self, task: asyncio.Task[None]) -> None:
        """Done callback of a discarded draft: drop its bytes, and mark a
        failure as seen (the batch needs no output)."""
        self.file.abort()
        if not task.cancelled():
            task.exception()


_Line = tuple[int, str, bytes | None, int, bytes]
"""What a responses-file line is made of: index, key, metadata, ItemStatus, result."""


def render_range(reader: ResultReader, kind: str, rest: tuple[int, bytes] | None, lo: int, hi: int) -> bytes:
    """The responses-file lines of requests ``lo <= idx < hi``, unfinished
    ones (PENDING) reading as ``rest`` (a closed batch's), or refused when
    ``rest`` is None (a draft's); runs in a worker.

    Rows are read and rendered a few hundred at a time: the objects of a
    whole range, megabytes, would be freed and allocated again for the
    next one, and fresh memory costs a page fault per 4 KiB.
    """
    pending = ItemStatus.PENDING.value
    rest_status, rest_result = (pending, b"") if rest is None else rest
    out = bytearray()
    for start in range(lo, hi, _READ_ROWS):
        end = min(start + _READ_ROWS, hi)
        rows = reader(start, end)
        if len(rows) != end - start:
            raise RuntimeError(f"expected {end - start} requests from idx {start}, read {len(rows)}")
        if rest is None and any(row[3] == pending for row in rows):
            raise RuntimeError(f"a request in {start}..{end} has not finished")
        out += render_lines(kind, [
            (idx, key or str(idx), metadata, rest_status, rest_result) if status == pending
            else (idx, key or str(idx), metadata, status, result or b"")
            for idx, key, metadata, status, result in rows
        ])
    return bytes(out)


def render_lines(kind: str, rows: list[_Line]) -> bytes:
    """JSONL lines ``{"index", "key", ["metadata",] "response" | "error"}``
    for a ``kind`` (BatchKind value) batch's rows; runs in a worker process.

    The one results line format, also what ``longbatch results`` prints:
    ``index`` a JSON number (0 included), ``key`` the input's key or, when
    it had none, the index as a string (as the Gemini Batch API's files do).
    Each line is its parts' JSON joined: orjson writes an object as exactly
    that, so the response need never be a dict (see generate_response_json).
    """
    response_json = _RESPONSE_JSON[BatchKind(kind)]
    succeeded = ItemStatus.SUCCEEDED.value
    dumps = orjson.dumps
    out = []
    for idx, key, metadata, status, result in rows:
        head = b'{"index":%d,"key":' % idx + dumps(key)
        if metadata is not None:
            head += b',"metadata":' + dumps(jsonout.struct(metadata))
        if status == succeeded:
            out.append(head + b',"response":' + response_json(result) + b"}")
        else:
            out.append(head + b',"error":' + dumps(jsonout.status(result)) + b"}")
    out.append(b"")
    return b"\n".join(out)
