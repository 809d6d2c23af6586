from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable

import grpc
import pytest
from google.longrunning import operations_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from longbatch.client import errors
from longbatch.client.operation import MAX_WAIT_S, BatchOperation, backoff
from longbatch.v1 import batch_pb2

NAME = "batches/abc"


def make_op(
    state: int = batch_pb2.BATCH_STATE_RUNNING,
    *,
    done_count: int = 0,
    total: int = 10,
    embed: bool = False,
    output: batch_pb2.GenerateContentBatchOutput | batch_pb2.EmbedContentBatchOutput | None = None,
    error: status_pb2.Status | None = None,
) -> operations_pb2.Operation:
    batch_cls = batch_pb2.EmbedContentBatch if embed else batch_pb2.GenerateContentBatch
    batch = batch_cls(name=NAME, model="models/echo", state=state)
    batch.batch_stats.request_count = total
    batch.batch_stats.successful_request_count = done_count
    batch.batch_stats.pending_request_count = total - done_count
    op = operations_pb2.Operation(name=NAME)
    op.metadata.Pack(batch)
    if output is not None:
        op.done = True
        op.response.Pack(output)
    if error is not None:
        op.done = True
        op.error.CopyFrom(error)
    return op


def succeeded() -> operations_pb2.Operation:
    output = batch_pb2.GenerateContentBatchOutput()
    output.inlined_responses.inlined_responses.add().response.model_version = "echo-1"
    return make_op(batch_pb2.BATCH_STATE_SUCCEEDED, done_count=10, output=output)


