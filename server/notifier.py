"""In-process wake-ups for WaitOperation: event driven, no polling.

Fed by the event bus (``events.BatchEvents``): the executor publishes
``done`` there, and ``on_event``, subscribed at startup, wakes the waiters;
so a batch finished by any replica wakes the waiters of every one. A wake-up
is a hint to re-read the batch, never a verdict: after a resync (events may
have been lost) ``on_resync`` wakes every waiter, and a waiter that finds its
batch not done yet subscribes again (``BatchManager.wait``).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from .events import BatchEvent, EventKind


class Notifier:
    """Lets coroutines wait for a batch to become done."""

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Future[None]]] = defaultdict(set)

    def subscribe(self, batch_id: str) -> asyncio.Future[None]:
        """A future resolved when ``batch_id`` is done.

        Subscribe *before* reading the batch, so a completion between the read
        and the wait is not missed; always ``unsubscribe`` afterwards.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[batch_id].add(fut)
        return fut

    def unsubscribe(self, batch_id: str, fut: asyncio.Future[None]) -> None:
        """Forget a subscription."""
        waiters = self._waiters.get(batch_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[batch_id]

    def waiting(self, batch_id: str) -> int:
        """How many subscriptions wait on ``batch_id`` now (diagnostics, tests)."""
        return len(self._waiters.get(batch_id, ()))

    def done(self, batch_id: str) -> None:
        """Wake everyone waiting on ``batch_id``."""
        for fut in self._waiters.pop(batch_id, ()):
            if not fut.done():
                fut.set_result(None)

    def wake_all(self) -> None:
        """Wake every waiter of every batch, so each re-reads its batch."""
        waiters, self._waiters = self._waiters, defaultdict(set)
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)

    def on_resync(self) -> None:
        """The bus's resync handler: ``done`` events may have been missed
        (a listener reconnected), so every waiter re-reads its batch."""
        self.wake_all()

    def on_event(self, event: BatchEvent) -> None:
        """The bus's handler: a ``done`` event wakes the batch's waiters."""
        if event.kind is EventKind.DONE:
            self.done(event.batch_id)
