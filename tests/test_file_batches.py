"""File-based batches: JSONL input, validation, responses files (API.md sections 5, 6, 8)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest
from google.longrunning import operations_pb2

from longbatch.server.config import ApiKey, ServerConfig
from longbatch.v1 import batch_pb2, file_pb2, file_pb2_grpc

from support import Stubs, details, metadata_of, wait_done

FAILED = batch_pb2.BatchState.BATCH_STATE_FAILED
SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED


def generate_lines(n: int) -> list[bytes]:
    return [json.dumps({"key": f"k{i}", "request": {"contents": [{"parts": [{"text": f"line {i}"}]}]}}).encode()
            for i in range(n)]


def embed_lines(n: int) -> list[bytes]:
    return [json.dumps({"key": f"e{i}", "request": {"content": {"parts": [{"text": f"doc {i}"}]},
                                                     "outputDimensionality": 8}}).encode() for i in range(n)]


async def upload(channel: grpc.aio.Channel, data: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    async def chunks() -> AsyncIterator[file_pb2.CreateFileRequest]:
        yield file_pb2.CreateFileRequest(file=file_pb2.File(display_name="input.jsonl"))
        for start in range(0, len(data), 256 << 10):
            yield file_pb2.CreateFileRequest(data=data[start:start + (256 << 10)])

    created = await file_pb2_grpc.FileServiceStub(channel).CreateFile(chunks(), metadata=metadata)
    return str(created.name)


async def download(channel: grpc.aio.Channel, name: str) -> bytes:
    stub = file_pb2_grpc.FileServiceStub(channel)
    return b"".join([c.data async for c in stub.DownloadFile(file_pb2.DownloadFileRequest(name=name))])


def file_batch(file_name: str, model: str = "models/echo") -> batch_pb2.BatchGenerateContentRequest:
    return batch_pb2.BatchGenerateContentRequest(batch=batch_pb2.GenerateContentBatch(
        model=model, input_config=batch_pb2.InputConfig(file_name=file_name)))


@pytest.mark.timeout(120)
async def test_generate_file_batch_of_10000(stubs: Stubs) -> None:
    name = await upload(stubs.channel, b"\n".join(generate_lines(10_000)) + b"\n")
    op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(file_batch(name))).name, within=90)
    meta = metadata_of(op)
    assert meta.state == SUCCEEDED and meta.batch_stats.successful_request_count == 10_000
    assert meta.input_config.file_name == name
    output = batch_pb2.GenerateContentBatchOutput()
    op.response.Unpack(output)
    assert output.WhichOneof("output") == "responses_file"
    lines = (await download(stubs.channel, output.responses_file)).splitlines()
    assert len(lines) == 10_000
    for i, line in enumerate(lines):
        row = json.loads(line)
        assert row["key"] == f"k{i}"
        assert row["response"]["candidates"][0]["content"]["parts"][0]["text"] == f"line {i}"


@pytest.mark.timeout(120)
async def test_embed_file_batch_of_10000(stubs: Stubs) -> None:
    name = await upload(stubs.channel, b"\n".join(embed_lines(10_000)))
    req = batch_pb2.AsyncBatchEmbedContentRequest(batch=batch_pb2.EmbedContentBatch(
        model="models/echo", input_config=batch_pb2.InputEmbedContentConfig(file_name=name)))
    op = await wait_done(stubs, (await stubs.batches.AsyncBatchEmbedContent(req)).name, within=90)
    output = batch_pb2.EmbedContentBatchOutput()
    op.response.Unpack(output)
    lines = (await download(stubs.channel, output.responses_file)).splitlines()
    assert [json.loads(x)["key"] for x in lines] == [f"e{i}" for i in range(10_000)]
    assert len(json.loads(lines[0])["response"]["embedding"]["values"]) == 8


async def test_crlf_blank_lines_and_both_field_spellings(stubs: Stubs) -> None:
    data = (b'{"request": {"contents": [{"parts": [{"text": "a"}]}], "generationConfig": {"maxOutputTokens": 5}}}\r\n'
            b"\r\n"
            b'   \n'
            b'{"key": "b", "request": {"contents": [{"parts": [{"text": "b"}]}], '
            b'"generation_config": {"max_output_tokens": 5}, "system_instruction": {"parts": [{"text": "s"}]}}}\n')
    created = await stubs.batches.BatchGenerateContent(file_batch(await upload(stubs.channel, data)))
    op = await wait_done(stubs, created.name)
    output = batch_pb2.GenerateContentBatchOutput()
    op.response.Unpack(output)
    rows = [json.loads(x) for x in (await download(stubs.channel, output.responses_file)).splitlines()]
    assert [r["key"] for r in rows] == ["0", "b"]  # a missing key defaults to the request's index


async def test_bad_lines_fail_the_batch_before_anything_runs(stubs: Stubs) -> None:
    lines = generate_lines(1000)
    lines[9] = b'{"request": {"contents": []}}'  # line 10: empty contents
    lines[499] = b'{"request": {"contents": [{"parts": [{"txt": "typo"}]}]}}'  # line 500: unknown field
    lines[899] = b"not json"  # line 900
    name = await upload(stubs.channel, b"\n".join(lines))
    op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(file_batch(name))).name)
    meta = metadata_of(op)
    assert meta.state == FAILED and op.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not op.HasField("response")
    assert meta.batch_stats.request_count == 0 and meta.batch_stats.successful_request_count == 0
    assert "line 10" in op.error.message
    from google.rpc import error_details_pb2

    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in op.error.details if d.Is(bad.DESCRIPTOR))
    numbers = [v.description.split(":")[0] for v in bad.field_violations]
    assert numbers == ["line 10", "line 500", "line 900"]
    assert all(v.field == "batch.input_config.file_name" for v in bad.field_violations)
    results = [r async for r in stubs.batches.StreamBatchResults(batch_pb2.StreamBatchResultsRequest(name=op.name))]
    assert results == []


@pytest.mark.parametrize("content, reason", [
    (b"\n\n\r\n", "EMPTY_INPUT_FILE"),
    (b"name,age\nbob,42\n", "INVALID_INPUT_FILE"),
    (b'[{"request": {}}]', "INVALID_INPUT_FILE"),
    (b'{"request": {"contents": [{"parts": [{"text": "x"}]}], "model": "models/echo-slow"}}', "INVALID_INPUT_FILE"),
    (b'{"request": {"contents": [{"parts": [{"text": "\xff\xfe"}]}]}}', "INVALID_INPUT_FILE"),
])
async def test_unusable_files_fail_with_invalid_argument(stubs: Stubs, content: bytes, reason: str) -> None:
    op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(
        file_batch(await upload(stubs.channel, content)))).name)
    assert metadata_of(op).state == FAILED
    assert op.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    from google.rpc import error_details_pb2

    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in op.error.details if d.Is(info.DESCRIPTOR))
    assert info.reason == reason and info.domain == "longbatch.dev"


async def test_missing_or_foreign_file_is_not_found(make_server) -> None:  # type: ignore[no-untyped-def]
    handle = await make_server(ServerConfig(api_keys=(ApiKey("k-a", "a"), ApiKey("k-b", "b"))))
    stubs = Stubs.connect(handle.target)
    try:
        a, b = (("x-goog-api-key", "k-a"),), (("x-goog-api-key", "k-b"),)
        name = await upload(stubs.channel, b"\n".join(generate_lines(3)), metadata=a)
        for missing in ("files/doesnotexist", name):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stubs.batches.BatchGenerateContent(file_batch(missing), metadata=b)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert details(e.value).reason == "FILE_NOT_FOUND"
        op = await stubs.batches.BatchGenerateContent(file_batch(name), metadata=a)
        assert op.name.startswith("batches/")
    finally:
        await stubs.channel.close()


async def test_deleting_a_file_in_use_is_refused(stubs: Stubs) -> None:
    name = await upload(stubs.channel, b"\n".join(generate_lines(2000)))
    op = await stubs.batches.BatchGenerateContent(file_batch(name, model="models/echo-slow"))
    files = file_pb2_grpc.FileServiceStub(stubs.channel)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await files.DeleteFile(file_pb2.DeleteFileRequest(name=name))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(e.value).reason == "FILE_IN_USE"
    await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
    await wait_done(stubs, op.name)
    await files.DeleteFile(file_pb2.DeleteFileRequest(name=name))


@pytest.mark.timeout(120)
async def test_worker_process_ingest_keeps_order_and_line_numbers(
    stubs: Stubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    from longbatch.server import ingest

    # Many small ranges, all parsed by the worker processes.
    monkeypatch.setattr(ingest, "SMALL_FILE_BYTES", 0)
    monkeypatch.setattr(ingest, "RANGE_BYTES", 16 << 10)
    good = b"\n\n".join(generate_lines(3000))  # blank lines between requests shift line numbers
    op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(
        file_batch(await upload(stubs.channel, good)))).name, within=90)
    output = batch_pb2.GenerateContentBatchOutput()
    op.response.Unpack(output)
    keys = [json.loads(x)["key"] for x in (await download(stubs.channel, output.responses_file)).splitlines()]
    assert keys == [f"k{i}" for i in range(3000)]

    lines = generate_lines(3000)
    lines[2500] = b'{"request": {"contents": [{"parts": [{}]}]}}'
    op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(
        file_batch(await upload(stubs.channel, b"\n\n".join(lines))))).name, within=90)
    assert metadata_of(op).state == FAILED
    assert "line 5001:" in op.error.message  # request 2501 sits on physical line 5001
