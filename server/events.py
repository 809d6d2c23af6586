"""The event seam: what one replica tells every replica about a batch.

A batch's completion, a cancel and a priority change are written to the
store first; then an event says so to every replica on the store (this one
included), so each can act at once (wake its WaitOperation callers, stop
the batch's work, reorder its queue) instead of polling. Events are hints:
the store stays the truth, and a consumer that needs more than the event
says reads it there.

Two implementations:

* ``LocalEvents`` (this module): in process, for SQLite and a single
  replica; nothing can be lost, so it never asks for a resync.
* ``PgEvents`` (``pg_events.py``): PostgreSQL LISTEN/NOTIFY, for replicas
  sharing one database. While its listener connection is down, events of
  other replicas are missed; once it is back, every subscriber's
  ``on_resync`` is called: "events may have been missed, re-read what you
  care about".

Handlers run on the event loop, one event at a time in publish order, never
inside ``publish`` (a publisher holding a lock cannot be re-entered by its
own event), and one that raises is logged without stopping the others.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "BatchEvent",
    "BatchEvents",
    "EventHandler",
    "EventKind",
    "EventsUnavailable",
    "LocalEvents",
    "ResyncHandler",
    "Subscribers",
    "Unsubscribe",
    "announce",
]

log = logging.getLogger("longbatch.events")


class EventKind(enum.StrEnum):
    """What happened to a batch."""

    DONE = "done"
    """The batch became done (its final state and output are in the store)."""
    CANCEL = "cancel"
    """The batch was cancelled: every replica stops its work."""
    PRIORITY = "priority"
    """The batch's priority changed to ``BatchEvent.priority``."""


@dataclass(frozen=True, slots=True)
class BatchEvent:
    """One event: its kind, the batch, and for ``PRIORITY`` the new priority.

    Build one with ``done``, ``cancel`` or ``priority_changed``; the
    constructor refuses a priority on other kinds and a ``PRIORITY``
    without one, so a consumer never has to guess.
    """

    kind: EventKind
    batch_id: str
    priority: int | None = None

    def __post_init__(self) -> None:
        if not self.batch_id:
            raise ValueError("an event needs a batch id")
        if (self.priority is not None) != (self.kind is EventKind.PRIORITY):
            raise ValueError(f"a {self.kind.value} event {'needs' if self.priority is None else 'takes no'} priority")

    @classmethod
    def done(cls, batch_id: str) -> BatchEvent:
        """``batch_id`` became done."""
        return cls(EventKind.DONE, batch_id)

    @classmethod
    def cancel(cls, batch_id: str) -> BatchEvent:
        """``batch_id`` was cancelled."""
        return cls(EventKind.CANCEL, batch_id)

    @classmethod
    def priority_changed(cls, batch_id: str, priority: int) -> BatchEvent:
        """``batch_id``'s priority is now ``priority``."""
        return cls(EventKind.PRIORITY, batch_id, priority)


EventHandler = Callable[[BatchEvent], None]
"""Called on the loop with each event; spawn a task for async work."""
ResyncHandler = Callable[[], None]
"""Called on the loop when events may have been missed (after a reconnect)."""
Unsubscribe = Callable[[], None]
"""Returned by ``subscribe``: stops that subscription (safe to call twice)."""


class EventsUnavailable(RuntimeError):
    """An event could not be published (bus closed, database unreachable);
    the message never holds a password."""


class BatchEvents(Protocol):
    """The bus every replica's events go through; see the module docstring."""

    async def start(self) -> None:
        """Begin receiving events (a listener connection, for example)."""
        ...

    async def close(self) -> None:
        """Stop: no handler is called once this returns. Safe to call twice."""
        ...

    async def publish(self, event: BatchEvent) -> None:
        """Deliver ``event`` to the subscribers of every replica, this one's
        included; returns once it is sent, before any handler runs.

        Raises:
            EventsUnavailable: it could not be sent (within a bounded time).
        """
        ...

    def subscribe(self, handler: EventHandler, on_resync: ResyncHandler | None = None) -> Unsubscribe:
        """Have ``handler`` called with every event from now on, and
        ``on_resync`` (if given) whenever events may have been missed."""
        ...


