"""Per-tenant quotas against the real server (issue 12, item 3; docs/reference.md#quotas).

Two tenants (alice, bob) with API keys. Each quota is hit with its detail
(QuotaFailure subject and description with the use and the limit, ErrorInfo
metadata), one tenant's use never counts against the other, concurrent
creates cannot overshoot, an upload over the byte quota leaves nothing
behind, and GetUsage tells each tenant where it stands. Batches that must
stay unfinished run on ``models/stuck`` (one request at a time, a minute
each); the create window runs on a clock the tests move.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import MakeServer, ServerHandle
from google.longrunning import operations_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from longbatch.client.cli import main as cli_main
from longbatch.server import quotas as quotas_module
from longbatch.server.config import (
    DEFAULT_MODELS,
    ApiKey,
    ConfigError,
    ModelConfig,
    QuotaSettings,
    ServerConfig,
    TenantQuota,
    config_from_dict,
)
from longbatch.v1 import batch_pb2, file_pb2, file_pb2_grpc, quota_pb2, quota_pb2_grpc

from support import Stubs, details, embed_batch, generate_batch, metadata_of

T = 30.0
KiB = 1 << 10
ALICE = (("x-goog-api-key", "k-alice"),)
BOB = (("x-goog-api-key", "k-bob"),)
STUCK = ModelConfig(name="models/stuck", backend="echo", max_concurrency=1, latency_s=60.0)
UNLIMITED = TenantQuota(max_stored_bytes=None, max_files=None, max_unfinished_batches=None,
                        max_pending_requests=None, max_creates=None)
Metadata = Sequence[tuple[str, str]]


def config(**limits: int | float | None) -> ServerConfig:
    """Two tenants with the same quotas: unlimited but for ``limits``."""
    quota = TenantQuota(**{**UNLIMITED.__dict__, **limits})
    return ServerConfig(models=(*DEFAULT_MODELS, STUCK),
                        api_keys=(ApiKey("k-alice", "alice"), ApiKey("k-bob", "bob")),
                        quotas=QuotaSettings(defaults=quota))


@dataclass
class Client:
    """Stubs of one server, for both tenants."""

    stubs: Stubs
    files: file_pb2_grpc.FileServiceAsyncStub
    quotas: quota_pb2_grpc.QuotaServiceAsyncStub
    handle: ServerHandle


@pytest.fixture
async def connect(make_server: MakeServer) -> AsyncIterator[object]:
    channels: list[grpc.aio.Channel] = []

    async def start(cfg: ServerConfig) -> Client:
        handle = await make_server(cfg)
        stubs = Stubs.connect(handle.target)
        channels.append(stubs.channel)
        return Client(stubs, file_pb2_grpc.FileServiceStub(stubs.channel),
                      quota_pb2_grpc.QuotaServiceStub(stubs.channel), handle)

    yield start
    for channel in channels:
        await channel.close()


@dataclass
class Refusal:
    """A QUOTA_EXCEEDED error, decoded."""

    subject: str
    description: str
    metadata: dict[str, str]
    retry_delay_s: float | None
    message: str


def refusal_of(status: status_pb2.Status) -> Refusal:
    """The QuotaFailure (exactly one violation) and RetryInfo of a status."""
    failures, retry = [], None
    info = error_details_pb2.ErrorInfo()
    for d in status.details:
        if d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            d.Unpack(failure)
            failures += list(failure.violations)
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_retry = error_details_pb2.RetryInfo()
            d.Unpack(info_retry)
            retry = info_retry.retry_delay.ToNanoseconds() / 1e9
        elif d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            d.Unpack(info)
    assert info.reason == "QUOTA_EXCEEDED" and info.domain == "longbatch.dev", status
    assert len(failures) == 1, status
    return Refusal(failures[0].subject, failures[0].description, dict(info.metadata), retry, status.message)


async def refused(call: object) -> Refusal:
    """Await a call that must fail with RESOURCE_EXHAUSTED / QUOTA_EXCEEDED."""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call  # type: ignore[misc]
    d = details(e.value)  # also checks the ErrorInfo and the status agree
    assert d.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (d.code, d.message)
    raw = dict(e.value.trailing_metadata() or ())["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    return refusal_of(status_pb2.Status.FromString(raw))


def assert_names(r: Refusal, tenant: str, quota: str, used: int, limit: int) -> None:
    """The refusal names the tenant's limit, its use and the limit."""
    assert r.subject == f"tenants/{tenant}/quotas/{quota}"
    assert r.description.startswith(f"{quota} (")
    assert f"{used} bytes" in r.description if quota == "max_stored_bytes" else f": {used} used" in r.description
    assert f"limit of {limit}" in r.description, r.description
    assert r.metadata == {"quota": quota, "tenant": tenant, "used": str(used), "limit": str(limit)}
    assert r.description in r.message


