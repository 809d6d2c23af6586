"""Work that one replica at a time may do, with two replicas on one database.

Each case runs two instances of a job over two store objects sharing one
database, as two replicas would: an SQLite file opened twice, and one
PostgreSQL database (tests/pg.py). Retention steps and file expiry sweeps
never overlap (the stores' leases); two webhook dispatchers deliver each
delivery exactly once (claims), to a receiver on 127.0.0.1. Every wait is
bounded and waits on a condition.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pg import pg_database, pg_url, store_kinds  # noqa: F401  (fixtures, by name)

from longbatch.server.config import WebhookSettings
from longbatch.server.domain import BatchKind, ItemStatus, NewBatch, NewItem, State, StoredFile, now_us
from longbatch.server.file_manager import FileExpiry
from longbatch.server.pg_store import PostgresStore
from longbatch.server.retention import RetentionPurge
from longbatch.server.sqlite_store import SQLiteStore
from longbatch.server.store import Store, WebhookDelivery
from longbatch.server.webhooks import DELIVERY_HEADER, WebhookDispatcher

from support import eventually


@pytest.fixture(params=store_kinds())
async def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores over one database."""
    if request.param == "sqlite":
        pair: tuple[Store, Store] = (SQLiteStore(tmp_path / "db.sqlite"), SQLiteStore(tmp_path / "db.sqlite"))
    else:
        url = request.getfixturevalue("pg_url")
        pair = (PostgresStore(url), PostgresStore(url))
    for store in pair:
        await store.open()
    yield pair
    for store in pair:
        await store.close()


class Overlap:
    """Counts calls of one store method in flight at once, across stores."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.calls = 0

    def watch(self, store: Store, method: str) -> None:
        real: Callable[..., Awaitable[Any]] = getattr(store, method)

        async def watched(*args: Any, **kw: Any) -> Any:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
            try:
                await asyncio.sleep(0)  # let the other replica's task run while this call is open
                return await real(*args, **kw)
            finally:
                self.now -= 1

        setattr(store, method, watched)


class Forgets:
    """Outputs and FileBytes as retention and expiry use them: what they were told to forget."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def forget(self, batch_id: str) -> None:
        self.ids.append(batch_id)

    async def remove(self, file_ids: Iterable[str]) -> None:
        self.ids.extend(file_ids)


async def done_batches(store: Store, count: int, requests: int) -> None:
    for i in range(count):
        batch = NewBatch(id=f"b{i}", tenant="t", kind=BatchKind.GENERATE, model="models/echo", display_name="",
                         priority=0, input_file=None, webhook=None, request_id=None)
        await store.create_batch(batch, [NewItem(j, f"k{j}", None, b"p") for j in range(requests)], 0)
        await store.close_batch(f"b{i}", State.CANCELLED, None, ItemStatus.CANCELLED)
        await store.mark_done(f"b{i}", None)


async def test_two_retention_purges_never_step_at_once(replicas: tuple[Store, Store]) -> None:
    await done_batches(replicas[0], 24, 4)
    overlap = Overlap()
    outputs = Forgets()
    purges = []
    for store in replicas:
        overlap.watch(store, "purge_done_batches")
        purges.append(RetentionPurge(store, Forgets(), outputs, retention_s=0,  # type: ignore[arg-type]
                                     max_batches=2, max_requests=5))
    swept = 0
    async with asyncio.timeout(60):
        while len(outputs.ids) < 24:
            swept += sum(await asyncio.gather(*(p.sweep() for p in purges for _ in range(3))))
    assert overlap.most == 1 and overlap.calls >= 12
    assert swept == 24 and sorted(outputs.ids) == sorted(f"b{i}" for i in range(24))  # each once
    assert await replicas[1].get_batch(None, "b0") is None
    # The orphan sweep at start takes the same lease: one of two at a time.
    for store in replicas:
        overlap.watch(store, "delete_orphan_webhook_deliveries")
    overlap.most = 0
    await asyncio.gather(*(p.delete_orphan_deliveries() for p in purges for _ in range(3)))
    assert overlap.most == 1