class FakeServer:
    """Answers get/wait with a scripted sequence of operations (or exceptions)."""

    def __init__(self, answers: Iterable[operations_pb2.Operation | Exception], wait_sleeps: bool = False) -> None:
        self.answers = iter(answers)
        self.wait_sleeps = wait_sleeps
        self.waits: list[float] = []
        self.gets = 0
        self.cancels = 0

    def _next(self) -> operations_pb2.Operation:
        answer = next(self.answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def refresh(self) -> operations_pb2.Operation:
        self.gets += 1
        return self._next()

    async def wait(self, timeout_s: float) -> operations_pb2.Operation:
        self.waits.append(timeout_s)
        if self.wait_sleeps:
            await asyncio.sleep(timeout_s)
        return self._next()

    async def cancel(self) -> None:
        self.cancels += 1

    def handle(self, first: operations_pb2.Operation, *, with_wait: bool = True) -> BatchOperation:
        return BatchOperation(first, refresh=self.refresh, wait=self.wait if with_wait else None, cancel=self.cancel)


def test_properties_decode_the_metadata() -> None:
    op = FakeServer([]).handle(make_op(done_count=3))
    assert (op.name, op.done, op.kind, op.state) == (NAME, False, "generate", batch_pb2.BATCH_STATE_RUNNING)
    assert isinstance(op.metadata, batch_pb2.GenerateContentBatch)
    assert op.stats is not None and op.stats.successful_request_count == 3
    embed = FakeServer([]).handle(make_op(embed=True))
    assert embed.kind == "embed"
    assert isinstance(embed.stats, batch_pb2.EmbedContentBatchStats)


def test_unknown_metadata_is_none() -> None:
    op = FakeServer([]).handle(operations_pb2.Operation(name=NAME))
    assert (op.metadata, op.stats, op.kind, op.state) == (None, None, "", batch_pb2.BATCH_STATE_UNSPECIFIED)


async def test_result_waits_then_returns_the_output() -> None:
    server = FakeServer([make_op(done_count=5), succeeded()])
    op = server.handle(make_op(batch_pb2.BATCH_STATE_PENDING))
    output = await op.result()
    assert isinstance(output, batch_pb2.GenerateContentBatchOutput)
    assert output.inlined_responses.inlined_responses[0].response.model_version == "echo-1"
    assert server.waits == [MAX_WAIT_S, MAX_WAIT_S]
    assert op.done and op.state == batch_pb2.BATCH_STATE_SUCCEEDED


async def test_result_of_a_done_operation_makes_no_call() -> None:
    server = FakeServer([])
    assert isinstance(await server.handle(succeeded()).result(), batch_pb2.GenerateContentBatchOutput)
    assert server.waits == [] and server.gets == 0


async def test_result_decodes_embed_output() -> None:
    output = batch_pb2.EmbedContentBatchOutput(responses_file="files/out")
    server = FakeServer([make_op(batch_pb2.BATCH_STATE_SUCCEEDED, embed=True, output=output)])
    result = await server.handle(make_op(embed=True)).result()
    assert result == output


@pytest.mark.parametrize(
    ("state", "code", "grpc_code"),
    [
        (batch_pb2.BATCH_STATE_FAILED, code_pb2.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT),
        (batch_pb2.BATCH_STATE_CANCELLED, code_pb2.CANCELLED, grpc.StatusCode.CANCELLED),
        (batch_pb2.BATCH_STATE_EXPIRED, code_pb2.DEADLINE_EXCEEDED, grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
async def test_result_raises_batch_failed(state: int, code: int, grpc_code: grpc.StatusCode) -> None:
    status = status_pb2.Status(code=code, message="it ended")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="BATCH_ENDED", domain="longbatch.dev"))
    server = FakeServer([make_op(state, error=status)])
    with pytest.raises(errors.BatchFailed) as caught:
        await server.handle(make_op()).result()
    assert caught.value.code is grpc_code
    assert caught.value.reason == "BATCH_ENDED"
    assert caught.value.state == state
    assert caught.value.status == status


async def test_result_times_out_without_waiting_past_the_deadline() -> None:
    server = FakeServer(itertools.repeat(make_op()), wait_sleeps=True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await server.handle(make_op()).result(timeout=0.1)
    assert loop.time() - started < 1.0
    assert server.waits and all(0 <= w <= 0.1 for w in server.waits)


async def test_result_with_zero_timeout_raises_at_once() -> None:
    server = FakeServer([])
    with pytest.raises(TimeoutError):
        await server.handle(make_op()).result(timeout=0)
    assert server.waits == []


async def test_result_polls_when_the_server_has_no_wait() -> None:
    server = FakeServer([errors.Unimplemented("no WaitOperation"), make_op(), succeeded()])
    op = server.handle(make_op())
    await op.result(timeout=10)
    assert len(server.waits) == 1  # tried once, then polled
    assert server.gets == 2


async def test_result_rides_out_a_transient_error() -> None:
    server = FakeServer([errors.Unavailable("restarting"), succeeded()])
    assert await server.handle(make_op()).result(timeout=10)
    assert len(server.waits) == 2


async def test_result_raises_other_errors() -> None:
    server = FakeServer([errors.NotFound("gone")])
    with pytest.raises(errors.NotFound):
        await server.handle(make_op()).result()


async def test_done_without_result_is_internal() -> None:
    broken = make_op()
    broken.done = True
    with pytest.raises(errors.Internal):
        await FakeServer([]).handle(broken).result()


async def test_watch_yields_until_done() -> None:
    answers = [make_op(batch_pb2.BATCH_STATE_PENDING), make_op(done_count=4), make_op(done_count=8), succeeded()]
    server = FakeServer(answers)
    op = server.handle(make_op(batch_pb2.BATCH_STATE_PENDING))
    seen = [(batch.state, batch.batch_stats.successful_request_count) async for batch in op.watch(interval=0.05)]
    assert seen == [
        (batch_pb2.BATCH_STATE_PENDING, 0),
        (batch_pb2.BATCH_STATE_RUNNING, 4),
        (batch_pb2.BATCH_STATE_RUNNING, 8),
        (batch_pb2.BATCH_STATE_SUCCEEDED, 10),
    ]
    assert server.gets == 1  # the first refresh; then waits
    assert all(w <= 0.05 for w in server.waits)


async def test_watch_polls_without_wait() -> None:
    server = FakeServer([make_op(done_count=1), succeeded()])
    op = server.handle(make_op(), with_wait=False)
    states = [batch.state async for batch in op.watch(interval=0.01)]
    assert states == [batch_pb2.BATCH_STATE_RUNNING, batch_pb2.BATCH_STATE_SUCCEEDED]
    assert server.gets == 2


async def test_refresh_and_cancel() -> None:
    server = FakeServer([succeeded()])
    op = server.handle(make_op())
    assert await op.refresh() is op
    assert op.done
    await op.cancel()
    assert server.cancels == 1


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    delays = list(itertools.islice(backoff(start=0.2, cap=2.0), 30))
    assert 0.1 <= delays[0] <= 0.2
    assert all(0 < d <= 2.0 for d in delays)
    assert all(d >= 1.0 for d in delays[10:])  # reached the cap (jitter keeps at least half)
