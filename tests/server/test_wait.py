"""WaitOperation's wait (``BatchManager.wait``) against missed and spurious
wake-ups: a wake-up is only a hint to re-read the batch, so one that finds
it not done (a spurious one, a resync after a reconnect) goes back to
waiting for the rest of the timeout, and a done event still returns at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from longbatch.server.config import Limits
from longbatch.server.domain import BatchKind, ItemStatus, NewBatch, NewItem, State
from longbatch.server.events import BatchEvent, LocalEvents
from longbatch.server.executor import Executor
from longbatch.server.files import DiskFileBytes
from longbatch.server.manager import BatchManager
from longbatch.server.notifier import Notifier
from longbatch.server.outputs import Outputs
from longbatch.server.paging import PageTokens
from longbatch.server.sqlite_store import SQLiteStore

from support import eventually


class NoExecutor:
    """What ``BatchManager.view`` asks the executor for a batch not done."""

    def waiting_reason(self, model: str) -> str:
        return ""


class Parts:
    def __init__(self, store: SQLiteStore, manager: BatchManager, notifier: Notifier, bus: LocalEvents) -> None:
        self.store, self.manager, self.notifier, self.bus = store, manager, notifier, bus

    async def finish(self, batch_id: str) -> None:
        """Make the batch done in the store and publish it, as the executor does."""
        await self.store.close_batch(batch_id, State.CANCELLED, None, ItemStatus.CANCELLED)
        await self.store.mark_done(batch_id, None)
        await self.bus.publish(BatchEvent.done(batch_id))


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    store = SQLiteStore(tmp_path / "db.sqlite")
    await store.open()
    files = DiskFileBytes(tmp_path / "files")
    files.prepare()
    notifier = Notifier()
    bus = LocalEvents()
    bus.subscribe(notifier.on_event, notifier.on_resync)
    outputs = Outputs(store, files, 1 << 20)
    manager = BatchManager(store, cast(Executor, cast(Any, NoExecutor())), outputs, notifier, files, {}, Limits(),
                           PageTokens(b"k" * 32))
    batch = NewBatch(id="b1", tenant="t", kind=BatchKind.GENERATE, model="models/echo", display_name="",
                     priority=0, input_file=None, webhook=None, request_id=None)
    await store.create_batch(batch, [NewItem(0, "k0", None, b"")], 0)
    yield Parts(store, manager, notifier, bus)
    await bus.close()
    await outputs.close()
    await store.close()


async def test_spurious_wakeups_and_resyncs_do_not_end_the_wait_early(parts: Parts) -> None:
    loop = asyncio.get_running_loop()
    timeout = 0.6
    started = loop.time()
    wait = asyncio.create_task(parts.manager.wait("t", "b1", timeout))
    for wake in (lambda: parts.notifier.done("b1"), parts.notifier.on_resync, parts.notifier.wake_all):
        # Each time: it waits (subscribed), is woken, re-reads, and waits again.
        await eventually(lambda: parts.notifier.waiting("b1") == 1, what="the wait is subscribed")
        wake()
        await eventually(lambda: parts.notifier.waiting("b1") == 1 or wait.done(), what="it waits again")
        assert not wait.done()
    view = await asyncio.wait_for(wait, 5.0)
    assert not view.batch.done
    assert loop.time() - started >= timeout  # the whole timeout, not up to the first wake-up
    assert parts.notifier.waiting("b1") == 0


async def test_a_done_event_after_a_spurious_wakeup_still_returns_at_once(parts: Parts) -> None:
    loop = asyncio.get_running_loop()
    wait = asyncio.create_task(parts.manager.wait("t", "b1", 60.0))
    await eventually(lambda: parts.notifier.waiting("b1") == 1, what="the wait is subscribed")
    parts.notifier.on_resync()
    await eventually(lambda: parts.notifier.waiting("b1") == 1, what="it waits again")
    finished = loop.time()
    await parts.finish("b1")
    view = await asyncio.wait_for(wait, 5.0)
    assert view.batch.done and view.batch.state is State.CANCELLED
    assert loop.time() - finished < 1.0


async def test_a_wait_that_misses_the_done_event_returns_on_the_resync(parts: Parts) -> None:
    # The batch becomes done but its event is lost (a listener was down):
    # the resync after the reconnect makes the waiter read it and return.
    wait = asyncio.create_task(parts.manager.wait("t", "b1", 60.0))
    await eventually(lambda: parts.notifier.waiting("b1") == 1, what="the wait is subscribed")
    await parts.store.close_batch("b1", State.CANCELLED, None, ItemStatus.CANCELLED)
    await parts.store.mark_done("b1", None)
    assert not wait.done()
    parts.notifier.on_resync()
    view = await asyncio.wait_for(wait, 5.0)
    assert view.batch.done


async def test_zero_timeout_reads_once(parts: Parts) -> None:
    view = await parts.manager.wait("t", "b1", 0.0)
    assert not view.batch.done and parts.notifier.waiting("b1") == 0
