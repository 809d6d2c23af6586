"""The event seam in process: events, LocalEvents' delivery (order, never
inside publish, unsubscribe, close), announce, and the Notifier fed from it.
PgEvents is in tests/test_pg_events.py."""

from __future__ import annotations

import asyncio
import logging

import pytest

from longbatch.server.events import BatchEvent, EventKind, EventsUnavailable, LocalEvents, announce
from longbatch.server.notifier import Notifier
from longbatch.server.pg_events import MAX_PAYLOAD_BYTES, EventTooLarge, decode_event, encode_event


async def settle() -> None:
    """Let every callback already scheduled run (LocalEvents delivers with
    call_soon: one turn of the loop; three leave room)."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_events_are_small_frozen_records_with_a_priority_only_for_priority() -> None:
    assert BatchEvent.done("b1") == BatchEvent(EventKind.DONE, "b1", None)
    assert BatchEvent.cancel("b1").kind is EventKind.CANCEL
    assert BatchEvent.priority_changed("b1", -3).priority == -3
    with pytest.raises(ValueError, match="needs priority"):
        BatchEvent(EventKind.PRIORITY, "b1")
    with pytest.raises(ValueError, match="takes no priority"):
        BatchEvent(EventKind.DONE, "b1", 5)
    with pytest.raises(ValueError, match="batch id"):
        BatchEvent.done("")
    with pytest.raises(AttributeError):
        BatchEvent.done("b1").batch_id = "b2"  # type: ignore[misc]


def test_payloads_are_compact_json_and_read_back() -> None:
    for event in [BatchEvent.done("b1"), BatchEvent.cancel("b-2"), BatchEvent.priority_changed("b3", 2**40)]:
        assert decode_event(encode_event(event)) == event
    assert encode_event(BatchEvent.priority_changed("abc", 7)) == '{"k":"priority","b":"abc","p":7}'
    # The largest batch id that fits, and one more character.
    overhead = len(encode_event(BatchEvent.cancel("x"))) - 1
    fits = "x" * (MAX_PAYLOAD_BYTES - overhead)
    assert len(encode_event(BatchEvent.cancel(fits)).encode()) == MAX_PAYLOAD_BYTES
    with pytest.raises(EventTooLarge, match=f"at most {MAX_PAYLOAD_BYTES} are allowed"):
        encode_event(BatchEvent.cancel(fits + "x"))
    for bad in ["", "not json", '{"k":"renamed","b":"x"}', '{"k":"done"}', '{"k":"priority","b":"x","p":"9"}',
                '{"k":"done","b":"x","p":1}', "[1]"]:
        with pytest.raises(ValueError, match="not a longbatch event"):
            decode_event(bad)


async def test_local_events_deliver_in_order_on_the_loop_never_inside_publish() -> None:
    bus = LocalEvents()
    await bus.start()
    seen: list[tuple[str, BatchEvent]] = []
    publishing = False

    def first(event: BatchEvent) -> None:
        assert not publishing, "a handler ran inside publish"
        seen.append(("first", event))

    bus.subscribe(first)
    bus.subscribe(lambda e: seen.append(("second", e)))
    events = [BatchEvent.done("a"), BatchEvent.cancel("b"), BatchEvent.priority_changed("c", 1)]
    publishing = True
    for event in events:
        await bus.publish(event)
    assert seen == []  # publish returned without running a handler
    publishing = False
    await settle()
    assert seen == [(name, e) for e in events for name in ("first", "second")]
    await bus.close()


async def test_local_events_a_handler_that_publishes_is_not_reentered() -> None:
    bus = LocalEvents()
    seen: list[str] = []
    depth = 0

    def handler(event: BatchEvent) -> None:
        nonlocal depth
        depth += 1
        try:
            assert depth == 1, "re-entered"
            seen.append(event.batch_id)
            if event.batch_id == "a":
                # A handler's own publish is queued behind the event it handles.
                asyncio.get_running_loop().create_task(bus.publish(BatchEvent.done("b")))
        finally:
            depth -= 1

    bus.subscribe(handler)
    await bus.publish(BatchEvent.done("a"))
    await bus.publish(BatchEvent.done("c"))
    await settle()
    assert seen == ["a", "c", "b"]
    await bus.close()


async def test_local_events_unsubscribe_and_a_failing_handler(caplog: pytest.LogCaptureFixture) -> None:
    bus = LocalEvents()
    got: list[str] = []

    def broken(event: BatchEvent) -> None:
        raise RuntimeError("handler bug")

    bus.subscribe(broken)
    stop = bus.subscribe(lambda e: got.append(e.batch_id))
    await bus.publish(BatchEvent.done("a"))
    await settle()
    assert got == ["a"]  # the broken handler did not stop the other
    assert "handler bug" in caplog.text
    # Unsubscribed before delivery: published, never seen.
    await bus.publish(BatchEvent.done("b"))
    stop()
    stop()  # twice is harmless
    await settle()
    assert got == ["a"]
    # The same handler twice: each subscription is its own.
    h: list[str] = []
    one = bus.subscribe(h.append)  # type: ignore[arg-type]
    bus.subscribe(h.append)  # type: ignore[arg-type]
    one()
    await bus.publish(BatchEvent.done("c"))
    await settle()
    assert len(h) == 1
    await bus.close()


async def test_local_events_close_drops_pending_and_refuses_publish() -> None:
    bus = LocalEvents()
    got: list[BatchEvent] = []
    resyncs: list[None] = []
    bus.subscribe(got.append, lambda: resyncs.append(None))
    await bus.publish(BatchEvent.done("a"))
    await bus.close()
    await bus.close()  # twice is safe
    await settle()
    assert got == [] and resyncs == []  # nothing after close returns
    with pytest.raises(EventsUnavailable, match="closed"):
        await bus.publish(BatchEvent.done("b"))


async def test_announce_logs_instead_of_raising(caplog: pytest.LogCaptureFixture) -> None:
    bus = LocalEvents()
    await bus.close()
    with caplog.at_level(logging.WARNING, logger="longbatch.events"):
        await announce(bus, BatchEvent.done("gone"))
    assert "could not publish done event for batches/gone" in caplog.text


async def test_notifier_is_woken_by_done_events_only() -> None:
    bus = LocalEvents()
    notifier = Notifier()
    bus.subscribe(notifier.on_event)
    waiter = notifier.subscribe("b1")
    other = notifier.subscribe("b2")
    await bus.publish(BatchEvent.cancel("b1"))
    await bus.publish(BatchEvent.priority_changed("b1", 3))
    await settle()
    assert not waiter.done()
    await bus.publish(BatchEvent.done("b1"))
    await asyncio.wait_for(asyncio.shield(waiter), 1.0)
    assert not other.done()
    notifier.unsubscribe("b2", other)
    await bus.close()


async def test_notifier_resync_wakes_every_waiter() -> None:
    bus = LocalEvents()
    notifier = Notifier()
    bus.subscribe(notifier.on_event, notifier.on_resync)
    waiters = [notifier.subscribe("b1"), notifier.subscribe("b1"), notifier.subscribe("b2")]
    assert (notifier.waiting("b1"), notifier.waiting("b2")) == (2, 1)
    notifier.on_resync()
    await asyncio.wait_for(asyncio.gather(*(asyncio.shield(w) for w in waiters)), 1.0)
    assert (notifier.waiting("b1"), notifier.waiting("b2")) == (0, 0)
    await bus.close()