def upload_messages(data: bytes, chunk: int = 64 * KiB) -> Iterator[file_pb2.CreateFileRequest]:
    yield file_pb2.CreateFileRequest(file=file_pb2.File(display_name="input.jsonl"))
    for start in range(0, len(data), chunk):
        yield file_pb2.CreateFileRequest(data=data[start:start + chunk])


async def as_stream(items: Iterator[file_pb2.CreateFileRequest], pulled: list[int] | None = None
                    ) -> AsyncIterator[file_pb2.CreateFileRequest]:
    for item in items:
        if pulled is not None:
            pulled[0] += 1
        yield item


async def upload(c: Client, data: bytes, md: Metadata = ALICE) -> file_pb2.File:
    return await c.files.CreateFile(as_stream(upload_messages(data)), metadata=md, timeout=T)


def jsonl(n: int) -> bytes:
    return b"".join(json.dumps({"key": f"k{i}", "request": {"contents": [{"parts": [{"text": f"q {i}"}]}]}}).encode()
                    + b"\n" for i in range(n))


def file_batch(name: str, model: str = "models/stuck") -> batch_pb2.BatchGenerateContentRequest:
    return batch_pb2.BatchGenerateContentRequest(batch=batch_pb2.GenerateContentBatch(
        model=model, input_config=batch_pb2.InputConfig(file_name=name)))


async def create(c: Client, n: int, md: Metadata = ALICE, model: str = "models/stuck") -> str:
    op = await c.stubs.batches.BatchGenerateContent(generate_batch(n, model=model), metadata=md, timeout=T)
    return str(op.name)


async def usage(c: Client, md: Metadata = ALICE) -> dict[str, quota_pb2.QuotaUsage]:
    response = await c.quotas.GetUsage(quota_pb2.GetUsageRequest(), metadata=md, timeout=T)
    return {q.name: q for q in response.quotas}


async def used(c: Client, md: Metadata = ALICE) -> dict[str, int]:
    return {name: q.used for name, q in (await usage(c, md)).items()}


def on_disk(data_dir: Path) -> tuple[list[str], list[str]]:
    """Names of stored file bytes and of upload temporaries."""
    root = data_dir / "files"
    return (sorted(p.name for p in root.iterdir() if p.is_file()), sorted(p.name for p in (root / ".tmp").iterdir()))


async def file_rows(c: Client, md: Metadata = ALICE) -> list[str]:
    listed = await c.files.ListFiles(file_pb2.ListFilesRequest(page_size=1000), metadata=md, timeout=T)
    return [f.name for f in listed.files]


async def cancel_done(c: Client, name: str, md: Metadata = ALICE) -> None:
    await c.stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name), metadata=md, timeout=T)
    request = operations_pb2.WaitOperationRequest(name=name)
    request.timeout.FromSeconds(20)
    assert (await c.stubs.ops.WaitOperation(request, metadata=md, timeout=T)).done


async def until_requests(c: Client, name: str, count: int, md: Metadata = ALICE) -> None:
    """Poll (at most 20 s) until the file batch's input is read: its request count is set."""
    for _ in range(400):
        op = await c.stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=md, timeout=T)
        if metadata_of(op).batch_stats.request_count == count:
            return
        assert not op.done, op
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never counted {count} requests")


# -- each quota ------------------------------------------------------------------


