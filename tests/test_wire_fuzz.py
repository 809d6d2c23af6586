"""Malformed request bytes on the wire: every RPC answers INVALID_ARGUMENT with
details (never UNKNOWN, INTERNAL or a traceback) and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longbatch.server.wire import length_delimited

from support import Stubs, details, generate_batch, wait_done

UNARY = [
    "/longbatch.v1.BatchService/BatchGenerateContent",
    "/longbatch.v1.BatchService/AsyncBatchEmbedContent",
    "/longbatch.v1.BatchService/UpdateGenerateContentBatch",
    "/longbatch.v1.BatchService/UpdateEmbedContentBatch",
    "/longbatch.v1.FileService/GetFile",
    "/longbatch.v1.FileService/ListFiles",
    "/longbatch.v1.FileService/DeleteFile",
    "/longbatch.v1.ModelService/ListModels",
    "/longbatch.v1.ModelService/GetModel",
    "/google.longrunning.Operations/GetOperation",
    "/google.longrunning.Operations/ListOperations",
    "/google.longrunning.Operations/CancelOperation",
    "/google.longrunning.Operations/DeleteOperation",
    "/google.longrunning.Operations/WaitOperation",
]
SERVER_STREAMING = ["/longbatch.v1.BatchService/StreamBatchResults", "/longbatch.v1.FileService/DownloadFile"]
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED}


def _raw(b: bytes) -> bytes:
    return b


def deep_struct(levels: int) -> bytes:
    """A google.protobuf.Struct nested ``levels`` deep, built on the wire."""
    inner = b""
    for _ in range(levels):
        inner = length_delimited(5, length_delimited(1, length_delimited(1, b"k") + length_delimited(2, inner)))
    return length_delimited(1, length_delimited(1, b"k") + length_delimited(2, inner))


async def call(stubs: Stubs, method: str, payload: bytes) -> grpc.StatusCode:
    try:
        if method in SERVER_STREAMING:
            stream = stubs.channel.unary_stream(method, request_serializer=_raw, response_deserializer=_raw)
            async for _ in stream(payload, timeout=10):
                pass
        else:
            await stubs.channel.unary_unary(method, request_serializer=_raw, response_deserializer=_raw)(
                payload, timeout=10)
    except grpc.aio.AioRpcError as e:
        details(e)  # status details present and identical to the status
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", UNARY + SERVER_STREAMING)
async def test_corrupt_and_too_deep_messages_are_invalid_argument(stubs: Stubs, method: str) -> None:
    assert await call(stubs, method, b"\xff\xff\xff\xff\x0f") == grpc.StatusCode.INVALID_ARGUMENT
    # Field 1 holding a Struct nested past protobuf's depth limit (100). Where
    # field 1 is a number (page_size) the bytes are an unknown field, which
    # protobuf keeps without descending into, so the request is fine.
    code = await call(stubs, method, length_delimited(1, deep_struct(120)))
    if method.endswith(("/ListFiles", "/ListModels")):
        assert code == grpc.StatusCode.OK
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_corrupt_upload_chunk_is_invalid_argument(stubs: Stubs) -> None:
    async def messages():  # type: ignore[no-untyped-def]
        yield length_delimited(1, b"")  # a valid first message: empty File metadata
        yield b"\xff\xff\xff"

    create = stubs.channel.stream_unary("/longbatch.v1.FileService/CreateFile", request_serializer=_raw,
                                        response_deserializer=_raw)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(messages(), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(e.value).reason == "MALFORMED_REQUEST"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(UNARY + SERVER_STREAMING), payload=st.binary(max_size=200))
async def test_random_bytes_never_unknown_or_internal(stubs: Stubs, method: str, payload: bytes) -> None:
    assert await call(stubs, method, payload) in ALLOWED


async def test_server_still_serves_after_garbage(stubs: Stubs) -> None:
    for method in UNARY:
        await call(stubs, method, b"\x0a\xff\xff\xff\xff\x0f")
    op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(generate_batch(5))).name)
    assert op.done and op.HasField("response")
