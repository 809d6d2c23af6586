"""Outages and overload of a model's backend (docs/execution.md).

A real longbatch server runs batches against tests/fakemodel.py over HTTP on
127.0.0.1. The fake goes down (its listening socket closed, so connections
are refused) and comes back on the same port, or answers 429 beyond a number
of calls in flight; the tests measure what the executor does about it: a
paused model that loses no request, items that fail only after
``outage_timeout``, an in-flight count that backs off and recovers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from conftest import MakeServer, ServerHandle
from fakemodel import FakeModel, FaultPlan
from google.longrunning import operations_pb2
from google.rpc import code_pb2

from longbatch.server.admission import ModelGate
from longbatch.server.config import ConfigError, ExecutorSettings, ModelConfig, ServerConfig, config_from_dict
from longbatch.v1 import batch_pb2

from support import Stubs, generate_batch, metadata_of, wait_done

MODEL = "models/remote"
CONCURRENCY = 8
RUNNING = batch_pb2.BatchState.BATCH_STATE_RUNNING
SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED
LOGGER = "longbatch.executor"


class Remote:
    """A longbatch server whose models/remote calls the fake, and its stubs."""

    def __init__(self, handle: ServerHandle, stubs: Stubs) -> None:
        self.handle = handle
        self.stubs = stubs

    @property
    def gate(self) -> ModelGate:
        return self.handle.running.executor.gate(MODEL)

    async def submit(self, n: int) -> str:
        op = await self.stubs.batches.BatchGenerateContent(generate_batch(n, model=MODEL))
        return op.name

    async def get(self, name: str) -> operations_pb2.Operation:
        return await self.stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=5)


Start = Callable[..., Awaitable[Remote]]



@pytest.fixture
async def remote(make_server: MakeServer, fake: FakeModel) -> AsyncIterator[Start]:
    channels: list[Stubs] = []

    async def start(concurrency: int = CONCURRENCY, data_dir: object = None, **settings: object) -> Remote:
        model = ModelConfig(name=MODEL, backend="gemini-http", max_concurrency=concurrency,
                            options={"base_url": fake.url})
        # Short waits everywhere: every test is over in seconds.
        executor = ExecutorSettings(**{  # type: ignore[arg-type]
            "max_attempts": 5, "backoff_initial_s": 0.01, "backoff_max_s": 0.05, "request_timeout_s": 2.0,
            "outage_timeout_s": 30.0, "probe_initial_s": 0.1, "probe_max_s": 0.3, **settings})
        handle = await make_server(ServerConfig(models=(model,), executor=executor), data_dir)
        stubs = Stubs.connect(handle.target)
        channels.append(stubs)
        return Remote(handle, stubs)

    yield start
    for stubs in channels:
        await stubs.channel.close(None)


async def until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.01)


def results(op: operations_pb2.Operation) -> list[batch_pb2.InlinedResponse]:
    output = batch_pb2.GenerateContentBatchOutput()
    assert op.response.Unpack(output)
    return list(output.inlined_responses.inlined_responses)


def messages(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and fragment in r.getMessage()]


async def test_a_backend_down_for_five_seconds_pauses_the_batch_and_loses_nothing(
        fake: FakeModel, remote: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake.plan = FaultPlan(latency_s=0.01)
    server = await remote()
    n = 600
    name = await server.submit(n)
    await until(lambda: fake.stats.total >= n // 4, 20, "a quarter of the batch answered")
    down_at = time.monotonic()
    await fake.go_down(5.0)
    # While it is down: the batch waits, says why, and GetOperation answers.
    await until(lambda: server.gate.paused, 5, "the model paused")
    polls = 0
    while not fake.up:
        started = time.monotonic()
        op = await server.get(name)
        assert time.monotonic() - started < 1.0
        meta = metadata_of(op)
        if time.monotonic() - down_at < 4.5:
            assert not op.done and meta.state == RUNNING
            assert meta.waiting_reason.startswith(f"the backend of {MODEL} is unreachable since "), meta
            assert "model server unreachable" in meta.waiting_reason
            # Nothing fails for the outage: the requests wait, unspent.
            assert meta.batch_stats.failed_request_count == 0
            polls += 1
        await asyncio.sleep(0.1)
    assert polls >= 20
    # ListOperations shows it too.
    page = await server.stubs.ops.ListOperations(operations_pb2.ListOperationsRequest(name="batches"))
    assert page.operations[0].name == name
    op = await wait_done(server.stubs, name, within=20)
    meta = metadata_of(op)
    assert meta.state == SUCCEEDED and meta.waiting_reason == ""
    s = meta.batch_stats
    assert (s.request_count, s.successful_request_count, s.failed_request_count) == (n, n, 0)
    for i, r in enumerate(results(op)):
        assert r.WhichOneof("output") == "response", (i, r.error)
        assert r.response.candidates[0].content.parts[0].text == f"prompt {i}"
    assert set(fake.stats.calls) == {f"prompt {i}" for i in range(n)}
    # The logs: one line when the pause began, with the reason, one when it
    # ended, with its duration; none per request.
    paused, resumed = messages(caplog, "dispatch paused"), messages(caplog, "dispatch resumed")
    assert len(paused) == 1 and "model server unreachable" in paused[0], paused
    assert len(resumed) == 1, resumed
    lasted = float(resumed[0].split(" after ")[1].split("s ")[0])
    assert 4.5 <= lasted <= 7.0, resumed
    executor_lines = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(executor_lines) <= 3, [r.getMessage() for r in executor_lines]
    assert server.gate.waiting_reason == "" and server.gate.limit == CONCURRENCY


async def test_a_backend_down_past_outage_timeout_fails_the_waiting_requests(
        fake: FakeModel, remote: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake.plan = FaultPlan(latency_s=0.01)
    server = await remote(outage_timeout_s=1.0)
    n = 300
    name = await server.submit(n)
    await until(lambda: fake.stats.total >= 50, 20, "some answers")
    down_at = time.monotonic()
    await fake.go_down()
    op = await wait_done(server.stubs, name, within=20)
    assert time.monotonic() - down_at >= 1.0  # no request failed before outage_timeout
    meta = metadata_of(op)
    s = meta.batch_stats
    assert meta.state == SUCCEEDED and meta.waiting_reason == ""
    assert s.request_count == n == s.successful_request_count + s.failed_request_count
    assert s.failed_request_count > 0
    answered = set(fake.stats.calls)
    for i, r in enumerate(results(op)):
        assert r.metadata["i"] == i
        if r.WhichOneof("output") == "response":
            assert r.response.candidates[0].content.parts[0].text == f"prompt {i}"
            assert f"prompt {i}" in answered
        else:
            assert r.error.code == code_pb2.UNAVAILABLE, r.error
            assert r.error.message.startswith("model server unreachable"), r.error.message
            assert "longer than outage_timeout 1s" in r.error.message
    assert len(messages(caplog, "dispatch paused")) == 1
    assert len(messages(caplog, "after outage_timeout")) == 1
    # It comes back: probing went on, and once the next probe is due (at
    # most probe_max after the last one failed) the next batch runs as usual.
    # Before then a newcomer would give up at once, past outage_timeout, so
    # wait for that timer rather than a time meant to outlast it.
    await fake.come_back()
    await until(lambda: server.gate._probe_ready or not server.gate.paused, 5, "the next probe due")
    name = await server.submit(20)
    op = await wait_done(server.stubs, name, within=10)
    assert metadata_of(op).batch_stats.successful_request_count == 20
    assert not server.gate.paused
    assert len(messages(caplog, "dispatch resumed")) == 1


async def test_a_429_storm_lowers_the_in_flight_count_and_it_recovers(
        fake: FakeModel, remote: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    concurrency, allowed = 16, 3
    fake.plan = FaultPlan(latency_s=0.02, max_in_flight=allowed)
    server = await remote(concurrency, max_attempts=20)
    gate = server.gate
    name = await server.submit(200)
    limits: list[int] = []
    in_flight: list[int] = []

    async def sample() -> None:
        while True:
            limits.append(gate.limit)
            in_flight.append(gate.in_flight)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        await until(lambda: fake.stats.total >= 60, 20, "the storm under way")
        limits.clear()
        in_flight.clear()
        calls, overloaded = fake.stats.total, fake.stats.overloaded
        op = await wait_done(server.stubs, name, within=30)
        storm_limits, storm_in_flight = list(limits), list(in_flight)
        calls, overloaded = fake.stats.total - calls, fake.stats.overloaded - overloaded
        assert metadata_of(op).batch_stats.successful_request_count == 200
        # The storm: the limit and the calls in flight fell far below
        # max_concurrency, to about what the backend allows...
        assert max(storm_limits) <= 2 * allowed, storm_limits
        assert max(storm_in_flight) <= 2 * allowed, storm_in_flight
        # ... so most calls were answered; at 16 in flight 13 of 16 would be 429s.
        assert overloaded < calls / 2, (overloaded, calls)
        # AIMD, not a collapse to one call at a time.
        assert sum(storm_limits) / len(storm_limits) >= 1.5, storm_limits
        # The storm ends: the limit grows back by one per window of answers.
        fake.plan = FaultPlan(latency_s=0.02)
        limits.clear()
        name = await server.submit(500)
        await until(lambda: gate.limit == concurrency, 20, "the limit back at max_concurrency")
        fake.reset_peak()
        op = await wait_done(server.stubs, name, within=30)
        assert metadata_of(op).batch_stats.successful_request_count == 500
        assert fake.stats.max_in_flight == concurrency
        assert gate.limit == concurrency
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    # Sparse logs: the first cut and the recovery, not one line per change.
    assert 1 <= len(messages(caplog, "in-flight limit")) <= 3, messages(caplog, "in-flight limit")
    assert messages(caplog, "back to 16")
    assert not messages(caplog, "dispatch paused")


async def test_retryable_errors_that_are_not_outages_still_spend_attempts(
        fake: FakeModel, remote: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake.plan = FaultPlan(rate=1.0, faults=("500",))
    server = await remote()
    n = 10
    op = await wait_done(server.stubs, await server.submit(n), within=20)
    for r in results(op):
        assert r.WhichOneof("output") == "error" and r.error.code != code_pb2.OK
        assert "HTTP 500" in r.error.message
    assert fake.stats.calls == {f"prompt {i}": 5 for i in range(n)}  # max_attempts calls each
    assert not messages(caplog, "dispatch paused") and not server.gate.paused


async def test_a_server_stopped_during_an_outage_resumes_the_batch_after_restart(
        fake: FakeModel, remote: Start, make_server: MakeServer) -> None:
    fake.plan = FaultPlan(latency_s=0.01)
    server = await remote()
    n = 200
    name = await server.submit(n)
    await until(lambda: fake.stats.total >= 40, 20, "some answers")
    await fake.go_down()
    await until(lambda: server.gate.paused, 5, "the model paused")
    before = metadata_of(await server.get(name)).batch_stats
    assert before.failed_request_count == 0
    started = time.monotonic()
    await server.handle.running.stop(grace_s=1.0)
    assert time.monotonic() - started < 3.0  # waiting requests do not hold the shutdown
    await fake.come_back()
    again = await remote(data_dir=server.handle.data_dir)
    op = await wait_done(again.stubs, name, within=20)
    s = metadata_of(op).batch_stats
    assert (s.successful_request_count, s.failed_request_count) == (n, 0)
    assert [r.response.candidates[0].content.parts[0].text for r in results(op)] == [f"prompt {i}" for i in range(n)]


def test_executor_keys_in_the_config() -> None:
    defaults = ExecutorSettings()
    assert (defaults.max_attempts, defaults.outage_timeout_s, defaults.probe_initial_s, defaults.probe_max_s) == (
        5, 600.0, 0.5, 30.0)
    config = config_from_dict({"executor": {"outage_timeout": "2m", "probe_initial": "250ms", "probe_max": "5s",
                                            "max_attempts": 3}})
    assert (config.executor.outage_timeout_s, config.executor.probe_initial_s, config.executor.probe_max_s,
            config.executor.max_attempts) == (120.0, 0.25, 5.0, 3)
    for bad, fragment in (({"probe_initial": "0s"}, "must be positive"), ({"max_attempts": 0}, "at least 1"),
                          ({"outage_timeout": "soon"}, "executor.outage_timeout"), ({"outage": "1m"}, "unknown key")):
        with pytest.raises(ConfigError, match=fragment):
            config_from_dict({"executor": bad})