async def test_max_files_refuses_the_next_upload_and_not_the_other_tenant(connect: object) -> None:
    c: Client = await connect(config(max_files=2))  # type: ignore[operator]
    first = await upload(c, b"a\n")
    await upload(c, b"b\n")
    r = await refused(upload(c, b"c\n"))
    assert_names(r, "alice", "max_files", 2, 2)
    assert "one more" in r.description
    assert (await upload(c, b"bob's\n", BOB)).name  # bob's count is his own
    assert len(await file_rows(c)) == 2
    stored, temps = on_disk(c.handle.data_dir)
    assert len(stored) == 3 and temps == []
    # Deleting one makes room again.
    await c.files.DeleteFile(file_pb2.DeleteFileRequest(name=first.name), metadata=ALICE, timeout=T)
    assert (await upload(c, b"d\n")).name


async def test_an_upload_over_max_stored_bytes_stops_midstream_and_leaves_nothing(connect: object) -> None:
    limit = 1 << 20
    c: Client = await connect(config(max_stored_bytes=limit))  # type: ignore[operator]
    kept = await upload(c, b"x" * (600 * KiB))
    pulled = [0]
    data = b"y" * (32 << 20)  # 32 MiB in 512 messages of 64 KiB
    call = c.files.CreateFile(as_stream(upload_messages(data), pulled), metadata=ALICE, timeout=T)
    r = await refused(call)
    assert_names(r, "alice", "max_stored_bytes", 600 * KiB, limit)
    assert "this upload has sent " in r.description and "its next message adds 65536" in r.description
    # The server stopped reading at the message that crossed: the client had
    # no chance to push all 32 MiB through gRPC's flow control.
    assert pulled[0] < 256, pulled
    # No file row, no bytes, no temporary.
    assert await file_rows(c) == [kept.name]
    stored, temps = on_disk(c.handle.data_dir)
    assert stored == [kept.name.removeprefix("files/")] and temps == []
    assert (await used(c))["max_stored_bytes"] == 600 * KiB
    # Exactly up to the limit is allowed; one byte more is not.
    await upload(c, b"z" * (limit - 600 * KiB))
    assert_names(await refused(upload(c, b"!")), "alice", "max_stored_bytes", limit, limit)
    # Bob stores his own.
    assert (await upload(c, b"b" * (900 * KiB), BOB)).size_bytes == 900 * KiB


async def test_max_unfinished_batches(connect: object) -> None:
    c: Client = await connect(config(max_unfinished_batches=2))  # type: ignore[operator]
    first = await create(c, 1)
    await create(c, 1)
    r = await refused(c.stubs.batches.BatchGenerateContent(generate_batch(1, model="models/stuck"),
                                                          metadata=ALICE, timeout=T))
    assert_names(r, "alice", "max_unfinished_batches", 2, 2)
    # An embed batch counts the same; bob's are his own.
    r = await refused(c.stubs.batches.AsyncBatchEmbedContent(embed_batch(1, model="models/stuck"), metadata=ALICE,
                                                             timeout=T))
    assert r.subject == "tenants/alice/quotas/max_unfinished_batches"
    await create(c, 1, BOB)
    await create(c, 1, BOB)
    # A done batch no longer counts.
    await cancel_done(c, first)
    await create(c, 1)


async def test_max_pending_requests_inline_and_file_batches(connect: object) -> None:
    c: Client = await connect(config(max_pending_requests=10))  # type: ignore[operator]
    await create(c, 6)
    r = await refused(c.stubs.batches.BatchGenerateContent(generate_batch(5, model="models/stuck"),
                                                          metadata=ALICE, timeout=T))
    assert_names(r, "alice", "max_pending_requests", 6, 10)
    assert "this batch adds 5" in r.description
    await create(c, 4)  # exactly the limit
    name = (await upload(c, jsonl(1))).name
    r = await refused(c.stubs.batches.BatchGenerateContent(file_batch(name), metadata=ALICE, timeout=T))
    assert_names(r, "alice", "max_pending_requests", 10, 10)
    assert "at least one" in r.description
    await create(c, 10, BOB)
    assert (await used(c))["max_pending_requests"] == 10
    assert (await used(c, BOB))["max_pending_requests"] == 10


