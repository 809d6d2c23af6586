"""Expiry and retention against the real server (API.md sections 4 and 6).

Batches not done within ``batch_ttl`` become EXPIRED with their finished
results kept; done batches and their generated files are purged after
``retention``; uploads go after ``file_ttl``. Every TTL here is at most 2 s and
every wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
from conftest import MakeServer
from google.longrunning import operations_pb2

from longbatch.server.config import (
    DEFAULT_MODELS,
    ConfigError,
    Limits,
    ModelConfig,
    ServerConfig,
    WebhookSettings,
    config_from_dict,
)
from longbatch.server.domain import BatchKind, ItemStatus, NewBatch, NewItem, State, StoredFile, now_us
from longbatch.server.sqlite_store import SQLiteStore
from longbatch.server.store import WebhookDelivery
from longbatch.v1 import batch_pb2, file_pb2, file_pb2_grpc

from support import Calls, ServerProcess, Stubs, details, eventually, generate_batch, metadata_of, wait_done

EXPIRED = batch_pb2.BatchState.BATCH_STATE_EXPIRED
PENDING = batch_pb2.BatchState.BATCH_STATE_PENDING
RUNNING = batch_pb2.BatchState.BATCH_STATE_RUNNING
CANCELLED = batch_pb2.BatchState.BATCH_STATE_CANCELLED
SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED
DEADLINE_EXCEEDED = 4
# One worker stuck for seconds on each request: whatever is queued behind it
# stays PENDING, deterministically.
STUCK = ModelConfig(name="models/stuck", backend="echo", max_concurrency=1, latency_s=5.0)


async def get(stubs: Stubs, name: str) -> operations_pb2.Operation:
    return await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name))


async def stream(stubs: Stubs, name: str) -> list[batch_pb2.BatchResult]:
    return [r async for r in stubs.batches.StreamBatchResults(batch_pb2.StreamBatchResultsRequest(name=name))]


async def not_found(call: Awaitable[object], reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(e.value).reason == reason


async def upload(channel: grpc.aio.Channel, data: bytes) -> file_pb2.File:
    async def chunks() -> AsyncIterator[file_pb2.CreateFileRequest]:
        yield file_pb2.CreateFileRequest(file=file_pb2.File(display_name="input.jsonl"))
        for start in range(0, len(data), 1 << 20):
            yield file_pb2.CreateFileRequest(data=data[start:start + (1 << 20)])

    return await file_pb2_grpc.FileServiceStub(channel).CreateFile(chunks())


def jsonl(n: int) -> bytes:
    return b"".join(json.dumps({"key": f"k{i}", "request": {"contents": [{"parts": [{"text": f"line {i}"}]}]}})
                    .encode() + b"\n" for i in range(n))


def file_batch(file_name: str, model: str = "models/echo") -> batch_pb2.BatchGenerateContentRequest:
    return batch_pb2.BatchGenerateContentRequest(batch=batch_pb2.GenerateContentBatch(
        model=model, input_config=batch_pb2.InputConfig(file_name=file_name)))


def check_expired(op: operations_pb2.Operation, total: int) -> batch_pb2.GenerateContentBatch:
    """The shape API.md section 4 gives an EXPIRED batch; returns its metadata."""
    assert op.done and op.error.code == DEADLINE_EXCEEDED and not op.HasField("response")
    meta = metadata_of(op)
    assert isinstance(meta, batch_pb2.GenerateContentBatch)
    assert meta.state == EXPIRED and meta.HasField("end_time")
    stats = meta.batch_stats
    assert stats.pending_request_count == 0
    assert stats.request_count == total
    assert (stats.successful_request_count + stats.failed_request_count + stats.cancelled_request_count
            + stats.expired_request_count) == total
    assert stats.cancelled_request_count == 0
    return meta


# -- expiry ----------------------------------------------------------------------


async def test_running_batch_expires_keeping_finished_results(make_server: MakeServer) -> None:
    srv = await make_server(ServerConfig(limits=Limits(batch_ttl_s=1.0)))
    # Each round of the executor's expiry sweep begins with this query.
    sweeps = Calls(srv.running.store, "expired_batches")
    stubs = Stubs.connect(srv.target)
    try:
        # 2000 x 50 ms over 16 workers takes about 6 s: far past the 1 s TTL.
        op = await stubs.batches.BatchGenerateContent(generate_batch(2000, model="models/echo-slow"))
        op = await wait_done(stubs, op.name, within=10)
        meta = check_expired(op, 2000)
        stats = meta.batch_stats
        assert stats.successful_request_count > 0 and stats.expired_request_count > 0
        lifetime = meta.end_time.ToMicroseconds() - meta.create_time.ToMicroseconds()
        assert 1_000_000 <= lifetime < 3_000_000, lifetime

        # metadata.output: every request in input order, finished ones with
        # their response, the rest DEADLINE_EXCEEDED items.
        entries = meta.output.inlined_responses.inlined_responses
        assert [e.metadata["i"] for e in entries] == list(range(2000))
        ok = [i for i, e in enumerate(entries) if e.HasField("response")]
        assert len(ok) == stats.successful_request_count
        assert all(entries[i].response.candidates[0].content.parts[0].text == f"prompt {i}" for i in ok)
        rest = [e for e in entries if not e.HasField("response")]
        assert len(rest) == stats.expired_request_count
        assert all(e.error.code == DEADLINE_EXCEEDED and "expired" in e.error.message for e in rest)

        streamed = await stream(stubs, op.name)
        assert [r.index for r in streamed] == list(range(2000))
        assert [i for i, r in enumerate(streamed) if r.HasField("generate_content_response")] == ok
        assert all(r.error.code == DEADLINE_EXCEEDED for r in streamed if not r.HasField("generate_content_response"))

        listed = await stubs.ops.ListOperations(operations_pb2.ListOperationsRequest(filter="state = EXPIRED"))
        assert [o.name for o in listed.operations] == [op.name]

        # Cancel on an EXPIRED batch: OK, and nothing changes, ever.
        await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
        # What could still touch it has had its turn: every call in flight when
        # it expired has ended (a closed batch takes no late result), and a
        # whole expiry sweep ran after the cancel (the second query from now
        # begins once the first round, which may predate it, is over).
        gate = srv.running.executor.gate("models/echo-slow")
        await eventually(lambda: gate.in_flight == 0, within=5, what="calls in flight ended")
        await sweeps.more(2, within=5)
        assert await get(stubs, op.name) == op
    finally:
        await stubs.channel.close()


async def test_pending_batch_queued_behind_another_expires(make_server: MakeServer) -> None:
    srv = await make_server(ServerConfig(models=(*DEFAULT_MODELS, STUCK), limits=Limits(batch_ttl_s=1.0)))
    stubs = Stubs.connect(srv.target)
    try:
        first = await stubs.batches.BatchGenerateContent(generate_batch(3, model=STUCK.name))

        async def first_running() -> bool:
            return metadata_of(await get(stubs, first.name)).state == RUNNING

        await eventually(first_running, within=5)
        gate = srv.running.executor.gate(STUCK.name)
        await eventually(lambda: gate.in_flight == 1, within=5, what="the only worker took its first request")
        queued = await stubs.batches.BatchGenerateContent(generate_batch(5, model=STUCK.name))
        # PENDING at every look until it ends EXPIRED: it never ran, however
        # late a look would have caught it running.
        deadline = time.monotonic() + 5
        while not (op := await get(stubs, queued.name)).done:
            assert metadata_of(op).state == PENDING
            assert time.monotonic() < deadline, "the queued batch did not expire within 5 s"
            await asyncio.sleep(0.05)

        meta = check_expired(op, 5)
        assert meta.batch_stats.expired_request_count == 5
        entries = meta.output.inlined_responses.inlined_responses
        assert [e.metadata["i"] for e in entries] == list(range(5))
        assert all(e.error.code == DEADLINE_EXCEEDED for e in entries)
        assert [r.error.code for r in await stream(stubs, queued.name)] == [DEADLINE_EXCEEDED] * 5
        # The one ahead of it expired too, its in-flight request counted as expired.
        check_expired(await wait_done(stubs, first.name, within=5), 3)
    finally:
        await stubs.channel.close()


async def test_file_batch_expires_while_its_input_is_read(make_server: MakeServer) -> None:
    srv = await make_server(ServerConfig(limits=Limits(batch_ttl_s=0.3)))
    stubs = Stubs.connect(srv.target)
    try:
        # Reading 300,000 lines takes seconds, far past the 0.3 s TTL.
        f = await upload(stubs.channel, jsonl(300_000))
        op = await stubs.batches.BatchGenerateContent(file_batch(f.name))
        op = await wait_done(stubs, op.name, within=10)
        # Expired before its input was read whole: no request counts, and the
        # requests read so far are gone.
        check_expired(op, 0)
        db = sqlite3.connect(srv.data_dir / "longbatch.db")
        try:
            assert db.execute("SELECT COUNT(*) FROM requests").fetchone() == (0,)
            assert db.execute("SELECT COUNT(*) FROM results").fetchone() == (0,)
        finally:
            db.close()
        # Nothing is stuck: the input can go, and the next batch runs.
        files = file_pb2_grpc.FileServiceStub(stubs.channel)
        await files.DeleteFile(file_pb2.DeleteFileRequest(name=f.name))
        nxt = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(generate_batch(10))).name, within=5)
        assert metadata_of(nxt).state == SUCCEEDED
    finally:
        await stubs.channel.close()


@pytest.mark.timeout(60)
async def test_batch_past_its_ttl_while_down_expires_on_start(tmp_path: Path) -> None:
    config = tmp_path / "longbatch.toml"
    config.write_text('[limits]\nbatch_ttl = "2s"\n')
    data = tmp_path / "data"
    proc = ServerProcess(data, config)
    try:
        stubs = Stubs.connect(await proc.start())
        op = await stubs.batches.BatchGenerateContent(generate_batch(2000, model="models/echo-slow"))
        created = time.monotonic()

        async def some_done() -> bool:
            return metadata_of(await get(stubs, op.name)).batch_stats.successful_request_count >= 50

        await eventually(some_done, within=1.5)
        await stubs.channel.close()
        await proc.kill()
        assert time.monotonic() - created < 2.0, "too slow to kill before the TTL"
        db = sqlite3.connect(data / "longbatch.db")
        try:
            persisted = db.execute("SELECT COUNT(*) FROM results WHERE status = 1").fetchone()[0]
        finally:
            db.close()
        assert persisted > 0
        await asyncio.sleep(max(0.0, created + 2.2 - time.monotonic()))

        stubs = Stubs.connect(await proc.start())
        op = await wait_done(stubs, op.name, within=5)
        meta = check_expired(op, 2000)
        # Expired on start: not one more request ran after the restart.
        assert meta.batch_stats.successful_request_count == persisted
        assert meta.batch_stats.expired_request_count == 2000 - persisted
        await stubs.channel.close()
        assert await proc.terminate() == 0
    finally:
        await proc.ensure_dead()


async def test_cancelled_transactions_never_wedge_the_writer(tmp_path: Path) -> None:
    # Expiry and cancel stop an ingest wherever it is, inside a store write
    # included; a transaction begun but never ended would fail every later
    # write with "cannot start a transaction within a transaction".
    store = SQLiteStore(tmp_path / "longbatch.db")
    await store.open()
    try:
        for i in range(60):
            write = asyncio.create_task(store.secret(f"k{i}"))
            for _ in range(i % 7):
                await asyncio.sleep(0)
            write.cancel()
            await asyncio.gather(write, return_exceptions=True)
            assert len(await store.secret("probe")) == 32
    finally:
        await store.close()


# -- retention -------------------------------------------------------------------


def test_retention_config() -> None:
    assert Limits().retention_s == 30 * 86400
    assert config_from_dict({"limits": {"retention": "30d"}}).limits.retention_s == 30 * 86400
    assert config_from_dict({"limits": {"retention": "90m"}}).limits.retention_s == 5400
    for bad in ("soon", "-1s", True):
        with pytest.raises(ConfigError, match=r"limits\.retention"):
            config_from_dict({"limits": {"retention": bad}})


async def test_done_batches_are_purged_after_retention(
    make_server: MakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="longbatch.retention")
    # Three workers: the cancelled batch's two requests may each hold one for
    # their 5 s (a closed batch's calls in flight run out), and the batch
    # meant to be running must still get one.
    stuck = dataclasses.replace(STUCK, max_concurrency=3)
    srv = await make_server(ServerConfig(models=(*DEFAULT_MODELS, stuck), limits=Limits(retention_s=1.0)))
    assert srv.running.retention is not None and srv.running.retention.interval_s == 0.05
    stubs = Stubs.connect(srv.target)
    files = file_pb2_grpc.FileServiceStub(stubs.channel)
    try:
        inline = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(generate_batch(10))).name)
        upload_ = await upload(stubs.channel, jsonl(20))
        from_file = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(file_batch(upload_.name))).name)
        output = batch_pb2.GenerateContentBatchOutput()
        assert from_file.response.Unpack(output)
        responses = output.responses_file
        assert responses.startswith("files/")
        cancelled = await stubs.batches.BatchGenerateContent(generate_batch(2, model=STUCK.name))
        await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=cancelled.name))
        assert metadata_of(await wait_done(stubs, cancelled.name, within=5)).state == CANCELLED
        # Still running, so never purged, however old.
        running = await stubs.batches.BatchGenerateContent(generate_batch(3, model=STUCK.name))
        purged = [inline.name, from_file.name, cancelled.name]
        # Kept until retention has passed.
        for name in purged:
            assert (await get(stubs, name)).done

        async def all_purged() -> bool:
            for name in purged:
                try:
                    await get(stubs, name)
                    return False
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND
            return True

        await eventually(all_purged, within=5)
        # NOT_FOUND everywhere, like a deleted batch.
        for name in purged:
            await not_found(get(stubs, name), "BATCH_NOT_FOUND")
            await not_found(stubs.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name)),
                            "BATCH_NOT_FOUND")
            await not_found(stream(stubs, name), "BATCH_NOT_FOUND")
        await not_found(files.GetFile(file_pb2.GetFileRequest(name=responses)), "FILE_NOT_FOUND")
        assert not (srv.data_dir / "files" / responses.removeprefix("files/")).exists()
        # The input follows file_ttl, not retention.
        assert (await files.GetFile(file_pb2.GetFileRequest(name=upload_.name))).size_bytes == len(jsonl(20))
        assert (srv.data_dir / "files" / upload_.name.removeprefix("files/")).read_bytes() == jsonl(20)
        listed = await stubs.ops.ListOperations(operations_pb2.ListOperationsRequest())
        assert [o.name for o in listed.operations] == [running.name]
        assert metadata_of(await get(stubs, running.name)).state == RUNNING
        db = sqlite3.connect(srv.data_dir / "longbatch.db")
        try:
            assert db.execute("SELECT COUNT(*) FROM requests").fetchone() == (3,)  # the running batch's
            assert db.execute("SELECT COUNT(*) FROM files").fetchone() == (1,)  # the input
        finally:
            db.close()
        assert any("purged" in r.getMessage() for r in caplog.records if r.name == "longbatch.retention")
    finally:
        await stubs.channel.close()


async def test_uploads_follow_file_ttl_not_retention(make_server: MakeServer) -> None:
    srv = await make_server(ServerConfig(limits=Limits(file_ttl_s=0.5)))
    stubs = Stubs.connect(srv.target)
    files = file_pb2_grpc.FileServiceStub(stubs.channel)
    try:
        f = await upload(stubs.channel, jsonl(5))
        op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(file_batch(f.name))).name)
        output = batch_pb2.GenerateContentBatchOutput()
        assert op.response.Unpack(output)

        async def input_gone() -> bool:
            try:
                await files.GetFile(file_pb2.GetFileRequest(name=f.name))
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
                return True
            return False

        await eventually(input_gone, within=5)
        assert not (srv.data_dir / "files" / f.name.removeprefix("files/")).exists()
        # The batch and its generated responses file stay: retention is 30 days.
        assert metadata_of(await get(stubs, op.name)).state == SUCCEEDED
        assert (await files.GetFile(file_pb2.GetFileRequest(name=output.responses_file))).size_bytes > 0
    finally:
        await stubs.channel.close()


async def _done_batch(store: SQLiteStore, batch_id: str, requests: int, output_file: str | None = None,
                      input_file: str | None = None) -> None:
    items = [NewItem(idx=i, key=str(i), metadata=None, payload=b"x" * 10) for i in range(requests)]
    await store.create_batch(NewBatch(id=batch_id, tenant="t", kind=BatchKind.GENERATE, model="models/echo",
                                      display_name="", priority=0, input_file=input_file, webhook=None,
                                      request_id=None), items, 0)
    await store.close_batch(batch_id, State.CANCELLED, b"", ItemStatus.CANCELLED)
    await store.mark_done(batch_id, output_file)


def _file(file_id: str, source: str) -> StoredFile:
    return StoredFile(id=file_id, seq=0, tenant="t", display_name="", mime_type="application/jsonl", size_bytes=1,
                      sha256=b"", create_time_us=now_us(), expire_time_us=None, source=source)


async def test_purge_steps_are_bounded(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "longbatch.db")
    await store.open()
    db = sqlite3.connect(tmp_path / "longbatch.db")

    def requests() -> dict[str, list[int]]:
        rows = db.execute("SELECT b.id, r.idx FROM requests r JOIN batches b ON b.seq = r.batch_seq ORDER BY 1, 2")
        out: dict[str, list[int]] = {}
        for batch_id, idx in rows:
            out.setdefault(batch_id, []).append(idx)
        return out

    try:
        await store.add_file(_file("input", "uploaded"))
        await store.add_file(_file("out-big", "generated"))
        await store.add_file(_file("out-s2", "generated"))
        await _done_batch(store, "big", 12, output_file="out-big", input_file="input")  # ends first
        for i in range(6):
            await _done_batch(store, f"s{i}", 3, output_file="out-s2" if i == 2 else None)
        unfinished, _ = await store.create_batch(
            NewBatch(id="live", tenant="t", kind=BatchKind.GENERATE, model="models/echo", display_name="",
                     priority=0, input_file=None, webhook=None, request_id=None),
            [NewItem(idx=0, key="0", metadata=None, payload=b"x")], 0)
        cutoff = now_us()
        await _done_batch(store, "late", 2)  # done after the cutoff

        steps = []
        left = requests()
        while True:
            step = await store.purge_done_batches(cutoff, max_batches=4, max_requests=5)
            now_left = requests()
            removed = sum(len(v) for v in left.values()) - sum(len(v) for v in now_left.values())
            steps.append((step.batch_ids, removed))
            assert removed <= 5 and len(step.batch_ids) <= 4
            # The big batch loses its tail first: whatever is left is a prefix.
            if "big" in now_left:
                assert now_left["big"] == list(range(len(now_left["big"])))
                assert await store.get_batch(None, "big") is not None
            if "out-big" in step.file_ids:
                assert step.batch_ids[0] == "big"
            left = now_left
            if not step.more:
                break
            assert len(steps) < 20
        assert [b for ids, _ in steps for b in ids] == ["big", "s0", "s1", "s2", "s3", "s4", "s5"]
        assert steps[0] == ([], 5) and steps[1] == ([], 5)  # 12 requests: 5, 5, then the last 2 with the row
        assert left == {"live": [0], "late": [0, 1]}
        for batch_id in ("big", "s0", "s5"):
            assert await store.get_batch(None, batch_id) is None
        assert unfinished.id == "live" and await store.get_batch(None, "live") is not None
        assert await store.get_batch(None, "late") is not None
        # Generated outputs went with their batches; the input stays.
        assert [r[0] for r in db.execute("SELECT id FROM files ORDER BY id")] == ["input"]
        plan = " ".join(str(r) for r in db.execute(
            "EXPLAIN QUERY PLAN SELECT seq, id, output_file FROM batches WHERE done = 1 AND end_time < ? "
            "ORDER BY end_time LIMIT ?", (cutoff, 4)))
        assert "batches_done_by_end" in plan, plan
    finally:
        db.close()
        await store.close()


# -- webhook deliveries go with their batch ------------------------------------------


def _delivery_count(data_dir: Path, batch_id: str | None = None) -> int:
    db = sqlite3.connect(data_dir / "longbatch.db")
    try:
        if batch_id is None:
            return int(db.execute("SELECT COUNT(*) FROM webhook_deliveries").fetchone()[0])
        return int(db.execute("SELECT COUNT(*) FROM webhook_deliveries WHERE batch_id = ?", (batch_id,)).fetchone()[0])
    finally:
        db.close()


@pytest.mark.usefixtures("loopback_only", "fake_dns")
async def test_retention_purges_webhook_deliveries(make_server: MakeServer) -> None:
    # The receivers' names are unknown to the test DNS: the deliveries stay
    # pending (retried every 5 s), nothing is sent.
    srv = await make_server(ServerConfig(limits=Limits(retention_s=2.0),
                                         webhooks=WebhookSettings(initial_backoff_s=5.0, max_backoff_s=5.0)))
    stubs = Stubs.connect(srv.target)
    try:
        config = batch_pb2.WebhookConfig(uris=[f"http://receiver-{i}.test/hook" for i in range(3)])
        op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(
            generate_batch(2, webhook_config=config))).name)
        batch_id = op.name.removeprefix("batches/")

        async def stored() -> bool:
            return _delivery_count(srv.data_dir, batch_id) == 3

        await eventually(stored, within=5)

        async def purged() -> bool:
            try:
                await get(stubs, op.name)
                return False
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
                return True

        await eventually(purged, within=10)
        # In the purge's own transaction.
        assert _delivery_count(srv.data_dir) == 0
    finally:
        await stubs.channel.close()


async def test_deliveries_of_batches_deleted_before_are_deleted_on_start(make_server: MakeServer,
                                                                          tmp_path: Path) -> None:
    """Versions before this one kept a deleted batch's deliveries: the next
    start deletes them, and only them."""
    data = tmp_path / "data"
    first = await make_server(data_dir=data)
    stubs = Stubs.connect(first.target)
    try:
        op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(generate_batch(1))).name)
    finally:
        await stubs.channel.close()
    await first.running.stop(grace_s=1.0)
    live = op.name.removeprefix("batches/")
    db = sqlite3.connect(data / "longbatch.db")
    try:
        with db:
            db.executemany(
                "INSERT INTO webhook_deliveries (id, batch_id, uri, body, status, attempts, next_attempt_time, "
                "create_time, update_time) VALUES (?, ?, ?, ?, 'delivered', 1, 0, 0, 0)",
                [(f"orphan{i}", f"gone{i % 3}", f"http://x.test/{i}", b"x" * 1000) for i in range(1200)]
                + [("mine", live, "http://x.test/live", b"{}")])
    finally:
        db.close()
    await make_server(data_dir=data)  # default retention (30 d): this is not the periodic purge

    async def orphans_gone() -> bool:
        return _delivery_count(data) == 1

    await eventually(orphans_gone, within=10)
    assert _delivery_count(data, live) == 1


async def test_store_deletes_deliveries_with_their_batch(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "longbatch.db")
    await store.open()

    def deliveries(batch_id: str) -> list[WebhookDelivery]:
        return [WebhookDelivery(id=f"{batch_id}-{i}", batch_id=batch_id, uri=f"http://x.test/{i}", body=b"{}",
                                attempts=0, next_attempt_us=0) for i in range(2)]

    try:
        for batch_id in ("deleted", "purged", "young"):
            await _done_batch(store, batch_id, 2)
            assert await store.add_webhook_deliveries(deliveries(batch_id)) == 2
        assert await store.delete_batch("t", "deleted") == []
        assert _delivery_count(tmp_path, "deleted") == 0 and _delivery_count(tmp_path) == 4
        young = await store.get_batch(None, "young")
        assert young is not None and young.end_time_us is not None
        step = await store.purge_done_batches(young.end_time_us, max_batches=10, max_requests=100)
        assert step.batch_ids == ["purged"]
        assert _delivery_count(tmp_path, "purged") == 0 and _delivery_count(tmp_path, "young") == 2
        # An enqueue that comes after the delete (it runs in the background
        # once the batch is done) stores nothing.
        assert await store.add_webhook_deliveries(deliveries("deleted")) == 0
        assert _delivery_count(tmp_path, "deleted") == 0
        assert await store.delete_orphan_webhook_deliveries(100) == 0
    finally:
        await store.close()
