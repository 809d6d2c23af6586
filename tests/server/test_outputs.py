"""Responses files rendered by worker processes equal those rendered in the
server process, line for line, whatever mix of outcomes a batch holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from longbatch.server.config import ConfigError, config_from_dict
from longbatch.server.domain import BatchKind, ItemStatus, NewBatch, NewItem, Outcome, State
from longbatch.server.files import DiskFileBytes
from longbatch.server.outputs import _POOL_MIN, _RENDER_PAGE, Outputs
from longbatch.server.sqlite_store import SQLiteStore
from longbatch.server.workers import WorkerPool
from longbatch.v1 import content_pb2

N = _POOL_MIN + 1234  # large enough for the worker path, and not a whole number of pages


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "db.sqlite")
    await s.open()
    yield s
    await s.close()


def _response(i: int) -> bytes:
    return content_pb2.GenerateContentResponse(
        candidates=[content_pb2.Candidate(
            content=content_pb2.Content(role="model", parts=[content_pb2.Part(text=f"answer {i} \u00e9\u4e2d")]),
            finish_reason=content_pb2.FinishReason.FINISH_REASON_STOP)],
        model_version="echo-1",
    ).SerializeToString()


async def _cancelled_batch(store: SQLiteStore) -> str:
    """A batch of N: every third request answered, every seventh failed, the
    rest unfinished when it was cancelled; some with metadata, some keyless."""
    meta = struct_pb2.Struct()
    meta.update({"source": "test", "n": 3})
    items = [NewItem(i, "" if i % 11 == 0 else f"k{i}", meta.SerializeToString() if i % 5 == 0 else None, b"")
             for i in range(N)]
    batch = NewBatch(id="big", tenant="t", kind=BatchKind.GENERATE, model="models/echo", display_name="",
                     priority=0, input_file=None, webhook=None, request_id=None)
    await store.create_batch(batch, items, 0)
    error = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="model overloaded").SerializeToString()
    await store.record_outcomes(
        [Outcome("big", i, ItemStatus.SUCCEEDED, _response(i)) for i in range(0, N, 3)]
        + [Outcome("big", i, ItemStatus.FAILED, error) for i in range(1, N, 7) if i % 3])
    await store.close_batch("big", State.CANCELLED, None, ItemStatus.CANCELLED)
    return "big"


async def test_worker_rendered_file_equals_in_process_file(store: SQLiteStore, tmp_path: Path) -> None:
    batch_id = await _cancelled_batch(store)
    batch = await store.get_batch(None, batch_id)
    assert batch is not None and batch.closed
    files = DiskFileBytes(tmp_path / "files")
    files.prepare()
    pool = WorkerPool(2)
    try:
        in_pool = await Outputs(store, files, 1 << 20, workers=pool)._write_file(batch)
    finally:
        pool.close()
    here = await Outputs(store, files, 1 << 20, workers=None)._write_file(batch)
    data = files.path(in_pool).read_bytes()
    assert data == files.path(here).read_bytes()

    lines = [orjson.loads(line) for line in data.splitlines()]
    assert len(lines) == N
    # The one results line format: index first, a number (0 included), then key.
    assert [line["index"] for line in lines] == list(range(N))
    assert data.startswith(b'{"index":0,"key":"0",')
    assert all(list(line)[:2] == ["index", "key"] for line in lines)
    assert [line["key"] for line in lines[:12]] == ["0", *(f"k{i}" for i in range(1, 11)), "11"]
    assert lines[3]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "answer 3 \u00e9\u4e2d"
    assert lines[1]["error"] == {"code": code_pb2.UNAVAILABLE, "message": "model overloaded"}
    assert lines[2]["error"]["code"] == code_pb2.CANCELLED  # unfinished when cancelled
    assert lines[5]["metadata"] == {"source": "test", "n": 3}
    assert sum("response" in line for line in lines) == len(range(0, N, 3))


async def test_a_file_drafted_while_the_batch_runs_equals_one_rendered_at_the_end(
    store: SQLiteStore, tmp_path: Path
) -> None:
    # The first two pages finish while the batch runs, and some of the rest;
    # then it is cancelled. The drafted pages must stay exactly what they
    # would have been, and the close must render the rest around them.
    items = [NewItem(i, f"k{i}", None, b"") for i in range(N)]
    new = NewBatch(id="run", tenant="t", kind=BatchKind.GENERATE, model="models/echo", display_name="",
                   priority=0, input_file="input", webhook=None, request_id=None)
    await store.create_batch(new, items, 0)
    running = await store.get_batch(None, "run")
    assert running is not None and running.request_count == N
    early = 2 * _RENDER_PAGE
    await store.record_outcomes([Outcome("run", i, ItemStatus.SUCCEEDED, _response(i)) for i in range(early)]
                                + [Outcome("run", i, ItemStatus.SUCCEEDED, _response(i)) for i in range(early, N, 2)])
    files = DiskFileBytes(tmp_path / "files")
    files.prepare()
    pool = WorkerPool(2)
    outputs = Outputs(store, files, 1 << 20, workers=pool)
    try:
        outputs.begin(running)
        draft = outputs._drafts["run"]
        for _ in range(200):  # up to 10 s
            if draft.rendered == early:
                break
            await asyncio.sleep(0.05)
        assert draft.rendered == early  # and no further: page three is unfinished
        await store.close_batch("run", State.CANCELLED, None, ItemStatus.CANCELLED)
        closed = await store.get_batch(None, "run")
        assert closed is not None
        drafted = await outputs._write_file(closed)
        assert outputs._drafts == {}
    finally:
        await outputs.close()
        pool.close()
    whole = await Outputs(store, files, 1 << 20, workers=None)._write_file(closed)
    data = files.path(drafted).read_bytes()
    assert data == files.path(whole).read_bytes()
    assert len(data.splitlines()) == N
    assert list((tmp_path / "files" / ".tmp").iterdir()) == []


async def test_a_draft_is_dropped_with_its_bytes_when_the_batch_fails_or_the_server_stops(
    store: SQLiteStore, tmp_path: Path
) -> None:
    items = [NewItem(i, f"k{i}", None, b"") for i in range(N)]
    for batch_id in ("fails", "stops"):
        await store.create_batch(NewBatch(
            id=batch_id, tenant="t", kind=BatchKind.GENERATE, model="models/echo", display_name="", priority=0,
            input_file="input", webhook=None, request_id=None), items, 0)
    files = DiskFileBytes(tmp_path / "files")
    files.prepare()
    pool = WorkerPool(1)
    outputs = Outputs(store, files, 1 << 20, workers=pool)
    try:
        for batch_id in ("fails", "stops"):
            batch = await store.get_batch(None, batch_id)
            assert batch is not None
            outputs.begin(batch)
        assert len(list((tmp_path / "files" / ".tmp").iterdir())) == 2
        await store.close_batch("fails", State.FAILED, None, ItemStatus.CANCELLED)
        failed = await store.get_batch(None, "fails")
        assert failed is not None
        dropping = outputs._drafts["fails"].task
        assert await outputs.write_if_large(failed) is None
        await outputs.close()
        # A discarded draft drops its file in its task's done callback, added
        # before this wait's own: so it has run once the wait is over.
        await asyncio.wait_for(asyncio.gather(dropping, return_exceptions=True), 10)
        assert dropping.done()
        assert list((tmp_path / "files" / ".tmp").iterdir()) == []
        assert outputs._drafts == {}
    finally:
        pool.close()


def test_server_workers_setting() -> None:
    assert config_from_dict({}).workers == 2
    assert config_from_dict({"server": {"workers": 0}}).workers == 0
    for bad in (-1, 17, "2", True):
        with pytest.raises(ConfigError, match=r"server\.workers"):
            config_from_dict({"server": {"workers": bad}})
