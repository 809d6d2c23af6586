"""A lean pooled HTTP/1.1 client for model servers: asyncio protocols over httptools' parser.

Why not aiohttp for backend calls: a model call is one small JSON POST on a
keep-alive connection, and at 256 in flight aiohttp's client spends about
110 µs of CPU per call on this machine (sessions, tracing hooks, cookie
jars, timers, header multidicts), while writing the request bytes and
feeding the answer to httptools' C parser (the one uvicorn uses) costs
about 20 µs. On a 2-core machine that CPU is what the model server and
the rest of longbatch need. aiohttp still serves everything else (webhooks,
the tests' fake servers).

What it does: keep-alive connections to one origin (``http`` or ``https``),
at most ``max_connections``, reused most-recently-idle first, dropped once
idle longer than ``idle_timeout_s`` (below the common 5 s server-side
keep-alive, so a reused connection is rarely one the server is closing);
responses framed by ``Content-Length`` or chunked encoding (an answer
framed only by closing the connection, HTTP/1.0 style, ends in
:class:`ConnectionLost`: no model server we know sends one); redirects
are not followed (a 3xx is returned as is). A request
sent on a reused connection that the server closed before answering a
byte is sent once more on a fresh one: that is the keep-alive race, not a
failure of the server.

Errors: :class:`ConnectError` (refused, unreachable, DNS),
:class:`ConnectionLost` (reset or closed mid-answer), :class:`ProtocolError`
(not HTTP/1.1, or an answer over ``max_body_bytes``) and ``TimeoutError``
(``timeout_s`` per call, checked by one sweeper per pool rather than a
timer per call). A cancelled call closes its connection, whose state is
then unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from typing import NamedTuple, cast
from urllib.parse import urlsplit

import httptools

__all__ = ["ConnectError", "ConnectionLost", "H1Error", "H1Pool", "ProtocolError", "Response"]

_MAX_BODY = 64 << 20


class H1Error(Exception):
    """A call that got no complete HTTP answer."""


class ConnectError(H1Error):
    """No connection could be made (refused, unreachable, name not resolved, TLS handshake)."""


class ConnectionLost(H1Error):
    """The connection closed or reset before the answer was complete."""


class ProtocolError(H1Error):
    """The peer's bytes are not an acceptable HTTP/1.1 answer."""


class Response(NamedTuple):
    """A complete answer: status, headers by lower-case name, body."""

    status: int
    headers: dict[str, str]
    body: bytes


