"""FileService against the real server (API.md sections 6, 9 and 11)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from conftest import MakeServer, ServerHandle

from longbatch.server.config import ApiKey, Limits, ServerConfig
from longbatch.server.domain import BatchKind, ItemStatus, NewBatch, State
from longbatch.v1 import batch_pb2, file_pb2, file_pb2_grpc

from support import Stubs, details, eventually, generate_batch, wait_done

MiB = 1 << 20
Metadata = Sequence[tuple[str, str]]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def stub(target: str) -> tuple[grpc.aio.Channel, file_pb2_grpc.FileServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(target)
    return channel, file_pb2_grpc.FileServiceStub(channel)


@pytest.fixture
async def files(server: ServerHandle) -> AsyncIterator[file_pb2_grpc.FileServiceAsyncStub]:
    channel, s = stub(server.target)
    yield s
    await channel.close()


def messages(data: bytes, chunk: int = 256 << 10, **meta: str) -> list[file_pb2.CreateFileRequest]:
    out = [file_pb2.CreateFileRequest(file=file_pb2.File(**meta))]  # type: ignore[arg-type]
    out += [file_pb2.CreateFileRequest(data=data[i:i + chunk]) for i in range(0, len(data), chunk)]
    return out


async def stream(items: Sequence[file_pb2.CreateFileRequest]) -> AsyncIterator[file_pb2.CreateFileRequest]:
    for item in items:
        yield item


async def upload(s: file_pb2_grpc.FileServiceAsyncStub, data: bytes, md: Metadata = (), chunk: int = 256 << 10,
                 **meta: str) -> file_pb2.File:
    return await s.CreateFile(stream(messages(data, chunk, **meta)), metadata=md)


async def download(s: file_pb2_grpc.FileServiceAsyncStub, name: str, md: Metadata = ()) -> list[bytes]:
    return [r.data async for r in s.DownloadFile(file_pb2.DownloadFileRequest(name=name), metadata=md)]


async def fails(awaitable: object, code: grpc.StatusCode, reason: str | None = None) -> str:
    """Await a call (or drain a stream) that must fail; return its message."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(awaitable, "__aiter__"):
            async for _ in awaitable:  # type: ignore[attr-defined]
                pass
        else:
            await awaitable  # type: ignore[misc]
    d = details(info.value)
    assert d.code == code, (d.code, d.message)
    if reason is not None:
        assert d.reason == reason, d
    return d.message


def leftovers(data_dir: Path) -> tuple[list[str], list[str]]:
    """Names of stored file bytes and of temporaries."""
    root = data_dir / "files"
    stored = sorted(p.name for p in root.iterdir() if p.is_file())
    temps = sorted(p.name for p in (root / ".tmp").iterdir())
    return stored, temps


async def listed(s: file_pb2_grpc.FileServiceAsyncStub, md: Metadata = ()) -> list[str]:
    return [f.name for f in (await s.ListFiles(file_pb2.ListFilesRequest(page_size=1000), metadata=md)).files]


async def swept_past(files: file_pb2_grpc.FileServiceAsyncStub) -> None:
    """Until an expiry sweep has run past every file made so far: a canary
    uploaded now (it expires after all of them) is deleted by a sweep whose
    cutoff saw each earlier upload expired too. Proves the sweep ran, and
    that it deletes what it should, before a test says what it kept."""
    canary = await upload(files, b"canary")

    async def canary_gone() -> bool:
        try:
            await files.GetFile(file_pb2.GetFileRequest(name=canary.name))
        except grpc.aio.AioRpcError as e:
            assert e.code() == NOT_FOUND
            return True
        return False

    await eventually(canary_gone, within=5, what="an expiry sweep deleted the canary upload")


async def test_upload_get_list_download_round_trip(
    server: ServerHandle, files: file_pb2_grpc.FileServiceAsyncStub
) -> None:
    data = os.urandom(3 * MiB + 12345)
    before = time.time()
    # Odd chunk sizes, so the server's write batches never line up with them.
    f = await upload(files, data, chunk=100_003, display_name="input.jsonl")
    assert f.name.startswith("files/") and len(f.name) > 10
    assert f.size_bytes == len(data)
    assert f.sha256_hash == hashlib.sha256(data).digest()
    assert f.display_name == "input.jsonl" and f.mime_type == "application/jsonl"
    assert f.state == file_pb2.File.State.STATE_ACTIVE
    assert f.source == file_pb2.File.Source.SOURCE_UPLOADED
    created = f.create_time.ToMicroseconds()
    assert before - 1 <= created / 1e6 <= time.time() + 1
    assert f.update_time == f.create_time
    assert f.expiration_time.ToMicroseconds() - created == 48 * 3600 * 1_000_000

    assert await files.GetFile(file_pb2.GetFileRequest(name=f.name)) == f
    assert (await files.ListFiles(file_pb2.ListFilesRequest())).files == [f]
    chunks = await download(files, f.name)
    assert len(chunks) >= 4 and all(0 < len(c) <= MiB for c in chunks)
    assert b"".join(chunks) == data
    stored, temps = leftovers(server.data_dir)
    assert stored == [f.name.removeprefix("files/")] and temps == []