async def test_one_file_fed_to_many_batches_counts_every_copy(connect: object) -> None:
    c: Client = await connect(config(max_pending_requests=10))  # type: ignore[operator]
    name = (await upload(c, jsonl(6))).name
    first = (await c.stubs.batches.BatchGenerateContent(file_batch(name), metadata=ALICE, timeout=T)).name
    await until_requests(c, first, 6)
    # Room for one at create, but its six requests do not fit beside the first six.
    second = (await c.stubs.batches.BatchGenerateContent(file_batch(name), metadata=ALICE, timeout=T)).name
    op = await _wait(c, second)
    assert metadata_of(op).state == batch_pb2.BATCH_STATE_FAILED
    assert op.error.code == code_pb2.RESOURCE_EXHAUSTED
    r = refusal_of(op.error)
    assert r.subject == "tenants/alice/quotas/max_pending_requests"
    assert "limit of 10" in r.description and name in r.description
    # Its requests were dropped: only the first batch's six wait.
    assert (await used(c))["max_pending_requests"] == 6
    assert (await used(c))["max_unfinished_batches"] == 1


async def _wait(c: Client, name: str, md: Metadata = ALICE) -> operations_pb2.Operation:
    request = operations_pb2.WaitOperationRequest(name=name)
    request.timeout.FromSeconds(20)
    op = await c.stubs.ops.WaitOperation(request, metadata=md, timeout=T)
    assert op.done, f"{name} not done within 20 s"
    return op


async def test_max_creates_in_a_window(connect: object, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(quotas_module, "clock", lambda: now[0])
    c: Client = await connect(config(max_creates=3, create_window_s=60.0))  # type: ignore[operator]
    await create(c, 1, model="models/echo")
    now[0] += 10
    await upload(c, b"counts too\n")
    # A create refused as bad input takes no place.
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await c.stubs.batches.BatchGenerateContent(generate_batch(1, model="bad name"), metadata=ALICE, timeout=T)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The same request_id twice stores one batch and takes one place.
    op = await c.stubs.batches.BatchGenerateContent(generate_batch(1, request_id="once"), metadata=ALICE, timeout=T)
    again = await c.stubs.batches.BatchGenerateContent(generate_batch(1, request_id="once"), metadata=ALICE,
                                                      timeout=T)
    assert again.name == op.name
    r = await refused(c.stubs.batches.BatchGenerateContent(generate_batch(1), metadata=ALICE, timeout=T))
    assert_names(r, "alice", "max_creates", 3, 3)
    assert "in the last 60 s" in r.description
    assert r.retry_delay_s == pytest.approx(50.0)  # the first create leaves the window 60 s after it
    assert_names(await refused(upload(c, b"no\n")), "alice", "max_creates", 3, 3)
    assert (await usage(c))["max_creates"].window.seconds == 60
    assert (await used(c))["max_creates"] == 3
    await create(c, 1, BOB, model="models/echo")  # bob's window is his own
    now[0] += 50
    await create(c, 1, model="models/echo")
    assert (await used(c))["max_creates"] == 3


# -- races -----------------------------------------------------------------------


async def test_concurrent_creates_cannot_overshoot(connect: object) -> None:
    c: Client = await connect(config(max_unfinished_batches=5, max_pending_requests=100))  # type: ignore[operator]

    async def attempt(n: int) -> bool:
        try:
            await create(c, n)
            return True
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            return False

    outcomes = await asyncio.gather(*(attempt(1) for _ in range(20)))
    assert sum(outcomes) == 5
    assert (await used(c))["max_unfinished_batches"] == 5
    # Pending requests: 95 left; 12 creates of 10 at once fit 9 times.
    c2: Client = await connect(config(max_pending_requests=95))  # type: ignore[operator]
    c = c2
    outcomes = await asyncio.gather(*(attempt(10) for _ in range(12)))
    assert sum(outcomes) == 9
    assert (await used(c))["max_pending_requests"] == 90


async def test_concurrent_uploads_cannot_overshoot_max_stored_bytes(connect: object) -> None:
    limit = 1 << 20
    c: Client = await connect(config(max_stored_bytes=limit))  # type: ignore[operator]

    async def attempt(i: int) -> int:
        try:
            return int((await upload(c, bytes([65 + i]) * (300 * KiB))).size_bytes)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            return 0

    sizes = await asyncio.gather(*(attempt(i) for i in range(8)))
    assert sum(sizes) <= limit and sum(1 for s in sizes if s) == 3
    assert (await used(c))["max_stored_bytes"] == sum(sizes)
    stored, temps = on_disk(c.handle.data_dir)
    assert len(stored) == 3 and temps == []


async def test_concurrent_uploads_cannot_overshoot_max_files(connect: object) -> None:
    c: Client = await connect(config(max_files=3))  # type: ignore[operator]

    async def attempt(i: int) -> bool:
        try:
            await upload(c, f"file {i}\n".encode())
            return True
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            return False

    assert sum(await asyncio.gather(*(attempt(i) for i in range(10)))) == 3
    assert len(await file_rows(c)) == 3
    stored, temps = on_disk(c.handle.data_dir)
    assert len(stored) == 3 and temps == []


# -- usage -----------------------------------------------------------------------


async def test_usage_follows_creates_deletes_and_finished_batches(connect: object) -> None:
    c: Client = await connect(config(max_stored_bytes=1 << 30, max_files=50, max_unfinished_batches=10,
                                     max_pending_requests=1000, max_creates=100))  # type: ignore[operator]
    response = await c.quotas.GetUsage(quota_pb2.GetUsageRequest(), metadata=ALICE, timeout=T)
    assert response.tenant == "alice"
    assert [q.name for q in response.quotas] == ["max_stored_bytes", "max_files", "max_unfinished_batches",
                                                 "max_pending_requests", "max_creates"]
    assert all(q.description and not q.unlimited and q.used == 0 for q in response.quotas)
    assert [q.limit for q in response.quotas] == [1 << 30, 50, 10, 1000, 100]

    data = jsonl(5)
    f = await upload(c, data)
    assert await used(c) == {"max_stored_bytes": len(data), "max_files": 1, "max_unfinished_batches": 0,
                             "max_pending_requests": 0, "max_creates": 1}
    stuck = await create(c, 7)
    assert await used(c) == {"max_stored_bytes": len(data), "max_files": 1, "max_unfinished_batches": 1,
                             "max_pending_requests": 7, "max_creates": 2}
    # A file batch on echo finishes and writes a responses file, which counts.
    op = await _wait(c, (await c.stubs.batches.BatchGenerateContent(
        file_batch(f.name, "models/echo"), metadata=ALICE, timeout=T)).name)
    output = batch_pb2.GenerateContentBatchOutput()
    op.response.Unpack(output)
    results = await c.files.GetFile(file_pb2.GetFileRequest(name=output.responses_file), metadata=ALICE, timeout=T)
    now = await used(c)
    assert now == {"max_stored_bytes": len(data) + results.size_bytes, "max_files": 2, "max_unfinished_batches": 1,
                   "max_pending_requests": 7, "max_creates": 3}
    # Bob sees only his own.
    assert await used(c, BOB) == dict.fromkeys(now, 0)
    # Cancelling the stuck batch ends it: nothing pending, nothing unfinished.
    await cancel_done(c, stuck)
    assert (await used(c))["max_unfinished_batches"] == 0 and (await used(c))["max_pending_requests"] == 0
    # Deleting the file batch takes its responses file; deleting the input, the rest.
    await c.stubs.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name), metadata=ALICE, timeout=T)
    assert (await used(c))["max_stored_bytes"] == len(data) and (await used(c))["max_files"] == 1
    await c.files.DeleteFile(file_pb2.DeleteFileRequest(name=f.name), metadata=ALICE, timeout=T)
    assert (await used(c))["max_stored_bytes"] == 0 and (await used(c))["max_files"] == 0


