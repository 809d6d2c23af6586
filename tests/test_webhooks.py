"""Webhooks (API.md section 8): a signed POST on every terminal state, retried
with backoff, never blocking the batch, surviving a restart.

Receivers are real aiohttp servers on 127.0.0.1:0, reached through
``[webhooks] allow = ["127.0.0.1"]`` (the SSRF guard refuses loopback by
default; tests/test_ssrf.py tests the guard); every wait is bounded. Nothing
may connect beyond loopback or look a name up (``netsafety``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
import orjson
import pytest
from aiohttp import web
from conftest import MakeServer
from google.longrunning import operations_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2
from netsafety import FakeDNS

from longbatch.server import webhooks
from longbatch.server.config import ConfigError, Limits, ServerConfig, WebhookSettings, config_from_dict
from longbatch.server.convert import closed_item, inline_output
from longbatch.server.domain import Batch, BatchKind, ItemStatus, ResultRow, State
from longbatch.server.retry import parse_retry_after
from longbatch.server.store import Store
from longbatch.server.validate import MAX_USER_METADATA_BYTES, MAX_WEBHOOKS
from longbatch.server.webhooks import MAX_BODY_WITH_OUTPUT, OUTPUT_TOO_LARGE, loggable_uri
from longbatch.v1 import batch_pb2, content_pb2, file_pb2, file_pb2_grpc

from support import ServerProcess, Stubs, details, embed_batch, eventually, generate_batch, metadata_of, wait_done

SECRET = "s3cret-webhook-key"
SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED
pytestmark = pytest.mark.usefixtures("loopback_only", "fake_dns")


@dataclass
class Hit:
    """One POST as the receiver saw it."""

    at: float
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    answered: int

    def json(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Reply:
    """What the receiver answers: a status, headers, after a delay."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Plan = Callable[[str, int], Reply]
"""(path, 1-based attempt on that path) -> reply."""


class Receiver:
    """An HTTP server on 127.0.0.1:0 recording every POST."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.hits: list[Hit] = []
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        return self.base

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        n = 1 + sum(1 for h in self.hits if h.path == request.path)
        reply = self.plan(request.path, n)
        self.hits.append(Hit(time.monotonic(), request.path, request.query_string, dict(request.headers), body,
                             reply.status))
        self._changed.set()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        return web.Response(status=reply.status, headers=reply.headers)

    def on(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    async def wait_for(self, check: Callable[[], bool], within: float = 15.0) -> None:
        """Until ``check()`` holds, re-checked on each POST; bounded by ``within``."""
        async with asyncio.timeout(within):
            while not check():
                self._changed.clear()
                await self._changed.wait()


async def receiver_pool() -> AsyncIterator[Callable[[Plan], Awaitable[Receiver]]]:
    """Yields a function that starts receivers; all stop afterwards."""
    started: list[Receiver] = []

    async def make(plan: Plan) -> Receiver:
        r = Receiver(plan)
        await r.start()
        started.append(r)
        return r

    yield make
    for r in started:
        await r.stop()


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[[Plan], Awaitable[Receiver]]]:
    async for make in receiver_pool():
        yield make


def fail_first(n: int, status: int = 500) -> Plan:
    return lambda _path, attempt: Reply(status if attempt <= n else 200)


def webhook_batch(uris: list[str], user_metadata: dict[str, object] | None = None, n: int = 3,
                  model: str = "models/echo", include_output: bool = False) -> batch_pb2.BatchGenerateContentRequest:
    meta = struct_pb2.Struct()
    if user_metadata:
        meta.update(user_metadata)
    config = batch_pb2.WebhookConfig(uris=uris, user_metadata=meta if user_metadata else None,
                                     include_output=include_output)
    return generate_batch(n, model=model, webhook_config=config)


def valid_signature(hit: Hit, secret: str = SECRET) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), hit.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(hit.headers.get("X-Longbatch-Signature", ""), expected)


def delivery_rows(data_dir: Path) -> list[tuple[str, str, int, str | None]]:
    """(uri, status, attempts, last_error) of every stored delivery."""
    db = sqlite3.connect(data_dir / "longbatch.db")
    try:
        return db.execute(
            "SELECT uri, status, attempts, last_error FROM webhook_deliveries ORDER BY uri").fetchall()
    finally:
        db.close()


async def wait_rows(data_dir: Path, check: Callable[[list[tuple[str, str, int, str | None]]], bool],
                    within: float = 10.0) -> list[tuple[str, str, int, str | None]]:
    deadline = time.monotonic() + within
    while True:
        rows = delivery_rows(data_dir)
        if check(rows):
            return rows
        assert time.monotonic() < deadline, f"delivery rows never matched: {rows}"
        await asyncio.sleep(0.05)


def fast(**kw: object) -> WebhookSettings:
    """Quick retries, and the receivers' 127.0.0.1 allowed (``allow=()`` for none)."""
    settings: dict[str, object] = {"initial_backoff_s": 0.05, "max_backoff_s": 2.0, "timeout_s": 2.0,
                                   "max_attempts": 10, "allow": ("127.0.0.1",)}
    settings.update(kw)
    return WebhookSettings(**settings)  # type: ignore[arg-type]