async def test_mime_type_and_output_only_fields(files: file_pb2_grpc.FileServiceAsyncStub) -> None:
    meta = file_pb2.File(name="files/chosen", display_name="x", mime_type="text/plain; charset=utf-8",
                         size_bytes=1, sha256_hash=b"nope", state=file_pb2.File.State.STATE_FAILED,
                         source=file_pb2.File.Source.SOURCE_GENERATED)
    f = await files.CreateFile(stream([file_pb2.CreateFileRequest(file=meta),
                                       file_pb2.CreateFileRequest(data=b"hello")]))
    assert f.name != "files/chosen" and f.size_bytes == 5 and f.sha256_hash == hashlib.sha256(b"hello").digest()
    assert f.mime_type == "text/plain; charset=utf-8"
    assert (f.state, f.source) == (file_pb2.File.State.STATE_ACTIVE, file_pb2.File.Source.SOURCE_UPLOADED)


async def test_list_pages_newest_first(files: file_pb2_grpc.FileServiceAsyncStub) -> None:
    names = [(await upload(files, f"file {i}".encode(), display_name=f"f{i}")).name for i in range(5)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await files.ListFiles(file_pb2.ListFilesRequest(page_size=2, page_token=token))
        assert len(page.files) <= 2
        seen += [f.name for f in page.files]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == names[::-1] and pages == 3
    assert len((await files.ListFiles(file_pb2.ListFilesRequest(page_size=5000))).files) == 5

    await fails(files.ListFiles(file_pb2.ListFilesRequest(page_size=-1)), INVALID)
    first = await files.ListFiles(file_pb2.ListFilesRequest(page_size=2))
    token = first.next_page_token
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    await fails(files.ListFiles(file_pb2.ListFilesRequest(page_token=tampered)), INVALID, "INVALID_PAGE_TOKEN")
    await fails(files.ListFiles(file_pb2.ListFilesRequest(page_token="not a token!")), INVALID,
                "INVALID_PAGE_TOKEN")


async def test_upload_over_the_limit_is_refused_and_leaves_nothing(make_server: MakeServer) -> None:
    srv = await make_server(ServerConfig(limits=Limits(max_file_bytes=100_000)))
    channel, files = stub(srv.target)
    try:
        message = await fails(upload(files, os.urandom(300_000), chunk=10_000), grpc.StatusCode.RESOURCE_EXHAUSTED,
                              "FILE_TOO_LARGE")
        assert "100000" in message
        # One chunk over the limit on its own.
        await fails(upload(files, os.urandom(100_001), chunk=200_000), grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "FILE_TOO_LARGE")
        assert await listed(files) == []
        assert leftovers(srv.data_dir) == ([], [])
        exact = await upload(files, os.urandom(100_000), chunk=30_000)
        assert exact.size_bytes == 100_000
    finally:
        await channel.close()


async def test_limit_counts_bytes_still_being_written(make_server: MakeServer) -> None:
    # Past the server's first write batch, so part of the bytes are in flight
    # to the disk when the limit is checked.
    srv = await make_server(ServerConfig(limits=Limits(max_file_bytes=MiB + 1)))
    channel, files = stub(srv.target)
    try:
        for _ in range(3):
            await fails(upload(files, os.urandom(3 * MiB), chunk=512 << 10), grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "FILE_TOO_LARGE")
        assert await listed(files) == []
        assert leftovers(srv.data_dir) == ([], [])
    finally:
        await channel.close()


@pytest.mark.parametrize("how", ["cancel", "close-channel"])
async def test_upload_cut_off_midway_leaves_nothing(server: ServerHandle, how: str) -> None:
    channel, files = stub(server.target)
    release = asyncio.Event()

    async def endless() -> AsyncIterator[file_pb2.CreateFileRequest]:
        yield file_pb2.CreateFileRequest(file=file_pb2.File(display_name="cut"))
        for _ in range(12):
            yield file_pb2.CreateFileRequest(data=os.urandom(256 << 10))
        await release.wait()  # never set: the client stalls mid-upload
        yield file_pb2.CreateFileRequest(data=b"never sent")

    call = files.CreateFile(endless())
    tmp = server.data_dir / "files" / ".tmp"

    async def writing() -> bool:
        return any(p.stat().st_size >= MiB for p in tmp.iterdir())

    await eventually(writing)
    if how == "cancel":
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    else:
        await channel.close()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await call

    async def clean() -> bool:
        return leftovers(server.data_dir) == ([], [])

    await eventually(clean)
    channel2, files2 = stub(server.target)
    try:
        assert await listed(files2) == []
    finally:
        await channel.close()
        await channel2.close()


async def test_bad_upload_streams(server: ServerHandle, files: file_pb2_grpc.FileServiceAsyncStub) -> None:
    meta = file_pb2.CreateFileRequest(file=file_pb2.File(display_name="x"))
    data = file_pb2.CreateFileRequest(data=b"abc")
    message = await fails(files.CreateFile(stream([meta])), INVALID, "FILE_EMPTY")
    assert "file is empty" in message
    await fails(files.CreateFile(stream([meta, file_pb2.CreateFileRequest(data=b"")])), INVALID, "FILE_EMPTY")
    await fails(files.CreateFile(stream([])), INVALID, "FILE_METADATA_MISSING")
    await fails(files.CreateFile(stream([data, data])), INVALID, "FILE_METADATA_MISSING")
    await fails(files.CreateFile(stream([meta, data, meta, data])), INVALID, "INVALID_UPLOAD_STREAM")
    await fails(files.CreateFile(stream([meta, data, file_pb2.CreateFileRequest()])), INVALID,
                "INVALID_UPLOAD_STREAM")
    too_long = file_pb2.CreateFileRequest(file=file_pb2.File(display_name="n" * 513))
    await fails(files.CreateFile(stream([too_long, data])), INVALID)
    bad_mime = file_pb2.CreateFileRequest(file=file_pb2.File(mime_type="not a type"))
    await fails(files.CreateFile(stream([bad_mime, data])), INVALID)
    assert await listed(files) == []
    assert leftovers(server.data_dir) == ([], [])


async def test_malformed_names_are_invalid(files: file_pb2_grpc.FileServiceAsyncStub) -> None:
    for name in ("", "files/", "files/UPPER", "batches/abc", "files/a/b", "files/" + "a" * 65):
        await fails(files.GetFile(file_pb2.GetFileRequest(name=name)), INVALID, "INVALID_NAME")
        await fails(files.DeleteFile(file_pb2.DeleteFileRequest(name=name)), INVALID, "INVALID_NAME")
        await fails(files.DownloadFile(file_pb2.DownloadFileRequest(name=name)), INVALID, "INVALID_NAME")


async def test_delete_removes_row_and_bytes(server: ServerHandle, files: file_pb2_grpc.FileServiceAsyncStub) -> None:
    f = await upload(files, b"some bytes")
    keep = await upload(files, b"other bytes")
    await files.DeleteFile(file_pb2.DeleteFileRequest(name=f.name))
    await fails(files.GetFile(file_pb2.GetFileRequest(name=f.name)), NOT_FOUND, "FILE_NOT_FOUND")
    await fails(files.DownloadFile(file_pb2.DownloadFileRequest(name=f.name)), NOT_FOUND, "FILE_NOT_FOUND")
    await fails(files.DeleteFile(file_pb2.DeleteFileRequest(name=f.name)), NOT_FOUND, "FILE_NOT_FOUND")
    await fails(files.DeleteFile(file_pb2.DeleteFileRequest(name="files/unknown")), NOT_FOUND, "FILE_NOT_FOUND")
    assert await listed(files) == [keep.name]
    assert leftovers(server.data_dir) == ([keep.name.removeprefix("files/")], [])


async def test_files_are_tenant_scoped(make_server: MakeServer) -> None:
    srv = await make_server(ServerConfig(api_keys=(ApiKey("k-a", "a"), ApiKey("k-b", "b"))))
    a: Metadata = (("x-goog-api-key", "k-a"),)
    b: Metadata = (("authorization", "Bearer k-b"),)
    channel, files = stub(srv.target)
    try:
        mine = [await upload(files, f"a{i}".encode(), md=a) for i in range(3)]
        theirs = await upload(files, b"b's", md=b)
        f = mine[0]
        await fails(files.GetFile(file_pb2.GetFileRequest(name=f.name), metadata=b), NOT_FOUND)
        await fails(files.DownloadFile(file_pb2.DownloadFileRequest(name=f.name), metadata=b), NOT_FOUND)
        await fails(files.DeleteFile(file_pb2.DeleteFileRequest(name=f.name), metadata=b), NOT_FOUND)
        assert await listed(files, b) == [theirs.name]
        assert await listed(files, a) == [m.name for m in reversed(mine)]
        page = await files.ListFiles(file_pb2.ListFilesRequest(page_size=1), metadata=a)
        await fails(files.ListFiles(file_pb2.ListFilesRequest(page_token=page.next_page_token), metadata=b),
                    INVALID, "INVALID_PAGE_TOKEN")
        # Still there for its owner.
        assert b"".join(await download(files, f.name, a)) == b"a0"
        await fails(files.GetFile(file_pb2.GetFileRequest(name=f.name)), grpc.StatusCode.UNAUTHENTICATED)
        await fails(upload(files, b"x", md=(("x-goog-api-key", "wrong"),)), grpc.StatusCode.UNAUTHENTICATED)
    finally:
        await channel.close()


async def test_uploads_expire_with_their_bytes(make_server: MakeServer) -> None:
    srv = await make_server(ServerConfig(limits=Limits(file_ttl_s=0.3)))
    channel, files = stub(srv.target)
    try:
        f = await upload(files, b"short-lived")
        assert f.expiration_time.ToMicroseconds() - f.create_time.ToMicroseconds() == 300_000

        async def gone() -> bool:
            try:
                await files.GetFile(file_pb2.GetFileRequest(name=f.name))
            except grpc.aio.AioRpcError as e:
                assert e.code() == NOT_FOUND
                return True
            return False

        await eventually(gone)
        assert await listed(files) == []
        assert leftovers(srv.data_dir) == ([], [])
    finally:
        await channel.close()


async def test_file_read_by_unfinished_batch_is_kept(make_server: MakeServer) -> None:
    srv = await make_server(ServerConfig(limits=Limits(file_ttl_s=0.3)))
    channel, files = stub(srv.target)
    store = srv.running.store
    try:
        f = await upload(files, b'{"request": {}}\n')
        file_id = f.name.removeprefix("files/")
        # A batch row that reads the file, stored directly: the executor never
        # sees it, so it stays unfinished until closed below.
        batch, _ = await store.create_batch(
            NewBatch(id="inuse1", tenant="default", kind=BatchKind.GENERATE, model="models/echo", display_name="",
                     priority=0, input_file=file_id, webhook=None, request_id=None),
            [], 0,
        )
        await fails(files.DeleteFile(file_pb2.DeleteFileRequest(name=f.name)), grpc.StatusCode.FAILED_PRECONDITION,
                    "FILE_IN_USE")
        await swept_past(files)
        assert (await files.GetFile(file_pb2.GetFileRequest(name=f.name))).name == f.name

        await store.close_batch(batch.id, State.CANCELLED, None, ItemStatus.CANCELLED)
        await store.mark_done(batch.id, None)

        async def gone() -> bool:
            return await listed(files) == []

        await eventually(gone)
        assert leftovers(srv.data_dir) == ([], [])
    finally:
        await channel.close()


async def test_generated_results_file_downloads_and_does_not_expire(make_server: MakeServer) -> None:
    srv = await make_server(ServerConfig(limits=Limits(max_inline_output=1000, file_ttl_s=0.3)))
    stubs = Stubs.connect(srv.target)
    channel, files = stub(srv.target)
    try:
        op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(generate_batch(50))).name)
        output = batch_pb2.GenerateContentBatchOutput()
        assert op.response.Unpack(output)
        name = output.responses_file
        assert name.startswith("files/")
        await swept_past(files)  # generated files go with their batch only, never by the upload TTL
        f = await files.GetFile(file_pb2.GetFileRequest(name=name))
        assert f.source == file_pb2.File.Source.SOURCE_GENERATED and not f.HasField("expiration_time")
        data = b"".join(await download(files, name))
        assert len(data) == f.size_bytes and hashlib.sha256(data).digest() == f.sha256_hash
        assert data.count(b"\n") == 50 and b"prompt 49" in data
        assert name in await listed(files)
    finally:
        await channel.close()
        await stubs.channel.close()
