"""PgEvents on a real PostgreSQL: replicas hearing each other through
LISTEN/NOTIFY, a killed listener reconnected with a resync, publishing with
the database gone (fails fast, no password), payloads over NOTIFY's limit.

Without a PostgreSQL to test against this module is skipped with the one
line that says how to run it (tests/pg.py); under CI=true it always runs.
Every wait is on a condition with a bound, never a fixed sleep."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pg import HOW_TO_RUN, available, pg_database, pg_url  # noqa: F401  (fixtures, by name)

from longbatch.server.events import BatchEvent, EventsUnavailable
from longbatch.server.pg_events import CHANNEL, LISTENER_APP, PUBLISHER_APP, EventTooLarge, PgEvents
from longbatch.server.retry import Backoff

if not available():
    pytest.skip(f"PostgreSQL tests skipped: {HOW_TO_RUN}", allow_module_level=True)

PASSWORD = "s3cret-Ev3nts"
# Reconnect quickly: the tests wait on the reconnect, bounded.
FAST = Backoff(initial_s=0.05, max_s=0.5, jitter=0.5)


@pytest.fixture
def db(pg_url: str) -> str:  # noqa: F811  (the fixture imported above)
    """This session's database (tests/pg.py); NOTIFY needs no tables."""
    return pg_url


def with_password(url: str, password: str = PASSWORD, port: int | None = None) -> str:
    """``url`` logging in with ``password`` (the machine's PostgreSQL trusts
    local logins, so any password connects), optionally on another port."""
    parts = urlsplit(url)
    host = f"{parts.hostname}:{port or parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}"))