async def test_two_file_expiries_never_sweep_at_once(replicas: tuple[Store, Store]) -> None:
    for i in range(20):
        await replicas[i % 2].add_file(StoredFile(
            id=f"f{i}", seq=0, tenant="t", display_name="", mime_type="application/jsonl", size_bytes=1,
            sha256=b"", create_time_us=0, expire_time_us=1, source="uploaded"))
    overlap = Overlap()
    bytes_deleted = Forgets()
    expiries = []
    for store in replicas:
        overlap.watch(store, "delete_file")
        expiries.append(FileExpiry(store, bytes_deleted, file_ttl_s=1))  # type: ignore[arg-type]
    deleted = 0
    async with asyncio.timeout(60):
        while len(bytes_deleted.ids) < 20:
            deleted += sum(await asyncio.gather(*(e.sweep() for e in expiries for _ in range(3))))
    assert overlap.most == 1 and deleted == 20
    assert sorted(bytes_deleted.ids) == sorted(f"f{i}" for i in range(20))  # each file's bytes once
    assert await replicas[0].list_files("t", None, 100) == []


class Receiver:
    """An HTTP server on 127.0.0.1:0 recording each POST by delivery id and
    how many POSTs of one delivery were open at once."""

    def __init__(self) -> None:
        self.answers: dict[str, list[int]] = collections.defaultdict(list)
        self.open: collections.Counter[str] = collections.Counter()
        self.most_open = 0
        self.changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        delivery_id = request.headers[DELIVERY_HEADER]
        self.open[delivery_id] += 1
        self.most_open = max(self.most_open, self.open[delivery_id])
        try:
            await request.read()
            await asyncio.sleep(0.01)  # an answer takes a moment: dispatchers overlap meanwhile
            # Every fourth path fails its first attempt: its retry must not overlap either.
            status = 500 if request.path.endswith("/0") and not self.answers[delivery_id] else 200
            self.answers[delivery_id].append(status)
            return web.Response(status=status)
        finally:
            self.open[delivery_id] -= 1
            self.changed.set()

    def delivered(self) -> int:
        return sum(200 in a for a in self.answers.values())


@pytest.mark.usefixtures("loopback_only", "fake_dns")
async def test_two_dispatchers_deliver_each_delivery_exactly_once(replicas: tuple[Store, Store]) -> None:
    rx = Receiver()
    await rx.start()
    await done_batches(replicas[0], 8, 1)
    deliveries = [WebhookDelivery(id=f"d{b}-{u}", batch_id=f"b{b}", uri=f"{rx.base}/hook/{b}/{u}", body=b"{}",
                                  attempts=0, next_attempt_us=now_us()) for b in range(8) for u in range(4)]
    assert await replicas[0].add_webhook_deliveries(deliveries) == 32
    settings = WebhookSettings(initial_backoff_s=0.02, max_backoff_s=0.1, timeout_s=5.0, max_attempts=10,
                               max_concurrency=3, allow=("127.0.0.1",))
    dispatchers = [WebhookDispatcher(store, settings, "secret") for store in replicas]
    try:
        await asyncio.gather(*(d.start() for d in dispatchers))
        async with asyncio.timeout(30):
            while rx.delivered() < 32:
                rx.changed.clear()
                await rx.changed.wait()

        async def all_recorded() -> bool:
            return await replicas[1].next_webhook_time(0) is None

        await eventually(all_recorded, what="every delivery recorded as delivered")
    finally:
        await asyncio.gather(*(d.stop(grace_s=1.0) for d in dispatchers))
        await rx.stop()
    assert rx.most_open == 1
    assert {d.id for d in deliveries} == set(rx.answers)
    for delivery_id, answers in rx.answers.items():
        expected = [500, 200] if delivery_id.endswith("-0") else [200]
        assert answers == expected, delivery_id
    assert await replicas[0].due_webhook_deliveries(now_us() + 86_400_000_000, 100) == []
