"""Outages and overload through the ``openai`` backend, against the fake OpenAI server over real HTTP.

tests/test_outage.py proves the executor's pause and AIMD with the Gemini
fake; these prove the same through the path a vLLM user takes: the h1 pool's
refused connections must read as an outage, and OpenAI-shaped 429s with
``retry-after-ms`` as overload.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from conftest import MakeServer, ServerHandle
from fakeopenai import FakeOpenAI, Fault
from google.longrunning import operations_pb2
from google.rpc import code_pb2

from longbatch.server.config import ExecutorSettings, ModelConfig, ServerConfig
from longbatch.v1 import batch_pb2, content_pb2

from support import Stubs, metadata_of, wait_done

MODEL = "models/smol"
CONCURRENCY = 8
SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    f = FakeOpenAI(latency_s=0.01)
    await f.start()
    yield f
    await f.stop()


async def start(make_server: MakeServer, fake: FakeOpenAI, **settings: object) -> tuple[ServerHandle, Stubs]:
    model = ModelConfig(name=MODEL, backend="openai", max_concurrency=CONCURRENCY,
                        options={"base_url": fake.url, "timeout": "2s", "connect_timeout": "1s"})
    executor = ExecutorSettings(**{  # type: ignore[arg-type]
        "max_attempts": 5, "backoff_initial_s": 0.01, "backoff_max_s": 0.05, "request_timeout_s": 3.0,
        "outage_timeout_s": 30.0, "probe_initial_s": 0.1, "probe_max_s": 0.3, **settings})
    handle = await make_server(ServerConfig(models=(model,), executor=executor))
    return handle, Stubs.connect(handle.target)


def batch(n: int, tag: str) -> batch_pb2.BatchGenerateContentRequest:
    requests = [batch_pb2.InlinedRequest(request=content_pb2.GenerateContentRequest(
        contents=[content_pb2.Content(role="user", parts=[content_pb2.Part(text=f"{tag} {i}")])]))
        for i in range(n)]
    return batch_pb2.BatchGenerateContentRequest(batch=batch_pb2.GenerateContentBatch(
        model=MODEL, input_config=batch_pb2.InputConfig(requests=batch_pb2.InlinedRequests(requests=requests))))


async def until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.01)


async def test_a_restart_of_the_model_server_mid_batch_costs_time_not_results(
        make_server: MakeServer, fake: FakeOpenAI) -> None:
    handle, stubs = await start(make_server, fake)
    gate = handle.running.executor.gate(MODEL)
    try:
        n = 400
        op = await stubs.batches.BatchGenerateContent(batch(n, "q"))
        await until(lambda: fake.stats.chat_calls >= n // 4, 20, "a quarter of the batch answered")
        port = fake.port
        await fake.stop()  # the server goes away: connections are refused
        down_at = time.monotonic()
        await until(lambda: gate.paused, 10, "the model paused")
        meta = metadata_of(await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=5))
        assert meta.state != SUCCEEDED and meta.waiting_reason.startswith(f"the backend of {MODEL}")
        assert meta.batch_stats.failed_request_count == 0
        # Down for 3 s in all (the outage being simulated, not a wait for the code under test).
        await asyncio.sleep(max(0.0, down_at + 3.0 - time.monotonic()))
        meta = metadata_of(await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=5))
        assert meta.batch_stats.failed_request_count == 0 and gate.paused
        await fake.start(port)  # back on the same port, as a restarted vLLM would be
        done = await wait_done(stubs, op.name, within=30)
        meta = metadata_of(done)
        assert meta.state == SUCCEEDED
        assert (meta.batch_stats.successful_request_count, meta.batch_stats.failed_request_count) == (n, 0)
        assert not gate.paused and meta.waiting_reason == ""
    finally:
        await stubs.channel.close()


async def test_openai_429s_with_retry_after_ms_lower_the_in_flight_limit_then_it_recovers(
        make_server: MakeServer, fake: FakeOpenAI) -> None:
    handle, stubs = await start(make_server, fake, max_attempts=10)
    gate = handle.running.executor.gate(MODEL)
    lowest = CONCURRENCY
    try:
        # Every prompt is refused twice, as a rate-limited gateway would.
        fake.fault = Fault(status=429, shape="openai", code="rate_limit_exceeded", retry_after_ms="20", times=2,
                           message="Rate limit reached for requests")
        op = await stubs.batches.BatchGenerateContent(batch(120, "storm"))

        async def watch() -> None:
            nonlocal lowest
            while True:
                lowest = min(lowest, gate.limit)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            done = await wait_done(stubs, op.name, within=30)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        meta = metadata_of(done)
        assert meta.batch_stats.successful_request_count == 120
        assert fake.stats.calls == dict.fromkeys((f"storm {i}" for i in range(120)), 3)
        assert lowest <= CONCURRENCY // 2, lowest  # halved at least once
        # The storm is over: the limit grows back to max_concurrency.
        fake.fault = None
        op = await stubs.batches.BatchGenerateContent(batch(300, "calm"))
        await wait_done(stubs, op.name, within=30)
        assert gate.limit == CONCURRENCY
    finally:
        await stubs.channel.close()


async def test_insufficient_quota_is_not_retried_and_does_not_pause(make_server: MakeServer,
                                                                     fake: FakeOpenAI) -> None:
    handle, stubs = await start(make_server, fake)
    gate = handle.running.executor.gate(MODEL)
    try:
        fake.fault = Fault(status=429, shape="openai", code="insufficient_quota",
                           message="You exceeded your current quota, please check your plan and billing details.")
        op = await stubs.batches.BatchGenerateContent(batch(10, "quota"))
        done = await wait_done(stubs, op.name, within=30)
        results = metadata_of(done).output.inlined_responses.inlined_responses
        assert all(r.error.code == code_pb2.RESOURCE_EXHAUSTED for r in results)
        assert all("exceeded your current quota" in r.error.message for r in results)
        assert fake.stats.calls == dict.fromkeys((f"quota {i}" for i in range(10)), 1)
        assert not gate.paused
    finally:
        await stubs.channel.close()