class _Conn(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, pool: H1Pool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.future: asyncio.Future[Response] | None = None
        self.started = 0.0
        self.idle_since = 0.0
        self.reused = False
        self.got_bytes = False
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self.closed = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.future is None:  # bytes nobody asked for: the connection is out of step
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the model server asked to switch protocols"))
        except httptools.HttpParserError as e:
            self._fail(ProtocolError(f"the model server's answer is not valid HTTP/1.1: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        if self.future is not None and not self.future.done():
            why = f": {exc}" if exc else ""
            self.future.set_exception(ConnectionLost(f"the model server closed the connection{why}"))
        self.future = None

    # -- httptools callbacks -------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._pool.max_body_bytes:
            self._fail(ProtocolError(f"the model server's answer exceeds {self._pool.max_body_bytes} bytes"))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        future, self.future = self.future, None
        status = self._parser.get_status_code()
        keep = self._parser.should_keep_alive()
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        response = Response(status, self._headers, body)
        self._headers, self._body, self._size = {}, [], 0
        if future is not None and not future.done():
            future.set_result(response)
        if keep:
            self._pool._release(self)
        else:
            self.abort()

    # -- use -------------------------------------------------------------------------

    def send(self, data: bytes, future: asyncio.Future[Response], now: float) -> None:
        assert self.transport is not None
        self.future = future
        self.started = now
        self.got_bytes = False
        self.transport.write(data)

    def abort(self) -> None:
        """Close at once; whatever is in flight fails with ConnectionLost."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self._pool._forget(self)

    def fail_timeout(self, timeout_s: float) -> None:
        """The sweeper found this call past its limit."""
        self._fail(TimeoutError(f"the model server did not answer within {timeout_s:g}s"))

    def _fail(self, error: Exception) -> None:
        future, self.future = self.future, None
        if future is not None and not future.done():
            future.set_exception(error)
        self.abort()


class H1Pool:
    """Pooled keep-alive HTTP/1.1 connections to one origin; see the module docstring."""

    def __init__(self, base_url: str, *, max_connections: int, timeout_s: float | None = None,
                 connect_timeout_s: float = 10.0, idle_timeout_s: float = 4.0,
                 ssl_context: ssl.SSLContext | None = None, max_body_bytes: int = _MAX_BODY) -> None:
        """Args:
            base_url: ``http(s)://host[:port][/prefix]``; request paths are appended to the prefix.
            max_connections: connections open at most; callers beyond wait for one.
            timeout_s: limit on one call from send to complete answer; None for none.
            connect_timeout_s: limit on opening a connection (TLS included).
            idle_timeout_s: an idle connection older than this is closed, not reused.
            ssl_context: for https; a default verifying context when None.
            max_body_bytes: a longer answer is a ProtocolError.
        """
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = (parts.scheme == "https" and self._port == 443) or (parts.scheme == "http" and self._port == 80)
        self.host_header = host if default_port else f"{host}:{self._port}"
        self.max_connections = max_connections
        self.max_body_bytes = max_body_bytes
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._idle: deque[_Conn] = deque()
        self._busy: set[_Conn] = set()
        self._opening = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    def head(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        """The request line and headers for ``path`` (below the base URL's prefix), up to the
        ``Content-Length`` value: build it once per endpoint and pass it to :meth:`request`."""
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")

    async def request(self, head: bytes, body: bytes) -> Response:
        """Send ``head`` (from :meth:`head`) with ``body``; the complete answer.

        Raises:
            ConnectError, ConnectionLost, ProtocolError: see the module docstring.
            TimeoutError: no complete answer within ``timeout_s``.
        """
        data = b"%s%d\r\n\r\n%s" % (head, len(body), body)
        for _ in range(2):
            conn = await self._acquire()
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Response] = loop.create_future()
            conn.send(data, future, loop.time())
            try:
                return await future
            except ConnectionLost:
                # The keep-alive race: the server closed an idle connection as
                # we reused it. Nothing of an answer came, so send it afresh.
                if not (conn.reused and not conn.got_bytes):
                    raise
            except BaseException:
                conn.abort()  # cancelled or failed mid-answer: the connection's state is unknown
                raise
        raise ConnectionLost("the model server closed the connection twice before answering")

    async def aclose(self) -> None:
        """Close every connection; calls under way fail. Safe to call twice."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for conn in [*self._idle, *self._busy]:
            conn.abort()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectError("the connection pool is closed"))

    # -- pool ---------------------------------------------------------------------------

    async def _acquire(self) -> _Conn:
        loop = asyncio.get_running_loop()
        if self._timeout_s is not None and self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep(), name="h1-timeouts")
        while True:
            if self._closed:
                raise ConnectError("the connection pool is closed")
            now = loop.time()
            while self._idle:
                conn = self._idle.pop()  # most recently idle first: the warmest
                if conn.closed or conn.transport is None or conn.transport.is_closing():
                    continue
                if now - conn.idle_since > self._idle_timeout_s:
                    conn.abort()
                    continue
                conn.reused = True
                self._busy.add(conn)
                return conn
            if len(self._busy) + self._opening < self.max_connections:
                return await self._open()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # pass the wake-up on: we were handed a slot we will not use
                raise

    async def _open(self) -> _Conn:
        self._opening += 1
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None)
        except TimeoutError as e:
            raise ConnectError(f"no connection to {self.host_header} within {self._connect_timeout_s:g}s") from e
        except ssl.SSLError as e:
            raise ConnectError(f"TLS with {self.host_header} failed: {e.reason or e}") from e
        except OSError as e:
            raise ConnectError(f"cannot connect to {self.host_header}: {e.strerror or e}") from e
        finally:
            self._opening -= 1
        self._busy.add(conn)
        return conn

    def _release(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        if self._closed:
            conn.abort()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)
        self._wake()

    def _forget(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _sweep(self) -> None:
        """Fail calls past ``timeout_s``: one periodic check instead of a timer per call."""
        assert self._timeout_s is not None
        interval = min(1.0, max(0.01, self._timeout_s / 8))
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self._busy):
                if conn.future is not None and now - conn.started > self._timeout_s:
                    conn.fail_timeout(self._timeout_s)
