"""Cancel and priority between replicas: two executors, each with its own
store object and BatchManager, over one database and one event bus.

On SQLite both stores open one file and share one in-process bus
(``LocalEvents``): that is what runs in one process today (two stores on one
file, as in test_singletons.py), not a supported deployment of two SQLite
servers. On PostgreSQL each replica has its own ``PgEvents`` (LISTEN/NOTIFY)
on one database, as two servers would. A batch runs on replica B; a cancel
through replica A's manager stops B's work within 2 s (B dispatches nothing
more of it), and B's WaitOperation returns within 1 s of the batch being
done. Every wait is bounded and waits on a condition.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pg import pg_database, pg_url, store_kinds  # noqa: F401  (fixtures, by name)

from longbatch.server.config import ExecutorSettings, Limits
from longbatch.server.domain import Batch, BatchKind, NewBatch, NewItem, State
from longbatch.server.events import BatchEvent, BatchEvents, EventKind, LocalEvents
from longbatch.server.executor import Executor, ModelRuntime
from longbatch.server.files import DiskFileBytes
from longbatch.server.manager import BatchManager
from longbatch.server.notifier import Notifier
from longbatch.server.outputs import Outputs
from longbatch.server.paging import PageTokens
from longbatch.server.pg_events import PgEvents
from longbatch.server.pg_store import PostgresStore
from longbatch.server.sqlite_store import SQLiteStore
from longbatch.server.store import Store
from longbatch.v1 import content_pb2

from support import eventually

MODEL = "models/gated"


class Gated:
    """A backend whose answers wait for ``gate``; it records what it was asked."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.asked: list[str] = []

    async def generate(self, request: content_pb2.GenerateContentRequest) -> content_pb2.GenerateContentResponse:
        self.asked.append(request.contents[0].parts[0].text)
        await self.gate.wait()
        return content_pb2.GenerateContentResponse(model_version="gated-1")

    async def embed(self, request: content_pb2.EmbedContentRequest) -> content_pb2.EmbedContentResponse:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


@dataclass
class Replica:
    store: Store
    bus: BatchEvents
    backend: Gated
    executor: Executor
    manager: BatchManager
    seen: list[BatchEvent]
    """The events this replica's bus delivered, after the executor's handler (subscribed first)."""


def payload(text: str) -> bytes:
    request = content_pb2.GenerateContentRequest(contents=[content_pb2.Content(parts=[content_pb2.Part(text=text)])])
    return request.SerializeToString()


@pytest.fixture(params=store_kinds())
async def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Replica, Replica]]:
    """Replicas A and B over one database and one bus; each model runs one request at a time."""
    shared = LocalEvents()
    built: list[Replica] = []
    cleanup: list[Callable[[], Awaitable[None]]] = []  # in reverse, also after a failed setup
    try:
        for name in ("a", "b"):
            store: Store
            bus: BatchEvents
            if request.param == "sqlite":
                store, bus = SQLiteStore(tmp_path / "db.sqlite"), shared
            else:
                url = request.getfixturevalue("pg_url")
                store, bus = PostgresStore(url), PgEvents(url)
            await store.open()
            cleanup.append(store.close)
            files = DiskFileBytes(tmp_path / f"files-{name}")
            files.prepare()
            outputs = Outputs(store, files, 1 << 20)
            cleanup.append(outputs.close)
            backend = Gated()
            runtime = ModelRuntime(name=MODEL, backend=backend, max_concurrency=1)
            executor = Executor(store, {MODEL: runtime}, ExecutorSettings(), outputs, bus, 3600.0)
            notifier = Notifier()
            bus.subscribe(notifier.on_event, notifier.on_resync)
            manager = BatchManager(store, executor, outputs, notifier, files, {}, Limits(), PageTokens(b"k" * 32))
            await bus.start()
            cleanup.append(bus.close)
            await executor.start()
            cleanup.append(functools.partial(executor.stop, 0.5))
            cleanup.append(functools.partial(opened, backend.gate))
            seen: list[BatchEvent] = []
            bus.subscribe(seen.append)  # after the executor's own subscription: called after it
            built.append(Replica(store, bus, backend, executor, manager, seen))
        yield built[0], built[1]
    finally:
        for step in reversed(cleanup):
            await step()


