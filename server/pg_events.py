"""``BatchEvents`` over PostgreSQL LISTEN/NOTIFY, for replicas on one database.

Every replica keeps one dedicated listener connection that LISTENs on one
channel (``longbatch_events``); ``publish`` sends ``SELECT pg_notify(channel,
payload)`` on a separate connection (or a pool given to it), so a publish
never waits behind the listener and the listener never holds a query. The
sender's own listener gets the event too, so every replica, the sender
included, sees the events in one order: the order their NOTIFYs committed.

Payloads are compact JSON (``{"k":"priority","b":"<batch id>","p":5}``),
far under NOTIFY's limit (a payload must be shorter than 8000 bytes); a
bigger one is refused before anything is sent (``EventTooLarge``).

A lost listener (database restart, failover, ``pg_terminate_backend``) is
noticed at once by asyncpg's termination callback, and a silently dead one
(a network partition) by a periodic ``SELECT 1`` with a timeout. It is
reconnected with jittered exponential backoff (``retry.Backoff``), LISTENs
again, and only then are the subscribers told to resync: they re-read after
the listener is back, so an event between their read and the reconnect
cannot fall into a gap.

The URL holds a password: it is used only to connect and never goes into a
message or a log line (``pg_store.redact_url``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import orjson

from .events import BatchEvent, EventHandler, EventKind, EventsUnavailable, ResyncHandler, Subscribers, Unsubscribe
from .pg_store import redact_url
from .retry import Backoff

__all__ = ["CHANNEL", "MAX_PAYLOAD_BYTES", "EventTooLarge", "PgEvents", "decode_event", "encode_event"]

log = logging.getLogger("longbatch.events")

CHANNEL = "longbatch_events"
MAX_PAYLOAD_BYTES = 7999
"""NOTIFY's limit in PostgreSQL's default build: a payload shorter than 8000 bytes."""

# How the two connections show in pg_stat_activity (operators, and the tests
# that kill one of them).
LISTENER_APP = "longbatch-events-listen"
PUBLISHER_APP = "longbatch-events-notify"

_NOTIFY = "SELECT pg_notify($1, $2)"

# What a lost connection raises: the socket's errors, the server ending the
# session (restart, pg_terminate_backend), or asyncpg finding it closed.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    OSError, asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError, asyncpg.CannotConnectNowError,
    asyncpg.ConnectionFailureError, asyncpg.InterfaceError, asyncpg.InternalClientError)
# What connecting or querying can raise (a timeout included).
_DB_ERRORS: tuple[type[BaseException], ...] = (*_CONNECTION_LOST, asyncpg.PostgresError, ValueError, TimeoutError)
# Reconnecting the listener: quick at first (a restart takes seconds), then
# at most every 5 s; half jitter, so replicas do not reconnect in step.
_RECONNECT = Backoff(initial_s=0.1, max_s=5.0, jitter=0.5)


class EventTooLarge(ValueError):
    """An event's payload is over NOTIFY's limit; nothing was sent."""


def encode_event(event: BatchEvent) -> str:
    """``event`` as the NOTIFY payload.

    Raises:
        EventTooLarge: the payload would be over ``MAX_PAYLOAD_BYTES``
            bytes, which NOTIFY refuses.
    """
    fields: dict[str, Any] = {"k": event.kind.value, "b": event.batch_id}
    if event.priority is not None:
        fields["p"] = event.priority
    payload = orjson.dumps(fields)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise EventTooLarge(f"{event.kind.value} event for a {len(event.batch_id)}-character batch id is "
                            f"{len(payload)} bytes as a NOTIFY payload; at most {MAX_PAYLOAD_BYTES} are allowed")
    return payload.decode()


def decode_event(payload: str) -> BatchEvent:
    """The event a payload of ``encode_event`` holds.

    Raises:
        ValueError: not such a payload (another version's kind, say).
    """
    try:
        fields = orjson.loads(payload)
        kind = EventKind(fields["k"])
        priority = fields.get("p")
        if not isinstance(fields["b"], str) or not (priority is None or type(priority) is int):
            raise TypeError("field types")
        return BatchEvent(kind, fields["b"], priority)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a longbatch event ({type(e).__name__}): {payload[:200]!r}") from None


class PgEvents:
    """``BatchEvents`` on PostgreSQL LISTEN/NOTIFY; see the module docstring.

    Args:
        url: libpq URL, ``postgresql://user:password@host:port/dbname``.
        channel: the channel every replica LISTENs on.
        pool: publish on connections of this pool (the store's, say)
            instead of one connection of this bus's own.
        connect_timeout_s: the most one connection attempt may take.
        publish_timeout_s: the most ``publish`` may take in all (a
            connection, a retry on a fresh one after a lost one).
        keepalive_s: how often an idle listener is checked with ``SELECT 1``
            (each check may take up to ``connect_timeout_s``).
        reconnect: the waits between attempts to get the listener back.
    """

    def __init__(self, url: str, *, channel: str = CHANNEL, pool: asyncpg.Pool | None = None,
                 connect_timeout_s: float = 5.0, publish_timeout_s: float = 5.0, keepalive_s: float = 5.0,
                 reconnect: Backoff = _RECONNECT) -> None:
        self._url = url
        self._channel = channel
        self._pool = pool
        self._connect_timeout_s = connect_timeout_s
        self._publish_timeout_s = publish_timeout_s
        self._keepalive_s = keepalive_s
        self._reconnect = reconnect
        self._subscribers = Subscribers()
        self._listener: asyncpg.Connection | None = None
        self._lost = asyncio.Event()  # set when the current listener's connection ends
        self._publisher: asyncpg.Connection | None = None
        self._publish_lock = asyncio.Lock()  # one query at a time on the publisher connection
        self._supervisor: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"PgEvents({redact_url(self._url)!r}, channel={self._channel!r})"

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Connect the listener and LISTEN; then keep it connected.

        Raises:
            EventsUnavailable: the database does not answer or refuses
                (message without the password).
        """
        if self._closed:
            raise EventsUnavailable("the event bus is closed")
        if self._started:
            return
        try:
            self._listener = await self._listen()
        except _DB_ERRORS as e:
            raise EventsUnavailable(f"cannot listen for events on {redact_url(self._url)}: {self._why(e)}") from None
        self._started = True
        self._supervisor = asyncio.create_task(self._supervise(), name="longbatch-events-listener")

    async def close(self) -> None:
        """Stop listening and close both connections; no handler is called
        once this returns. Safe to call twice."""
        self._closed = True
        self._subscribers.close()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        listener, self._listener = self._listener, None
        async with self._publish_lock:
            publisher, self._publisher = self._publisher, None
        for conn in (listener, publisher):
            if conn is not None:
                await self._close_conn(conn)

    # -- publishing ------------------------------------------------------------

    async def publish(self, event: BatchEvent) -> None:
        """NOTIFY every replica (this one included) of ``event``.

        Raises:
            EventTooLarge: the payload is over NOTIFY's limit (not sent).
            EventsUnavailable: the database could not be reached or did not
                answer within ``publish_timeout_s``, or the bus is closed.
        """
        payload = encode_event(event)
        if self._closed:
            raise EventsUnavailable("the event bus is closed")
        where = f"{event.kind.value} event for batches/{event.batch_id}"
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                await self._notify(payload)
        except TimeoutError:
            raise EventsUnavailable(f"cannot publish {where}: {redact_url(self._url)} did not answer within "
                                    f"{self._publish_timeout_s:g}s") from None
        except _DB_ERRORS as e:
            raise EventsUnavailable(
                f"cannot publish {where} on {redact_url(self._url)}: {self._why(e)}") from None

    async def _notify(self, payload: str) -> None:
        if self._pool is not None:
            await self._pool.execute(_NOTIFY, self._channel, payload)
            return
        async with self._publish_lock:
            # A connection found lost (the database restarted since the last
            # publish) is replaced once; a NOTIFY sent twice is harmless, as
            # events are idempotent hints.
            for last in (False, True):
                conn = self._publisher
                if conn is None or conn.is_closed():
                    conn = self._publisher = await self._connect(PUBLISHER_APP)
                try:
                    await conn.execute(_NOTIFY, self._channel, payload)
                    return
                except _CONNECTION_LOST:
                    self._drop_publisher()
                    if last:
                        raise
                except asyncpg.PostgresError:
                    raise  # the session is fine (an error in the statement): keep it
                except BaseException:
                    # Cancelled (the timeout) mid-query: the session's state
                    # is unknown, so the next publish starts a fresh one.
                    self._drop_publisher()
                    raise

    def _drop_publisher(self) -> None:
        conn, self._publisher = self._publisher, None
        if conn is not None:
            conn.terminate()

    # -- subscribing -----------------------------------------------------------

    def subscribe(self, handler: EventHandler, on_resync: ResyncHandler | None = None) -> Unsubscribe:
        """See ``BatchEvents.subscribe``: ``on_resync`` is called after the
        listener reconnects, and after an event this version cannot read."""
        return self._subscribers.add(handler, on_resync)

    def _on_notification(self, conn: object, pid: int, channel: str, payload: object) -> None:
        try:
            event = decode_event(str(payload))
        except ValueError as e:
            # A newer replica's event, say: something happened that this one
            # did not understand, so its subscribers re-read.
            log.warning("%s; asking subscribers to resync", e)
            self._subscribers.resync_soon()
            return
        self._subscribers.deliver_soon(event)

    def _on_termination(self, conn: object) -> None:
        # Also called when this bus closes a connection itself; only the
        # current listener's end matters.
        if conn is self._listener and not self._closed:
            self._lost.set()

    # -- the listener ----------------------------------------------------------

    async def _connect(self, application_name: str) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self._url, timeout=self._connect_timeout_s, server_settings={"application_name": application_name})
        return conn

    async def _listen(self) -> asyncpg.Connection:
        conn = await self._connect(LISTENER_APP)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await conn.add_listener(self._channel, self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        self._lost.clear()
        conn.add_termination_listener(self._on_termination)
        return conn

    async def _supervise(self) -> None:
        """Keep the listener alive: check it, and reconnect it when lost."""
        while True:
            conn = self._listener
            if conn is None:
                await self._relisten()
                continue
            try:
                async with asyncio.timeout(self._keepalive_s):
                    await self._lost.wait()
                reason = "connection closed"
            except TimeoutError:
                try:
                    async with asyncio.timeout(self._connect_timeout_s):
                        await conn.fetchval("SELECT 1")
                    continue
                except TimeoutError:
                    reason = f"no answer to a keepalive within {self._connect_timeout_s:g}s"
                except Exception as e:
                    reason = self._why(e)
            self._listener = None
            conn.terminate()
            log.warning("event listener on %s lost (%s); reconnecting", redact_url(self._url), reason)

    async def _relisten(self) -> None:
        """Connect a new listener, with backoff; then ask for a resync."""
        attempt = 0
        while True:
            try:
                self._listener = await self._listen()
            except Exception as e:  # whatever it is, the next attempt may work: the loop must go on
                attempt += 1
                delay = self._reconnect.delay(attempt)
                log.warning("event listener on %s: reconnecting failed (%s); next try in %.1fs",
                            redact_url(self._url), self._why(e), delay)
                await asyncio.sleep(delay)
                continue
            log.info("event listener on %s reconnected; subscribers resync", redact_url(self._url))
            self._subscribers.resync_soon()
            return

    # -- helpers ---------------------------------------------------------------

    def _why(self, e: BaseException) -> str:
        """An exception as ``Type: message``, without the password."""
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        password = None
        with contextlib.suppress(ValueError):
            password = urlsplit(self._url).password
        if password:
            # As written in the URL and as the driver sends it (percent-decoded).
            for form in {password, unquote(password)}:
                text = text.replace(form, "***")
        return text

    @staticmethod
    async def _close_conn(conn: asyncpg.Connection) -> None:
        # Politely (the server ends the session at once), but never wait on
        # a dead peer: terminate is local only.
        try:
            await conn.close(timeout=1.0)
        except Exception:
            conn.terminate()
