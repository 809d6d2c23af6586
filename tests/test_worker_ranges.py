"""Large generate batches on echo run in worker processes, by ranges of requests
that each process reads, answers and commits itself (server/executor.py)."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
from typing import Any

import pytest
from google.longrunning import operations_pb2

from longbatch.server.backends.echo import EchoBackend
from longbatch.server.executor import _PORTABLE_MIN, Executor
from longbatch.server.sqlite_store import SQLiteStore
from longbatch.v1 import batch_pb2

import support
from support import Stubs, generate_batch, metadata_of, wait_done

SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED
CANCELLED = batch_pb2.BatchState.BATCH_STATE_CANCELLED
N = _PORTABLE_MIN + 808  # just over the size that goes to worker processes


async def streamed(stubs: Stubs, name: str) -> list[batch_pb2.StreamBatchResultsResponse]:
    request = batch_pb2.StreamBatchResultsRequest(name=name)
    return [r async for r in stubs.batches.StreamBatchResults(request)]


def assert_echoed(results: list[batch_pb2.StreamBatchResultsResponse]) -> None:
    for r in results:
        if r.HasField("generate_content_response"):
            assert r.generate_content_response.candidates[0].content.parts[0].text == f"prompt {r.index}"


async def first_results(stubs: Stubs, get: operations_pb2.GetOperationRequest) -> None:
    """Until (at most 15 s) the batch has results: ranges are now in flight."""

    async def some() -> int:
        return metadata_of(await stubs.ops.GetOperation(get)).batch_stats.successful_request_count

    await support.eventually(some, within=15, what="the first results")


def count_calls(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[int]:
    calls = [0]
    real = getattr(cls, name)

    async def counted(*args: Any) -> Any:
        calls[0] += 1
        return await real(*args)

    monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.mark.timeout(60)
async def test_a_large_generate_batch_is_answered_in_worker_processes(
    make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    single, bulk = count_calls(monkeypatch, Executor, "_execute"), count_calls(monkeypatch, Executor, "_execute_bulk")
    stubs = Stubs.connect((await make_server()).target)
    try:
        op = await stubs.batches.BatchGenerateContent(generate_batch(N), timeout=30)
        stats = metadata_of(await wait_done(stubs, op.name, within=45)).batch_stats
        assert (stats.successful_request_count, stats.failed_request_count) == (N, 0)
        assert single == bulk == [0]  # nothing answered in the server process
        results = await streamed(stubs, op.name)
        assert [r.index for r in results] == list(range(N))
        assert all(r.HasField("generate_content_response") for r in results)
        assert_echoed(results)

        # A small batch is answered here: starting a process would cost more.
        small = await stubs.batches.BatchGenerateContent(generate_batch(10), timeout=10)
        await wait_done(stubs, small.name, within=10)
        assert single[0] + bulk[0] > 0
    finally:
        await stubs.channel.close()


@pytest.mark.timeout(60)
async def test_cancel_while_worker_processes_run_ranges_counts_each_result_once(
    make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 0.2 s per range keeps ranges in flight in the workers when the cancel lands;
    # those that commit after it must be refused, not stored or counted.
    monkeypatch.setattr(EchoBackend, "portable_generate", lambda self: functools.partial(support.slow_echo, 0.2))
    srv = await make_server()
    # Each range handed to a worker process is one call, returning once the
    # process has answered and tried to commit it.
    ranges = support.Calls(srv.running.executor, "_execute_range")
    stubs = Stubs.connect(srv.target)
    try:
        op = await stubs.batches.BatchGenerateContent(generate_batch(N), timeout=30)
        get = operations_pb2.GetOperationRequest(name=op.name)
        await first_results(stubs, get)
        await support.eventually(lambda: ranges.active, within=5, what="ranges in flight")
        await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
        done = await wait_done(stubs, op.name, within=10)
        meta = metadata_of(done)
        stats = meta.batch_stats
        assert meta.state == CANCELLED
        assert 0 < stats.successful_request_count < N
        assert stats.successful_request_count + stats.cancelled_request_count == N

        # Every range still in a worker at the cancel has tried to commit by now.
        await support.eventually(lambda: ranges.active == 0, within=10, what="the ranges in flight ended")
        assert metadata_of(await stubs.ops.GetOperation(get)).batch_stats == stats
        results = await streamed(stubs, op.name)
        assert [r.index for r in results] == list(range(N))
        answered = [r for r in results if r.HasField("generate_content_response")]
        assert len(answered) == stats.successful_request_count
        assert all(r.error.code == 1 for r in results if not r.HasField("generate_content_response"))
        assert_echoed(answered)
    finally:
        await stubs.channel.close()


@pytest.mark.parametrize("fault", ["answerer raises", "runner raises in the worker"])
@pytest.mark.timeout(60)
async def test_ranges_a_worker_process_cannot_run_are_run_here(
    make_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    if fault == "answerer raises":
        monkeypatch.setattr(EchoBackend, "portable_generate", lambda self: support.refuse)
    else:
        monkeypatch.setattr(SQLiteStore, "range_runner", lambda self, batch: support.broken_runner)
    here = count_calls(monkeypatch, Executor, "_execute")
    stubs = Stubs.connect((await make_server()).target)
    try:
        with caplog.at_level(logging.ERROR, logger="longbatch.executor"):
            op = await stubs.batches.BatchGenerateContent(generate_batch(N), timeout=30)
            stats = metadata_of(await wait_done(stubs, op.name, within=45)).batch_stats
        assert (stats.successful_request_count, stats.failed_request_count) == (N, 0)
        assert here[0] >= N  # each request was answered here, once at least
        results = await streamed(stubs, op.name)
        assert len(results) == N and all(r.HasField("generate_content_response") for r in results)
        assert_echoed(results)
        in_worker_failed = "in a worker process failed; running it here" in caplog.text
        assert in_worker_failed == (fault == "runner raises in the worker")
    finally:
        await stubs.channel.close()


@pytest.mark.timeout(90)
async def test_a_worker_process_killed_mid_batch_loses_and_repeats_nothing(
    make_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Killed as the kernel's OOM killer would: the pool breaks, the ranges it
    # held run here, and a fresh pool takes the rest.
    monkeypatch.setattr(EchoBackend, "portable_generate", lambda self: functools.partial(support.slow_echo, 0.05))
    stubs = Stubs.connect((await make_server()).target)
    try:
        op = await stubs.batches.BatchGenerateContent(generate_batch(N), timeout=30)
        get = operations_pb2.GetOperationRequest(name=op.name)
        await first_results(stubs, get)
        workers = multiprocessing.active_children()
        assert workers
        os.kill(workers[0].pid, signal.SIGKILL)  # type: ignore[arg-type]
        stats = metadata_of(await wait_done(stubs, op.name, within=60)).batch_stats
        assert (stats.successful_request_count, stats.failed_request_count) == (N, 0)
        results = await streamed(stubs, op.name)
        assert [r.index for r in results] == list(range(N))
        assert all(r.HasField("generate_content_response") for r in results)
        assert_echoed(results)
        assert "in a worker process failed; running it here" in caplog.text
        # The fresh pool works: another large batch runs in worker processes.
        again = await stubs.batches.BatchGenerateContent(generate_batch(N), timeout=30)
        caplog.clear()
        assert metadata_of(await wait_done(stubs, again.name, within=60)).batch_stats.successful_request_count == N
        assert "in a worker process failed" not in caplog.text
    finally:
        await stubs.channel.close()
