"""Fixtures: a real longbatch server on 127.0.0.1:0 with a fresh data dir."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakemodel import FakeModel
from netsafety import FakeDNS, LeakGuard, guard_loopback, install_fake_dns

from longbatch.server.app import Running, start_server
from longbatch.server.config import ServerConfig

from support import Stubs

# Servers the tests start as processes take a free HTTP port, not 8080: two
# may run at once, and the machine may have something on 8080.
os.environ.setdefault("LONGBATCH_HTTP_PORT", "0")


@dataclass
class ServerHandle:
    """A running in-process server."""

    target: str
    port: int
    data_dir: Path
    running: Running

    @property
    def http(self) -> str:
        """Base URL of the server's HTTP API."""
        return f"http://127.0.0.1:{self.running.http_port}"


MakeServer = Callable[..., Awaitable[ServerHandle]]


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[MakeServer]:
    """Start servers with a given config; all stop at the end of the test.

    ``database_url`` (tests/pg.py's ``pg_url``, say) puts a server on
    PostgreSQL; by default it is on SQLite in its data dir.
    """
    started: list[Running] = []

    async def make(config: ServerConfig | None = None, data_dir: Path | None = None,
                   database_url: str | None = None) -> ServerHandle:
        data = data_dir or tmp_path / f"data{len(started)}"
        running = await start_server(config or ServerConfig(), data, "127.0.0.1", 0, http_port=0,
                                     database_url=database_url)
        started.append(running)
        return ServerHandle(f"127.0.0.1:{running.port}", running.port, data, running)

    yield make
    for running in reversed(started):
        await running.stop(grace_s=1.0)


@pytest.fixture
async def fake() -> AsyncIterator[FakeModel]:
    """A fake Gemini-REST model server (tests/fakemodel.py) with no faults; tests set ``fake.plan``.
    Tests of the openai backend override it with their fake OpenAI server."""
    f = FakeModel()
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[LeakGuard]:
    """Fail the test on any connect, send or name lookup aimed beyond 127.0.0.1/::1 (tests/netsafety.py)."""
    yield from guard_loopback(monkeypatch)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    """Names resolve through a test table, never the system resolver (tests/netsafety.py)."""
    return install_fake_dns(monkeypatch)


@pytest.fixture
async def server(make_server: MakeServer) -> ServerHandle:
    """A server on the embedded defaults (echo models, no keys)."""
    return await make_server()


@pytest.fixture
async def stubs(server: ServerHandle) -> AsyncIterator[Stubs]:
    """Async stubs connected to ``server``."""
    s = Stubs.connect(server.target)
    yield s
    await s.channel.close()