async def test_usage_on_an_open_server_is_unlimited(connect: object) -> None:
    c: Client = await connect(ServerConfig())  # type: ignore[operator]
    response = await c.quotas.GetUsage(quota_pb2.GetUsageRequest(), timeout=T)
    assert response.tenant == "default"
    assert all(q.unlimited and q.limit == 0 for q in response.quotas)
    await c.files.CreateFile(as_stream(upload_messages(b"x\n")), timeout=T)
    assert {q.name: q.used for q in (await c.quotas.GetUsage(quota_pb2.GetUsageRequest(), timeout=T)).quotas}[
        "max_files"] == 1


async def test_built_in_defaults_apply_with_api_keys(connect: object) -> None:
    c: Client = await connect(ServerConfig(api_keys=(ApiKey("k-alice", "alice"),)))  # type: ignore[operator]
    limits = {q.name: q.limit for q in (await usage(c)).values()}
    assert limits == {"max_stored_bytes": 10 << 30, "max_files": 1000, "max_unfinished_batches": 100,
                      "max_pending_requests": 5_000_000, "max_creates": 60}


async def test_a_tenant_override_applies_to_that_tenant_only(connect: object) -> None:
    cfg = config_from_dict({
        "models": [{"name": "models/echo"}],
        "api_keys": [{"key": "k-alice", "tenant": "alice"}, {"key": "k-bob", "tenant": "bob"}],
        "quotas": {"max_files": 1, "tenants": [{"name": "bob", "max_files": 2, "max_creates": "unlimited"}]},
    })
    c: Client = await connect(cfg)  # type: ignore[operator]
    await upload(c, b"a\n")
    assert_names(await refused(upload(c, b"a\n")), "alice", "max_files", 1, 1)
    await upload(c, b"b\n", BOB)
    await upload(c, b"b\n", BOB)
    assert_names(await refused(upload(c, b"b\n", BOB)), "bob", "max_files", 2, 2)
    bob = await usage(c, BOB)
    assert bob["max_creates"].unlimited and bob["max_stored_bytes"].limit == 10 << 30