async def opened(gate: asyncio.Event) -> None:
    """Let a backend's calls end (before its executor stops)."""
    gate.set()


async def run_on(replica: Replica, batch_id: str, requests: int, priority: int = 0) -> Batch:
    """Create a batch through ``replica``'s store and schedule it on its executor (as its manager's create does)."""
    new = NewBatch(id=batch_id, tenant="t", kind=BatchKind.GENERATE, model=MODEL, display_name="",
                   priority=priority, input_file=None, webhook=None, request_id=None)
    batch, _ = await replica.store.create_batch(
        new, [NewItem(i, f"k{i}", None, payload(f"{batch_id}/{i}")) for i in range(requests)], 0)
    replica.executor.submit(batch)
    return batch


async def test_a_cancel_on_one_replica_stops_the_work_on_the_other(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    loop = asyncio.get_running_loop()
    await run_on(b, "x", 20)
    await eventually(lambda: len(b.backend.asked) == 1, within=5, what="B runs the batch's first request")
    waiting_on_b = asyncio.create_task(b.manager.wait("t", "x", 60.0))

    started = loop.time()
    await a.manager.cancel("t", "x")  # returns once recorded (and, here, done: nothing runs on A)
    cancelled = loop.time()
    assert (await a.manager.get("t", "x")).batch.state is State.CANCELLED
    # B heard the cancel (its executor's handler runs before `seen` gets it) within 2 s.
    await eventually(lambda: BatchEvent.cancel("x") in b.seen, within=2.0, what="B hears the cancel")
    assert loop.time() - started < 2.0
    view = await asyncio.wait_for(waiting_on_b, 1.0)  # B's WaitOperation: within 1 s of done
    assert view.batch.done and view.batch.state is State.CANCELLED
    assert loop.time() - cancelled < 1.0

    # The request B had in flight finishes; B takes no other request of it
    # (without the event it would run all 20, each result refused).
    b.backend.gate.set()
    await eventually(lambda: b.executor.model_load()[MODEL].dispatched == 0, within=5, what="B's worker is idle")
    await run_on(b, "y", 1)  # B works on: the next batch runs, and after it nothing more of x
    await eventually(lambda: "y/0" in b.backend.asked, within=5, what="B runs the next batch")
    await eventually(lambda: b.executor.model_load()[MODEL].dispatched == 0, within=5, what="B's worker is idle")
    assert b.backend.asked == ["x/0", "y/0"]
    assert a.backend.asked == []
    # The event reached A too, where the cancel had already stopped everything: a no-op.
    assert BatchEvent.cancel("x") in a.seen


async def test_a_priority_change_on_one_replica_reorders_the_other(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    await run_on(b, "first", 6)
    await eventually(lambda: b.backend.asked == ["first/0"], within=5, what="B runs the first batch")
    await run_on(b, "second", 3)
    await run_on(b, "third", 3)
    await a.manager.update("t", "third", "generate", None, 5)
    await eventually(lambda: BatchEvent.priority_changed("third", 5) in b.seen, within=2.0, what="B hears it")
    assert [e.kind for e in a.seen] == [EventKind.PRIORITY]
    b.backend.gate.set()
    await eventually(lambda: len(b.backend.asked) == 12, within=5, what="B runs every request")
    # The one in flight, then the third batch (priority 5) before the rest of
    # the first and the second (priority 0, first come first served).
    # The third batch (priority 5 now) runs before the second (priority 0,
    # created earlier: first come first served would run it before the third).
    # The first keeps going while the third's requests are read (a priority
    # orders requests once read); that read starts when the event arrives.
    asked = b.backend.asked
    assert asked[0] == "first/0"
    assert max(asked.index(f"third/{i}") for i in range(3)) < min(asked.index(f"second/{i}") for i in range(3))
