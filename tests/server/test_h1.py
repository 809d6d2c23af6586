"""The pooled HTTP/1.1 client against real servers on 127.0.0.1: aiohttp, and raw sockets for odd peers."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme
from aiohttp import web

from longbatch.server.backends.h1 import ConnectError, ConnectionLost, H1Pool, ProtocolError

from support import eventually

HOST = "127.0.0.1"
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Counting:
    """An aiohttp app that echoes bodies and counts the connections it saw."""

    def __init__(self) -> None:
        self.peers: set[object] = set()
        self.open_now = 0
        self.most_open = 0
        self.slow_started = asyncio.Event()
        """Set once a call reached /slow: it is under way, on its connection."""
        self.app = web.Application()
        self.app.router.add_post("/v1/echo", self.echo)
        self.app.router.add_post("/v1/chunked", self.chunked)
        self.app.router.add_post("/v1/close", self.close)
        self.app.router.add_post("/v1/slow", self.slow)
        self.app.router.add_post("/v1/big", self.big)

    async def echo(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await asyncio.sleep(0.01)
            body = await request.read()
        finally:
            self.open_now -= 1
        return web.Response(body=body, headers={"X-Seen": request.headers.get("X-Test", ""),
                                                "Retry-After": "3"})

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b'{"a":', b' 1', b"}"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def close(self, request: web.Request) -> web.Response:
        return web.Response(body=b"bye", headers={"Connection": "close"})

    async def slow(self, request: web.Request) -> web.Response:
        self.slow_started.set()
        await asyncio.sleep(30)
        return web.Response(body=b"late")

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000)


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=ssl_context)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve_raw(handler: RawHandler) -> AsyncIterator[int]:
    """A raw TCP server; at the end its handlers are cancelled and their sockets closed."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(run, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


async def test_keep_alive_reuses_one_connection_and_reads_headers() -> None:
    fake = Counting()
    async with serve_app(fake.app) as port:
        pool = H1Pool(f"http://{HOST}:{port}/v1", max_connections=8)
        head = pool.head("POST", "/echo", {"Content-Type": "application/json", "X-Test": "yes"})
        try:
            for i in range(30):
                r = await pool.request(head, b'{"i": %d}' % i)
                assert (r.status, r.body) == (200, b'{"i": %d}' % i)
            assert r.headers["x-seen"] == "yes" and r.headers["retry-after"] == "3"
        finally:
            await pool.aclose()
    assert len(fake.peers) == 1


async def test_connections_are_capped_and_callers_wait() -> None:
    fake = Counting()
    async with serve_app(fake.app) as port:
        pool = H1Pool(f"http://{HOST}:{port}/v1", max_connections=4)
        head = pool.head("POST", "/echo", {})
        try:
            answers = await asyncio.gather(*(pool.request(head, b"%d" % i) for i in range(40)))
        finally:
            await pool.aclose()
    assert [a.body for a in answers] == [b"%d" % i for i in range(40)]
    assert fake.most_open <= 4 and len(fake.peers) <= 4


async def test_chunked_answers_and_connection_close() -> None:
    fake = Counting()
    async with serve_app(fake.app) as port:
        pool = H1Pool(f"http://{HOST}:{port}", max_connections=2)
        try:
            r = await pool.request(pool.head("POST", "/v1/chunked", {}), b"")
            assert r.body == b'{"a": 1}'
            r = await pool.request(pool.head("POST", "/v1/close", {}), b"")
            assert r.body == b"bye"
            r = await pool.request(pool.head("POST", "/v1/echo", {}), b"after")  # a fresh connection
            assert r.body == b"after"
        finally:
            await pool.aclose()


async def test_a_keep_alive_connection_the_server_closed_is_retried_once_on_a_fresh_one() -> None:
    seen: list[tuple[int, bytes]] = []

    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = 1 + len({c for c, _ in seen})
        while True:
            body = await read_request(reader)
            seen.append((connection, body))
            if connection == 1 and len(seen) == 2:
                # The keep-alive race, made certain: keep-alive was promised,
                # and the server closes the idle connection just as the next
                # request arrives on it, without a byte of an answer.
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async with serve_raw(answer_then_close) as port:
        pool = H1Pool(f"http://{HOST}:{port}", max_connections=1)
        head = pool.head("POST", "/x", {})
        try:
            assert (await pool.request(head, b"one")).body == b"one"
            assert (await pool.request(head, b"two")).body == b"two"
        finally:
            await pool.aclose()
    assert seen == [(1, b"one"), (1, b"two"), (2, b"two")]


async def test_an_answer_cut_off_midway_is_connection_lost_not_retried() -> None:
    calls = 0

    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial")
        await writer.drain()
        writer.close()

    async with serve_raw(half) as port:
        pool = H1Pool(f"http://{HOST}:{port}", max_connections=1)
        try:
            with pytest.raises(ConnectionLost):
                await pool.request(pool.head("POST", "/x", {}), b"{}")
        finally:
            await pool.aclose()
    assert calls == 1