async def test_signed_notification_is_retried_until_accepted(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="longbatch.webhooks")
    rx = await receivers(lambda path, n: Reply(500 if path == "/a" and n <= 2 else 200))
    server = await make_server(ServerConfig(webhook_secret=SECRET, webhooks=fast(initial_backoff_s=0.3)))
    stubs = Stubs.connect(server.target)
    try:
        uris = [f"{rx.base}/a", f"{rx.base}/a", f"{rx.base}/b?token=hidden-from-logs"]  # a repeat is sent once
        op = await stubs.batches.BatchGenerateContent(webhook_batch(uris, {"job": "nightly", "n": 2}))
        op = await wait_done(stubs, op.name, within=15)
        meta = metadata_of(op)
        # The batch is done at once: two failures and their backoff (>= 0.7 s)
        # cannot have passed yet, so it did not wait for the webhook.
        assert meta.state == SUCCEEDED
        assert all(h.answered != 200 for h in rx.on("/a"))

        await rx.wait_for(lambda: len(rx.on("/a")) >= 3 and len(rx.on("/b")) >= 1)
        a, b = rx.on("/a"), rx.on("/b")
        assert [h.answered for h in a] == [500, 500, 200]
        assert len(b) == 1 and b[0].query == "token=hidden-from-logs"
        for hit in [*a, *b]:
            assert valid_signature(hit)
            assert not valid_signature(hit, "another key")
            assert hit.headers["Content-Type"] == "application/json"
            assert hit.headers["X-Longbatch-Timestamp"].isdigit()
        # One delivery per URI: the same id and the same signed bytes on every attempt.
        assert len({h.headers["X-Longbatch-Delivery"] for h in a}) == 1
        assert a[0].headers["X-Longbatch-Delivery"] != b[0].headers["X-Longbatch-Delivery"]
        assert len({h.body for h in [*a, *b]}) == 1
        assert a[0].json() == {
            "name": op.name,
            "state": "BATCH_STATE_SUCCEEDED",
            "batch_stats": {"requestCount": "3", "successfulRequestCount": "3", "failedRequestCount": "0",
                            "pendingRequestCount": "0", "cancelledRequestCount": "0", "expiredRequestCount": "0"},
            "end_time": meta.end_time.ToJsonString(),
            "user_metadata": {"job": "nightly", "n": 2},
        }
        # Exponential backoff: 0.3 s then 0.6 s, each jittered down by at most 20 %.
        gap1, gap2 = a[1].at - a[0].at, a[2].at - a[1].at
        assert 0.23 <= gap1 and 0.47 <= gap2 and gap2 > gap1, (gap1, gap2)

        rows = await wait_rows(server.data_dir, lambda rows: all(r[1] == "delivered" for r in rows))
        assert [(r[1], r[2]) for r in rows] == [("delivered", 3), ("delivered", 1)]
        # The batch itself never changed.
        got = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
        assert got.done and metadata_of(got).state == SUCCEEDED
    finally:
        await stubs.channel.close()
    logs = "\n".join(r.getMessage() for r in caplog.records if r.name == "longbatch.webhooks")
    batch_id = op.name.removeprefix("batches/")
    for attempt, outcome in ((1, "failed (HTTP 500)"), (2, "failed (HTTP 500)"), (3, "delivered")):
        assert f"webhook batches/{batch_id} -> {rx.base}/a: attempt {attempt} {outcome}" in logs
    assert f"{rx.base}/b: attempt 1 delivered" in logs
    assert "hidden-from-logs" not in logs and SECRET not in logs