async def test_cli_usage_prints_each_quota(connect: object, capsys: pytest.CaptureFixture[str]) -> None:
    c: Client = await connect(config(max_files=5, max_creates=10))  # type: ignore[operator]
    await upload(c, b"x\n")
    argv = ["--target", c.handle.target, "--api-key", "k-alice", "usage"]
    assert await asyncio.to_thread(cli_main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tenant: alice" and lines[1].split() == ["QUOTA", "USED", "LIMIT", "WHAT"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == ["max_stored_bytes", "max_files", "max_unfinished_batches", "max_pending_requests",
                          "max_creates"]
    assert rows["max_stored_bytes"][1:3] == ["2", "unlimited"]
    assert rows["max_files"][1:3] == ["1", "5"]
    assert rows["max_creates"][1:5] == ["1", "10", "per", "60s"]
    assert await asyncio.to_thread(cli_main, ["--json", *argv]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tenant"] == "alice" and printed["quotas"][1] == {
        "name": "max_files", "description": "stored files, uploaded and generated", "used": "1", "limit": "5"}


# -- config ----------------------------------------------------------------------


def test_config_quotas_defaults_overrides_and_unlimited() -> None:
    q = config_from_dict({"quotas": {"max_stored_bytes": "2GiB", "max_files": 0, "max_creates": "unlimited",
                                     "create_window": "10s",
                                     "tenants": [{"name": "alice", "max_stored_bytes": "unlimited"}]}}).quotas
    carol = q.for_tenant("carol", open_server=False)
    assert (carol.max_stored_bytes, carol.max_files, carol.max_creates, carol.create_window_s) == (2 << 30, 0, None,
                                                                                                    10.0)
    assert carol.max_unfinished_batches == 100  # not written: the built-in default
    alice = q.for_tenant("alice", open_server=False)
    assert alice.max_stored_bytes is None and alice.max_files == 0  # the rest from [quotas]
    none = config_from_dict({}).quotas
    assert none.for_tenant("default", open_server=True) == UNLIMITED
    assert none.for_tenant("alice", open_server=False) == TenantQuota()


@pytest.mark.parametrize(("quotas", "error"), [
    ({"max_files": -1}, "quotas.max_files: must not be negative"),
    ({"max_files": "lots"}, "quotas.max_files: expected a number or \"unlimited\""),
    ({"max_files": True}, "quotas.max_files: expected a number"),
    ({"max_stored_bytes": "5 parsecs"}, "quotas.max_stored_bytes: expected a size"),
    ({"max_filez": 1}, "unknown key quotas.max_filez"),
    ({"create_window": "0s"}, "quotas.create_window: must be positive"),
    ({"tenants": [{"max_files": 1}]}, "quotas.tenants[0].name is required"),
    ({"tenants": [{"name": "a", "weight": 2}]}, "unknown key quotas.tenants[0].weight"),
    ({"tenants": [{"name": "a"}, {"name": "a"}]}, "quotas.tenants: a tenant is listed twice"),
    ({"tenants": {"name": "a"}}, "quotas.tenants: expected [[quotas.tenants]] tables"),
])
def test_config_quotas_bad_values_are_one_clear_error(quotas: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"quotas": quotas})
    assert str(e.value).startswith(error), str(e.value)