async def test_garbage_is_a_protocol_error_and_an_oversize_answer_too() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client gives up on us
        writer.close()

    async with serve_raw(garbage) as port:
        pool = H1Pool(f"http://{HOST}:{port}", max_connections=1)
        try:
            with pytest.raises(ProtocolError, match="not valid HTTP"):
                await pool.request(pool.head("POST", "/x", {}), b"{}")
        finally:
            await pool.aclose()
    fake = Counting()
    async with serve_app(fake.app) as port:
        pool = H1Pool(f"http://{HOST}:{port}", max_connections=1, max_body_bytes=1000)
        try:
            with pytest.raises(ProtocolError, match="exceeds 1000 bytes"):
                await pool.request(pool.head("POST", "/v1/big", {}), b"")
            assert (await pool.request(pool.head("POST", "/v1/echo", {}), b"ok")).body == b"ok"
        finally:
            await pool.aclose()


async def test_refused_connection_is_connect_error() -> None:
    async with serve_raw(read_request) as port:  # take a port, then free it: nothing listens there
        pass
    pool = H1Pool(f"http://{HOST}:{port}", max_connections=1)
    try:
        with pytest.raises(ConnectError, match="cannot connect"):
            await pool.request(pool.head("POST", "/x", {}), b"{}")
    finally:
        await pool.aclose()


async def test_timeout_fails_the_call_and_the_pool_goes_on() -> None:
    fake = Counting()
    async with serve_app(fake.app) as port:
        pool = H1Pool(f"http://{HOST}:{port}/v1", max_connections=2, timeout_s=0.3)
        try:
            t = time.monotonic()
            with pytest.raises(TimeoutError, match=r"within 0\.3s"):
                await pool.request(pool.head("POST", "/slow", {}), b"")
            assert time.monotonic() - t < 2.0
            assert (await pool.request(pool.head("POST", "/echo", {}), b"next")).body == b"next"
        finally:
            await pool.aclose()


async def test_a_cancelled_call_drops_its_connection_and_frees_its_slot() -> None:
    fake = Counting()
    async with serve_app(fake.app) as port:
        pool = H1Pool(f"http://{HOST}:{port}/v1", max_connections=1)
        try:
            task = asyncio.create_task(pool.request(pool.head("POST", "/slow", {}), b""))
            await asyncio.wait_for(fake.slow_started.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            r = await asyncio.wait_for(pool.request(pool.head("POST", "/echo", {}), b"free"), 5)
            assert r.body == b"free"
        finally:
            await pool.aclose()


async def test_https_verifies_the_server_certificate() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server_ctx)
    fake = Counting()
    async with serve_app(fake.app, server_ctx) as port:
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        pool = H1Pool(f"https://{HOST}:{port}/v1", max_connections=1, ssl_context=client_ctx)
        try:
            assert (await pool.request(pool.head("POST", "/echo", {}), b"tls")).body == b"tls"
        finally:
            await pool.aclose()
        other = ssl.create_default_context()
        trustme.CA().configure_trust(other)
        pool = H1Pool(f"https://{HOST}:{port}/v1", max_connections=1, ssl_context=other)
        try:
            with pytest.raises(ConnectError, match="TLS"):
                await pool.request(pool.head("POST", "/echo", {}), b"tls")
        finally:
            await pool.aclose()


async def test_close_fails_waiters_and_later_calls() -> None:
    fake = Counting()
    async with serve_app(fake.app) as port:
        pool = H1Pool(f"http://{HOST}:{port}/v1", max_connections=1)
        slow = asyncio.create_task(pool.request(pool.head("POST", "/slow", {}), b""))
        await asyncio.wait_for(fake.slow_started.wait(), 5)
        waiting = asyncio.create_task(pool.request(pool.head("POST", "/echo", {}), b""))
        # Queued for the one connection, which /slow holds.
        await eventually(lambda: pool._waiters, within=5, what="the second call waiting", every=0)
        await pool.aclose()
        with pytest.raises(ConnectionLost):
            await slow
        with pytest.raises(ConnectError):
            await waiting
        with pytest.raises(ConnectError):
            await pool.request(pool.head("POST", "/echo", {}), b"")


def test_works_on_uvloop_which_serve_runs_on() -> None:
    import uvloop

    # uvloop's transports are not asyncio.Transport subclasses: a type check there broke every call once.
    async def calls() -> list[bytes]:
        fake = Counting()
        async with serve_app(fake.app) as port:
            pool = H1Pool(f"http://{HOST}:{port}/v1", max_connections=2, timeout_s=5)
            try:
                head = pool.head("POST", "/echo", {})
                return [(await pool.request(head, b"%d" % i)).body for i in range(3)]
            finally:
                await pool.aclose()

    assert uvloop.run(calls()) == [b"0", b"1", b"2"]