async def test_receiver_that_always_fails_gives_up_and_batch_is_unaffected(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    rx = await receivers(lambda path, _n: Reply(200 if path == "/later" else 500))
    server = await make_server(ServerConfig(webhooks=fast(max_attempts=3)))  # no secret: unsigned
    stubs = Stubs.connect(server.target)
    try:
        op = await stubs.batches.BatchGenerateContent(webhook_batch([f"{rx.base}/hook"]))
        op = await wait_done(stubs, op.name, within=15)
        assert metadata_of(op).state == SUCCEEDED
        rows = await wait_rows(server.data_dir, lambda rows: bool(rows) and rows[0][1] == "failed")
        assert rows == [(f"{rx.base}/hook", "failed", 3, "HTTP 500")]
        # Nothing after the last attempt: a later batch's delivery is read by
        # a due-query made after /hook failed, and is sent alone.
        later = await stubs.batches.BatchGenerateContent(webhook_batch([f"{rx.base}/later"]))
        await wait_done(stubs, later.name, within=15)
        await rx.wait_for(lambda: len(rx.on("/later")) == 1)
        await wait_rows(server.data_dir, lambda rows: [r[1] for r in rows] == ["failed", "delivered"])  # by uri
        assert len(rx.on("/hook")) == 3
        assert "X-Longbatch-Signature" not in rx.hits[0].headers
        got = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
        assert got.done and metadata_of(got).state == SUCCEEDED and got.HasField("response")
    finally:
        await stubs.channel.close()


async def test_cancelled_batch_notifies(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    rx = await receivers(lambda _path, _n: Reply(204))
    server = await make_server(ServerConfig(webhook_secret=SECRET, webhooks=fast()))
    stubs = Stubs.connect(server.target)
    try:
        op = await stubs.batches.BatchGenerateContent(
            webhook_batch([f"{rx.base}/cancelled"], {"k": "v"}, n=2000, model="models/echo-slow"))
        await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
        op = await wait_done(stubs, op.name, within=15)
        assert metadata_of(op).state == batch_pb2.BatchState.BATCH_STATE_CANCELLED
        await rx.wait_for(lambda: len(rx.hits) >= 1)
        body = rx.hits[0].json()
        assert body["state"] == "BATCH_STATE_CANCELLED" and body["user_metadata"] == {"k": "v"}
        stats = body["batch_stats"]
        assert isinstance(stats, dict) and int(stats["cancelledRequestCount"]) > 0
        assert valid_signature(rx.hits[0])
        await wait_rows(server.data_dir, lambda rows: [r[1] for r in rows] == ["delivered"])
    finally:
        await stubs.channel.close()


async def test_timeout_and_retry_after_are_retried(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    replies = {1: Reply(200, delay=1.0), 2: Reply(503, {"Retry-After": "1"})}
    rx = await receivers(lambda _path, n: replies.get(n, Reply(200)))
    server = await make_server(ServerConfig(webhooks=fast(timeout_s=0.3)))
    stubs = Stubs.connect(server.target)
    try:
        op = await stubs.batches.BatchGenerateContent(webhook_batch([f"{rx.base}/slow"]))
        await wait_done(stubs, op.name, within=15)
        await rx.wait_for(lambda: len(rx.hits) >= 3)
        first, second, third = rx.hits[:3]
        assert second.at - first.at >= 0.3  # the first attempt timed out, then was retried
        assert third.at - second.at >= 0.95  # Retry-After: 1 beats a 0.1 s backoff
        rows = await wait_rows(server.data_dir, lambda rows: [r[1] for r in rows] == ["delivered"])
        assert rows[0][2] == 3
    finally:
        await stubs.channel.close()


async def test_done_batch_without_deliveries_is_enqueued_on_start(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]], tmp_path: Path
) -> None:
    """The process may die between marking a batch done and storing its
    deliveries: the next start finds such batches."""
    rx = await receivers(lambda _path, _n: Reply(200))
    data = tmp_path / "gap"
    first = await make_server(ServerConfig(webhook_secret=SECRET, webhooks=fast()), data_dir=data)
    stubs = Stubs.connect(first.target)
    try:
        op = await stubs.batches.BatchGenerateContent(webhook_batch([f"{rx.base}/gap"]))
        await wait_done(stubs, op.name, within=15)
        await rx.wait_for(lambda: len(rx.hits) == 1)
    finally:
        await stubs.channel.close()
    await first.running.stop(grace_s=1.0)
    db = sqlite3.connect(data / "longbatch.db")
    try:
        with db:
            db.execute("DELETE FROM webhook_deliveries")  # as if the enqueue never happened
    finally:
        db.close()
    await make_server(ServerConfig(webhook_secret=SECRET, webhooks=fast()), data_dir=data)
    await rx.wait_for(lambda: len(rx.hits) == 2)
    assert rx.hits[1].json()["name"] == op.name and valid_signature(rx.hits[1])
    await wait_rows(data, lambda rows: [r[1] for r in rows] == ["delivered"])


@pytest.mark.timeout(120)
async def test_pending_delivery_survives_sigkill(
    tmp_path: Path, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    accept = False
    rx = await receivers(lambda _path, _n: Reply(200 if accept else 500))
    config = tmp_path / "longbatch.toml"
    config.write_text(f'[webhooks]\nsecret = "{SECRET}"\nmax_attempts = 1000\ninitial_backoff = "100ms"\n'
                      'max_backoff = "200ms"\ntimeout = "2s"\nallow = ["127.0.0.1"]\n')
    data = tmp_path / "data"
    proc = ServerProcess(data, config)
    try:
        stubs = Stubs.connect(await proc.start())
        op = await stubs.batches.BatchGenerateContent(webhook_batch([f"{rx.base}/survive"], {"run": 7}))
        assert metadata_of(await wait_done(stubs, op.name, within=15)).state == SUCCEEDED
        await rx.wait_for(lambda: len(rx.hits) >= 2)
        await stubs.channel.close()
        await proc.kill()
        before = len(rx.hits)
        assert all(h.answered == 500 for h in rx.hits)
        assert [r[1] for r in delivery_rows(data)] == ["pending"]

        accept = True
        stubs = Stubs.connect(await proc.start())
        await rx.wait_for(lambda: any(h.answered == 200 for h in rx.hits))
        delivered = next(h for h in rx.hits if h.answered == 200)
        assert rx.hits.index(delivered) >= before
        assert delivered.headers["X-Longbatch-Delivery"] == rx.hits[0].headers["X-Longbatch-Delivery"]
        assert delivered.body == rx.hits[0].body and valid_signature(delivered)
        assert delivered.json()["user_metadata"] == {"run": 7}
        await wait_rows(data, lambda rows: [r[1] for r in rows] == ["delivered"])
        await stubs.channel.close()
        assert await proc.terminate() == 0
    finally:
        await proc.ensure_dead()


def test_config_webhooks_section() -> None:
    config = config_from_dict({"webhooks": {"secret": "hush-hush-42", "max_attempts": 5, "initial_backoff": "100ms",
                                            "max_backoff": "1m", "timeout": "2s", "max_concurrency": 2,
                                            "allow": ["10.1.2.0/24", "hooks.internal", "127.0.0.1"]}})
    assert config.webhook_secret == "hush-hush-42"
    assert config.webhooks == WebhookSettings(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=60.0,
                                              timeout_s=2.0, max_concurrency=2,
                                              allow=("10.1.2.0/24", "hooks.internal", "127.0.0.1"))
    assert "hush-hush-42" not in repr(config)  # the signing key never reaches a log
    assert config_from_dict({}).webhooks == WebhookSettings()
    for bad in ({"max_attempts": 0}, {"timeout": "0s"}, {"retries": 3}, {"max_attempts": "3"},
                {"allow": ["10.0.0.1/8"]}, {"allow": "127.0.0.1"}):
        with pytest.raises(ConfigError):
            config_from_dict({"webhooks": bad})


def test_helpers() -> None:
    assert loggable_uri("https://user:pw@example.com:8443/h/x?token=1#f") == "https://example.com:8443/h/x"
    assert loggable_uri("http://[::1]:9/x") == "http://[::1]:9/x"
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def _metadata_of_size(size: int) -> dict[str, object]:
    """user_metadata whose serialized Struct is ``size`` bytes or a few less."""
    n = size
    while True:
        meta = struct_pb2.Struct()
        meta.update({"blob": "x" * n})
        if meta.ByteSize() <= size:
            return {"blob": "x" * n}
        n -= 1


async def test_user_metadata_is_capped(make_server: MakeServer) -> None:
    server = await make_server(ServerConfig(webhooks=fast()))
    stubs = Stubs.connect(server.target)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stubs.batches.BatchGenerateContent(webhook_batch(["https://hooks.example.com/done"],
                                                                   _metadata_of_size(MAX_USER_METADATA_BYTES + 100)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        got = details(e.value)
        assert [f for f, _ in got.violations] == ["batch.webhook_config.user_metadata"]
        assert f"the limit is {MAX_USER_METADATA_BYTES}" in got.violations[0][1]
        assert delivery_rows(server.data_dir) == []
    finally:
        await stubs.channel.close()


async def test_deleting_a_batch_deletes_its_deliveries(make_server: MakeServer, fake_dns: FakeDNS) -> None:
    """Ten URIs with the largest user_metadata: every stored body goes with
    the batch, pending or not; another batch's deliveries stay."""
    # Names the test DNS does not know: each attempt fails, nothing is sent,
    # and the deliveries stay pending, retried every 5 s or so.
    server = await make_server(ServerConfig(webhooks=fast(initial_backoff_s=5.0, max_backoff_s=5.0)))
    stubs = Stubs.connect(server.target)
    db = sqlite3.connect(server.data_dir / "longbatch.db")

    def stored(batch_id: str) -> tuple[int, int]:
        count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM webhook_deliveries "
                                 "WHERE batch_id = ?", (batch_id,)).fetchone()
        return int(count), int(size)

    try:
        meta = _metadata_of_size(MAX_USER_METADATA_BYTES)
        uris = [f"http://receiver-{i}.test/hook" for i in range(MAX_WEBHOOKS)]
        doomed = await stubs.batches.BatchGenerateContent(webhook_batch(uris, meta))
        kept = await stubs.batches.BatchGenerateContent(webhook_batch(["http://other.test/hook"]))
        doomed_id, kept_id = doomed.name.removeprefix("batches/"), kept.name.removeprefix("batches/")
        for op in (doomed, kept):
            await wait_done(stubs, op.name, within=15)
        rows = await wait_rows(server.data_dir, lambda rows: len(rows) == MAX_WEBHOOKS + 1
                               and all(r[2] >= 1 for r in rows))
        assert {r[1] for r in rows} == {"pending"}
        count, size = stored(doomed_id)
        assert count == MAX_WEBHOOKS and size > MAX_WEBHOOKS * (MAX_USER_METADATA_BYTES - 100)

        await stubs.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=doomed.name))
        # In the delete's own transaction: gone as soon as it answers.
        assert stored(doomed_id) == (0, 0)
        assert stored(kept_id)[0] == 1
        assert set(fake_dns.asked) == {*(u.removeprefix("http://").removesuffix("/hook") for u in uris), "other.test"}
    finally:
        db.close()
        await stubs.channel.close()


# -- include_output ------------------------------------------------------------


def stored_bodies(data_dir: Path) -> list[bytes]:
    db = sqlite3.connect(data_dir / "longbatch.db")
    try:
        return [bytes(r[0]) for r in db.execute("SELECT body FROM webhook_deliveries ORDER BY uri")]
    finally:
        db.close()


def output_of(op: operations_pb2.Operation) -> batch_pb2.GenerateContentBatchOutput:
    """What GetOperation's ``metadata.output`` holds for a generation batch."""
    meta = metadata_of(op)
    assert isinstance(meta, batch_pb2.GenerateContentBatch)
    return meta.output


async def test_include_output_sends_inline_responses_in_order(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    rx = await receivers(lambda _path, _n: Reply(200))
    server = await make_server(ServerConfig(webhook_secret=SECRET, webhooks=fast()))
    stubs = Stubs.connect(server.target)
    try:
        op = await stubs.batches.BatchGenerateContent(
            webhook_batch([f"{rx.base}/out"], {"job": "with-output"}, n=7, include_output=True))
        op = await wait_done(stubs, op.name, within=15)
        await rx.wait_for(lambda: len(rx.hits) == 1)
        hit = rx.hits[0]
        assert valid_signature(hit) and not valid_signature(hit, "another key")
        body = hit.json()
        # The usual keys, as without include_output, and the output last.
        assert list(body) == ["name", "state", "batch_stats", "end_time", "user_metadata", "output"]
        assert body["name"] == op.name and body["state"] == "BATCH_STATE_SUCCEEDED"
        assert body["user_metadata"] == {"job": "with-output"}
        output = body["output"]
        assert isinstance(output, dict) and list(output) == ["inlinedResponses"]
        entries = output["inlinedResponses"]["inlinedResponses"]
        assert [e["metadata"] for e in entries] == [{"i": i} for i in range(7)]
        assert [e["response"]["candidates"][0]["content"]["parts"] for e in entries] == [
            [{"text": f"prompt {i}"}] for i in range(7)]
        # Proto JSON of exactly what GetOperation holds (camelCase, like batch_stats).
        assert "inlined_responses" not in hit.body.decode()
        parsed = json_format.ParseDict(output, batch_pb2.GenerateContentBatchOutput())
        assert parsed == output_of(op) and len(parsed.inlined_responses.inlined_responses) == 7
        # Stored once, as sent: a retry would send (and sign) these bytes again.
        assert stored_bodies(server.data_dir) == [hit.body]
        await wait_rows(server.data_dir, lambda rows: [r[1] for r in rows] == ["delivered"])
    finally:
        await stubs.channel.close()


async def test_include_output_of_an_embedding_batch(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    rx = await receivers(lambda _path, _n: Reply(200))
    server = await make_server(ServerConfig(webhook_secret=SECRET, webhooks=fast()))
    stubs = Stubs.connect(server.target)
    try:
        req = embed_batch(4, dim=8)
        req.batch.webhook_config.CopyFrom(batch_pb2.WebhookConfig(uris=[f"{rx.base}/embed"], include_output=True))
        op = await wait_done(stubs, (await stubs.batches.AsyncBatchEmbedContent(req)).name, within=15)
        meta = metadata_of(op)
        assert isinstance(meta, batch_pb2.EmbedContentBatch)
        await rx.wait_for(lambda: len(rx.hits) == 1)
        assert valid_signature(rx.hits[0])
        output = rx.hits[0].json()["output"]
        assert isinstance(output, dict)
        entries = output["inlinedResponses"]["inlinedResponses"]
        assert [len(e["response"]["embedding"]["values"]) for e in entries] == [8] * 4
        assert json_format.ParseDict(output, batch_pb2.EmbedContentBatchOutput()) == meta.output
    finally:
        await stubs.channel.close()


async def test_include_output_names_the_responses_file(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    rx = await receivers(lambda _path, _n: Reply(200))
    # An output this small's double would not fit: it goes to a responses file.
    server = await make_server(ServerConfig(webhook_secret=SECRET, webhooks=fast(),
                                            limits=Limits(max_inline_output=1000)))
    stubs = Stubs.connect(server.target)
    files = file_pb2_grpc.FileServiceStub(stubs.channel)
    try:
        op = await stubs.batches.BatchGenerateContent(webhook_batch([f"{rx.base}/file"], n=40, include_output=True))
        op = await wait_done(stubs, op.name, within=15)
        name = output_of(op).responses_file
        assert name.startswith("files/")
        await rx.wait_for(lambda: len(rx.hits) == 1)
        assert valid_signature(rx.hits[0])
        body = rx.hits[0].json()
        assert body["output"] == {"responsesFile": name} and "output_omitted" not in body
        data = b"".join([r.data async for r in files.DownloadFile(file_pb2.DownloadFileRequest(name=name))])
        lines = [json.loads(line) for line in data.splitlines()]
        assert [(line["index"], line["response"]["candidates"][0]["content"]["parts"][0]["text"])
                for line in lines] == [(i, f"prompt {i}") for i in range(40)]
    finally:
        await stubs.channel.close()


async def test_without_include_output_the_body_has_no_output(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    rx = await receivers(lambda _path, _n: Reply(200))
    # Twice an output plus 64 KiB of headroom must fit: 2 responses do, 200 do not.
    server = await make_server(ServerConfig(webhook_secret=SECRET, webhooks=fast(),
                                            limits=Limits(max_inline_output=70_000)))
    stubs = Stubs.connect(server.target)
    try:
        inline = await stubs.batches.BatchGenerateContent(webhook_batch([f"{rx.base}/inline"], n=2))
        to_file = await stubs.batches.BatchGenerateContent(webhook_batch([f"{rx.base}/file"], n=200))
        inline_op = await wait_done(stubs, inline.name, within=15)
        file_op = await wait_done(stubs, to_file.name, within=15)
        assert output_of(inline_op).HasField("inlined_responses") and output_of(file_op).responses_file
        await rx.wait_for(lambda: len(rx.on("/inline")) == 1 and len(rx.on("/file")) == 1)
        for hit in rx.hits:
            assert valid_signature(hit)
            assert list(hit.json()) == ["name", "state", "batch_stats", "end_time", "user_metadata"]
            assert b"inlinedResponses" not in hit.body and b"responsesFile" not in hit.body
    finally:
        await stubs.channel.close()


async def test_include_output_of_a_cancelled_batch_keeps_finished_results(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    rx = await receivers(lambda _path, _n: Reply(200))
    server = await make_server(ServerConfig(webhook_secret=SECRET, webhooks=fast()))
    stubs = Stubs.connect(server.target)
    try:
        op = await stubs.batches.BatchGenerateContent(
            webhook_batch([f"{rx.base}/cancelled"], n=2000, model="models/echo-slow", include_output=True))

        async def some_ran() -> bool:
            got = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
            return metadata_of(got).batch_stats.successful_request_count > 0

        await eventually(some_ran, within=15, what="a request of the batch finished")
        await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
        op = await wait_done(stubs, op.name, within=15)
        meta = metadata_of(op)
        assert meta.state == batch_pb2.BatchState.BATCH_STATE_CANCELLED
        ok, cancelled = meta.batch_stats.successful_request_count, meta.batch_stats.cancelled_request_count
        assert ok > 0 and cancelled > 0 and ok + cancelled == 2000
        await rx.wait_for(lambda: len(rx.hits) == 1)
        assert valid_signature(rx.hits[0])
        body = rx.hits[0].json()
        assert body["state"] == "BATCH_STATE_CANCELLED"
        output = body["output"]
        assert isinstance(output, dict)
        entries = output["inlinedResponses"]["inlinedResponses"]
        # Every request, in order: the finished ones' responses, then the
        # rest as the CANCELLED errors GetOperation shows.
        assert len(entries) == 2000 and [e["metadata"] for e in entries] == [{"i": i} for i in range(2000)]
        assert sum("response" in e for e in entries) == ok
        assert {e["error"]["code"] for e in entries if "error" in e} == {1}
        assert json_format.ParseDict(output, batch_pb2.GenerateContentBatchOutput()) == output_of(op)
    finally:
        await stubs.channel.close()


async def test_include_output_of_a_failed_batch_has_none(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    rx = await receivers(lambda _path, _n: Reply(200))
    server = await make_server(ServerConfig(webhook_secret=SECRET, webhooks=fast()))
    stubs = Stubs.connect(server.target)
    files = file_pb2_grpc.FileServiceStub(stubs.channel)
    try:
        async def bad_input() -> AsyncIterator[file_pb2.CreateFileRequest]:
            yield file_pb2.CreateFileRequest(file=file_pb2.File(display_name="bad.jsonl"))
            yield file_pb2.CreateFileRequest(data=b'{"request": {"contents": []}}\nnot json\n')

        uploaded = await files.CreateFile(bad_input())
        op = await stubs.batches.BatchGenerateContent(batch_pb2.BatchGenerateContentRequest(
            batch=batch_pb2.GenerateContentBatch(
                model="models/echo", input_config=batch_pb2.InputConfig(file_name=uploaded.name),
                webhook_config=batch_pb2.WebhookConfig(uris=[f"{rx.base}/failed"], include_output=True))))
        op = await wait_done(stubs, op.name, within=15)
        assert metadata_of(op).state == batch_pb2.BatchState.BATCH_STATE_FAILED
        assert not metadata_of(op).HasField("output") and op.HasField("error")
        await rx.wait_for(lambda: len(rx.hits) == 1)
        assert valid_signature(rx.hits[0])
        body = rx.hits[0].json()
        assert body["state"] == "BATCH_STATE_FAILED"
        assert list(body) == ["name", "state", "batch_stats", "end_time", "user_metadata"]
    finally:
        await stubs.channel.close()


def _long_prompt_batch(uri: str, n: int, chars: int) -> batch_pb2.BatchGenerateContentRequest:
    """``n`` prompts of ``chars`` characters each (echoed back), include_output set."""
    reqs = [batch_pb2.InlinedRequest(request=content_pb2.GenerateContentRequest(contents=[
        content_pb2.Content(parts=[content_pb2.Part(text=f"{i:04d}" + "x" * (chars - 4))])])) for i in range(n)]
    return batch_pb2.BatchGenerateContentRequest(batch=batch_pb2.GenerateContentBatch(
        model="models/echo", input_config=batch_pb2.InputConfig(requests=batch_pb2.InlinedRequests(requests=reqs)),
        webhook_config=batch_pb2.WebhookConfig(uris=[uri], include_output=True)))


async def test_output_too_large_for_a_body_is_omitted(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    """An inline output may be larger than a webhook body may be: up to
    MAX_BODY_WITH_OUTPUT it is sent (and the receiver's stock 1 MiB limit
    takes it); beyond, the body says it was left out."""
    rx = await receivers(lambda _path, _n: Reply(200))
    server = await make_server(ServerConfig(webhook_secret=SECRET, webhooks=fast(),
                                            limits=Limits(max_inline_output=16 << 20)))
    stubs = Stubs.connect(server.target)
    try:
        chars = 100_000
        fits = await stubs.batches.BatchGenerateContent(_long_prompt_batch(f"{rx.base}/fits", 10, chars))
        over = await stubs.batches.BatchGenerateContent(_long_prompt_batch(f"{rx.base}/over", 11, chars))
        for op in (fits, over):
            assert output_of(await wait_done(stubs, op.name, within=30)).HasField("inlined_responses")
        await rx.wait_for(lambda: len(rx.on("/fits")) == 1 and len(rx.on("/over")) == 1)

        sent = rx.on("/fits")[0]
        assert 10 * chars < len(sent.body) <= MAX_BODY_WITH_OUTPUT and valid_signature(sent)
        output = sent.json()["output"]
        assert isinstance(output, dict)
        texts = [e["response"]["candidates"][0]["content"]["parts"][0]["text"]
                 for e in output["inlinedResponses"]["inlinedResponses"]]
        assert [t[:4] for t in texts] == [f"{i:04d}" for i in range(10)] and {len(t) for t in texts} == {chars}

        omitted = rx.on("/over")[0]
        assert valid_signature(omitted) and len(omitted.body) < 4096
        body = omitted.json()
        assert "output" not in body and body["output_omitted"] == OUTPUT_TOO_LARGE
        assert body["state"] == "BATCH_STATE_SUCCEEDED"
        # What is stored is what was sent: no megabytes kept per URI.
        assert sorted(stored_bodies(server.data_dir), key=len) == [omitted.body, sent.body]
    finally:
        await stubs.channel.close()


class _Results:
    """A store that has only result rows (all ``notification`` reads)."""

    def __init__(self, rows: list[ResultRow]) -> None:
        self.rows = rows
        self.read = 0

    async def results(self, batch_id: str, start_idx: int, limit: int, *, to_first_pending: bool = True
                      ) -> list[ResultRow]:
        page = self.rows[start_idx:start_idx + limit]
        self.read += len(page)
        return page


def _done_batch(n: int, state: State = State.EXPIRED) -> Batch:
    config = batch_pb2.WebhookConfig(uris=["https://hooks.example.com/x"], include_output=True)
    return Batch(id="b1", seq=1, tenant="t", kind=BatchKind.GENERATE, model="models/echo", display_name="",
                 priority=0, state=state, done=True, create_time_us=1_000_000, update_time_us=2_000_000,
                 end_time_us=2_000_000, input_file=None, request_count=n, succeeded=n // 3, failed=n // 3,
                 cancelled=0, expired=n - 2 * (n // 3), error=None, output_file=None,
                 webhook=config.SerializeToString(), ingested=True)


def _rows(n: int) -> list[ResultRow]:
    """Responses, errors (one with details) and unfinished requests, some with metadata."""
    out = []
    for i in range(n):
        meta = struct_pb2.Struct()
        meta.update({"i": i, "tags": ["a", "b"]})
        metadata = meta.SerializeToString() if i % 2 else None
        if i % 3 == 0:
            reply = content_pb2.GenerateContentResponse(candidates=[content_pb2.Candidate(
                content=content_pb2.Content(parts=[content_pb2.Part(text=f"answer {i}")], role="model"))])
            out.append(ResultRow(i, "", metadata, ItemStatus.SUCCEEDED, reply.SerializeToString()))
        elif i % 3 == 1:
            error = status_pb2.Status(code=8, message=f"quota {i}")
            if i % 2:
                error.details.add().Pack(struct_pb2.Value(string_value="detail"))
            out.append(ResultRow(i, "", metadata, ItemStatus.FAILED, error.SerializeToString()))
        else:
            out.append(ResultRow(i, "", metadata, ItemStatus.PENDING, b""))
    return out


async def test_notification_output_is_exact_proto_json_within_the_body_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The output is the proto JSON of what GetOperation builds from the same
    rows (unfinished requests reading as the batch's end), over several
    rendering chunks; a body one byte over the limit goes without it, and
    reading stops once the limit is passed."""
    n = 2500
    batch, rows = _done_batch(n), _rows(n)
    store = _Results(rows)
    body = await webhooks.notification(cast(Store, store), batch)
    rest = closed_item(batch.state)
    closed = [r if r.status is not ItemStatus.PENDING else ResultRow(r.idx, r.key, r.metadata, *rest) for r in rows]
    expected = batch_pb2.GenerateContentBatchOutput.FromString(inline_output(closed))
    got = orjson.loads(body)
    assert json_format.ParseDict(got["output"], batch_pb2.GenerateContentBatchOutput()) == expected
    assert got["output"] == json_format.MessageToDict(expected)
    assert body == webhooks.notification_body(batch, orjson.dumps(got["output"]))
    assert [e["error"]["code"] for e in got["output"]["inlinedResponses"]["inlinedResponses"][2::3]] == [4] * (n // 3)

    monkeypatch.setattr(webhooks, "MAX_BODY_WITH_OUTPUT", len(body))
    assert await webhooks.notification(cast(Store, _Results(rows)), batch) == body
    monkeypatch.setattr(webhooks, "MAX_BODY_WITH_OUTPUT", len(body) - 1)
    assert orjson.loads(await webhooks.notification(cast(Store, _Results(rows)), batch)) == {
        **{k: v for k, v in got.items() if k != "output"}, "output_omitted": OUTPUT_TOO_LARGE}
    monkeypatch.setattr(webhooks, "MAX_BODY_WITH_OUTPUT", len(body) // 10)
    early = _Results(rows)
    assert b'"output_omitted"' in await webhooks.notification(cast(Store, early), batch)
    assert early.read < n  # the rows past the limit were never read