async def announce(events: BatchEvents, event: BatchEvent) -> None:
    """Publish ``event``, logging instead of raising a failure.

    For publishers whose change is already committed (a batch marked done):
    the event only spares the other replicas a wait, and its failure must not
    undo or interrupt the rest of their work; what was missed is caught up
    by a resync or the waiters' own timeouts.
    """
    try:
        await events.publish(event)
    except Exception as e:  # any failure of a hint, including a bug in a bus: never the publisher's
        log.warning("could not publish %s event for batches/%s: %s", event.kind.value, event.batch_id, e)


class Subscribers:
    """The local side of a bus: its subscriptions, and delivery to them on
    the loop in order. ``LocalEvents`` and ``PgEvents`` both deliver
    through one of these."""

    def __init__(self) -> None:
        # Insertion-ordered, keyed by a token: the same handler may be
        # subscribed twice and each unsubscribe removes its own entry.
        self._subs: dict[object, tuple[EventHandler, ResyncHandler | None]] = {}
        self._closed = False

    def add(self, handler: EventHandler, on_resync: ResyncHandler | None) -> Unsubscribe:
        """Add a subscription; returns what removes it."""
        token = object()
        self._subs[token] = (handler, on_resync)

        def unsubscribe() -> None:
            self._subs.pop(token, None)

        return unsubscribe

    def deliver_soon(self, event: BatchEvent) -> None:
        """Call every handler with ``event`` on a later turn of the loop (so
        never inside the caller), after the events given before it."""
        if not self._closed:
            asyncio.get_running_loop().call_soon(self._deliver, event)

    def resync_soon(self) -> None:
        """Call every ``on_resync`` on a later turn of the loop, after the
        events given before it."""
        if not self._closed:
            asyncio.get_running_loop().call_soon(self._resync)

    def close(self) -> None:
        """Drop the subscriptions; deliveries already scheduled call nobody."""
        self._closed = True
        self._subs.clear()

    def _deliver(self, event: BatchEvent) -> None:
        # A snapshot: a handler may (un)subscribe while this runs; one
        # removed meanwhile is skipped, one added gets only later events.
        for token, (handler, _) in list(self._subs.items()):
            if token not in self._subs:
                continue
            try:
                handler(event)
            except Exception:
                log.exception("event handler %r failed on %s of batches/%s", handler, event.kind.value,
                              event.batch_id)

    def _resync(self) -> None:
        for token, (_, on_resync) in list(self._subs.items()):
            if on_resync is None or token not in self._subs:
                continue
            try:
                on_resync()
            except Exception:
                log.exception("resync handler %r failed", on_resync)


class LocalEvents:
    """``BatchEvents`` within one process: for SQLite and a single replica.

    ``publish`` schedules delivery with ``loop.call_soon`` and returns
    without suspending, so a publisher's next step runs before any handler
    (exactly as if it had not awaited), and handlers see events in publish
    order. Nothing can be missed in process: ``on_resync`` is never called.
    ``start`` is optional; after ``close``, ``publish`` raises.
    """

    def __init__(self) -> None:
        self._subscribers = Subscribers()
        self._closed = False

    async def start(self) -> None:
        """Nothing to connect: ready as built."""

    async def close(self) -> None:
        """Drop every subscription; events published but not yet delivered go nowhere."""
        self._closed = True
        self._subscribers.close()

    async def publish(self, event: BatchEvent) -> None:
        """Schedule ``event`` for this process's subscribers.

        Raises:
            EventsUnavailable: the bus is closed.
        """
        if self._closed:
            raise EventsUnavailable("the event bus is closed")
        self._subscribers.deliver_soon(event)

    def subscribe(self, handler: EventHandler, on_resync: ResyncHandler | None = None) -> Unsubscribe:
        """See ``BatchEvents.subscribe``; ``on_resync`` is never called here."""
        return self._subscribers.add(handler, on_resync)