class Inbox:
    """What one subscriber got, and a bounded wait for a condition on it."""

    def __init__(self) -> None:
        self.events: list[BatchEvent] = []
        self.resyncs = 0
        self._changed = asyncio.Event()

    def on_event(self, event: BatchEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def on_resync(self) -> None:
        self.resyncs += 1
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout_s: float = 1.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def buses() -> AsyncIterator[list[PgEvents]]:
    """Buses a test opens; all closed at its end."""
    opened: list[PgEvents] = []
    yield opened
    await asyncio.gather(*(bus.close() for bus in opened))


async def started(buses: list[PgEvents], url: str, **kw: object) -> tuple[PgEvents, Inbox]:
    bus = PgEvents(url, reconnect=FAST, **kw)  # type: ignore[arg-type]
    buses.append(bus)
    await bus.start()
    inbox = Inbox()
    bus.subscribe(inbox.on_event, inbox.on_resync)
    return bus, inbox


async def terminate(url: str, application_name: str) -> int:
    """``pg_terminate_backend`` every session of ``application_name`` on the
    database (what a restart does to them, as a client sees it)."""
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = $1", application_name))
    finally:
        await conn.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, never listening,
    so nothing else takes it during the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that takes connections (the kernel's backlog) and
    never answers: a database host that has hung."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


# -- replicas --------------------------------------------------------------------


async def test_two_replicas_hear_each_others_events_within_a_second(db: str, buses: list[PgEvents]) -> None:
    a, inbox_a = await started(buses, db)
    pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
    try:
        # b publishes on a pool it is given (the store's, in a server).
        b, inbox_b = await started(buses, db, pool=pool)
        sent_a = [BatchEvent.done("a1"), BatchEvent.cancel("a2"), BatchEvent.priority_changed("a3", -7)]
        for event in sent_a:
            await a.publish(event)
        # Each replica, the sender included, within 1 s and in publish order.
        await inbox_a.until(lambda: len(inbox_a.events) == 3)
        await inbox_b.until(lambda: len(inbox_b.events) == 3)
        assert inbox_a.events == inbox_b.events == sent_a
        started_at = time.monotonic()
        await b.publish(BatchEvent.priority_changed("b1", 2**40))
        await inbox_a.until(lambda: len(inbox_a.events) == 4)
        assert inbox_a.events[-1] == BatchEvent.priority_changed("b1", 2**40)
        assert time.monotonic() - started_at < 1.0
        # Many at once, from both: each replica sees all, in one order.
        await asyncio.gather(*(bus.publish(BatchEvent.done(f"m{i}")) for i in range(50) for bus in (a, b)))
        await inbox_a.until(lambda: len(inbox_a.events) == 104)
        await inbox_b.until(lambda: len(inbox_b.events) == 104)
        assert inbox_a.events == inbox_b.events
        assert inbox_a.resyncs == inbox_b.resyncs == 0
    finally:
        await pool.close()


async def test_a_killed_listener_reconnects_resyncs_and_hears_later_events(
        db: str, buses: list[PgEvents], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, inbox = await started(buses, with_password(db))
    publisher, _ = await started(buses, db)
    await publisher.publish(BatchEvent.done("before"))
    await inbox.until(lambda: len(inbox.events) == 1)

    assert await terminate(db, LISTENER_APP) == 2  # both buses' listeners
    await inbox.until(lambda: inbox.resyncs == 1, timeout_s=5.0)
    # Resync comes once it listens again: an event sent now arrives.
    await publisher.publish(BatchEvent.cancel("after"))
    await inbox.until(lambda: inbox.events[-1:] == [BatchEvent.cancel("after")])
    assert "event listener" in caplog.text and "reconnected" in caplog.text
    assert PASSWORD not in caplog.text


class FreezableProxy:
    """A TCP proxy to the database that can stop forwarding on the
    connections it has while keeping them open (a network partition, as a
    client sees it); connections made later flow."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._gates: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def freeze_existing(self) -> None:
        for gate in self._gates:
            gate.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        self._writers += [writer, up_writer]
        gate = asyncio.Event()
        gate.set()
        self._gates.append(gate)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst, gate))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, gate: asyncio.Event) -> None:
        try:
            while data := await src.read(65536):
                await gate.wait()  # frozen: hold the bytes, close nothing
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def test_a_silently_dead_listener_is_found_by_its_keepalive_and_replaced(
        db: str, buses: list[PgEvents], caplog: pytest.LogCaptureFixture) -> None:
    proxy = FreezableProxy(urlsplit(db).port or 5432)
    port = await proxy.start()
    try:
        # The listener goes through the proxy; the publisher straight to the database.
        _, inbox = await started(buses, with_password(db, port=port), keepalive_s=0.2, connect_timeout_s=0.5)
        publisher, _ = await started(buses, db)
        await publisher.publish(BatchEvent.done("before"))
        await inbox.until(lambda: len(inbox.events) == 1)
        proxy.freeze_existing()
        # Sent while the listener hears nothing (it never gets this one),
        # hence the resync once a keepalive has found it dead and it is back.
        await publisher.publish(BatchEvent.done("missed"))
        await inbox.until(lambda: inbox.resyncs == 1, timeout_s=5.0)
        await publisher.publish(BatchEvent.done("after"))
        await inbox.until(lambda: len(inbox.events) == 2)
        assert [e.batch_id for e in inbox.events] == ["before", "after"]
        assert "no answer to a keepalive within 0.5s" in caplog.text
        assert PASSWORD not in caplog.text
    finally:
        await proxy.close()


async def test_publish_replaces_a_lost_connection(db: str, buses: list[PgEvents]) -> None:
    bus, inbox = await started(buses, db)
    await bus.publish(BatchEvent.done("one"))
    assert await terminate(db, PUBLISHER_APP) == 1
    await bus.publish(BatchEvent.done("two"))  # on a fresh connection, no error
    await inbox.until(lambda: [e.batch_id for e in inbox.events] == ["one", "two"])


async def test_an_event_this_version_cannot_read_asks_for_a_resync(
        db: str, buses: list[PgEvents], caplog: pytest.LogCaptureFixture) -> None:
    bus, inbox = await started(buses, db)
    conn = await asyncpg.connect(db)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, '{"k":"renamed","b":"x"}')
    finally:
        await conn.close()
    await bus.publish(BatchEvent.done("next"))
    await inbox.until(lambda: inbox.resyncs == 1 and len(inbox.events) == 1)
    assert "not a longbatch event" in caplog.text


# -- failures ------------------------------------------------------------------


async def test_publish_and_start_with_the_database_unreachable_fail_fast_without_the_password(
        db: str, closed_port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bus = PgEvents(with_password(db, port=closed_port), publish_timeout_s=5.0)
    try:
        assert PASSWORD not in repr(bus)
        began = time.monotonic()
        with pytest.raises(EventsUnavailable) as failed:
            await bus.publish(BatchEvent.done("b1"))
        assert time.monotonic() - began < 2.0  # refused at once, not retried until the timeout
        text = f"{failed.value!s} {failed.value!r}"
        assert "cannot publish done event for batches/b1" in text and f":{closed_port}/" in text, text
        assert PASSWORD not in text and "***" in text
        assert failed.value.__cause__ is None and failed.value.__suppress_context__
        with pytest.raises(EventsUnavailable) as failed:
            await bus.start()
        assert "cannot listen for events" in str(failed.value) and PASSWORD not in str(failed.value)
    finally:
        await bus.close()
    assert PASSWORD not in caplog.text


async def test_publish_to_a_database_that_does_not_answer_times_out(db: str, silent_port: int) -> None:
    bus = PgEvents(with_password(db, port=silent_port), publish_timeout_s=0.5, connect_timeout_s=30.0)
    try:
        began = time.monotonic()
        with pytest.raises(EventsUnavailable, match=r"did not answer within 0\.5s") as failed:
            await bus.publish(BatchEvent.cancel("b1"))
        assert time.monotonic() - began < 2.0
        assert PASSWORD not in str(failed.value)
    finally:
        await bus.close()


async def test_a_payload_over_notifys_limit_is_refused_before_sending(db: str, buses: list[PgEvents]) -> None:
    bus, inbox = await started(buses, db)
    with pytest.raises(EventTooLarge, match="as a NOTIFY payload; at most 7999"):
        await bus.publish(BatchEvent.cancel("x" * 8000))
    await bus.publish(BatchEvent.done("small"))  # the bus is unharmed
    await inbox.until(lambda: len(inbox.events) == 1)
    assert inbox.events == [BatchEvent.done("small")]


async def test_close_is_safe_twice_and_a_closed_bus_refuses(db: str) -> None:
    bus = PgEvents(db)
    await bus.start()
    await bus.publish(BatchEvent.done("x"))
    await bus.close()
    await bus.close()
    with pytest.raises(EventsUnavailable, match="closed"):
        await bus.publish(BatchEvent.done("y"))
    with pytest.raises(EventsUnavailable, match="closed"):
        await bus.start()
