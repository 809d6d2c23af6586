"""Network safety for the webhook tests: nothing may leave loopback.

Two fixtures, for every test that makes the server send webhooks (a module
defines them as one-line wrappers of :func:`guard_loopback` and
:func:`install_fake_dns`, so that no fixture is imported by name):

- ``loopback_only`` patches the connect paths Python code takes (the socket
  methods ``connect``, ``connect_ex``, ``sendto`` and ``sendmsg``, the event
  loop's ``sock_connect``, ``create_connection`` and
  ``create_datagram_endpoint``, and name lookups through
  ``socket.getaddrinfo``) so that an attempt to reach anything but
  ``127.0.0.1`` or ``::1``, or to look a name up (a DNS query is a packet
  too), raises before it happens and fails the test at teardown, even where
  the server swallows the error. This is what keeps a bug in the SSRF guard
  from sending a packet anywhere.
- ``fake_dns`` replaces the resolver the webhook dispatcher looks names up
  with: names map to the addresses a test gives, unknown names fail, no query
  is ever sent.

Code in C extensions (gRPC's C-core) is not covered; the tests point it at
127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from longbatch.server import netguard

LOOPBACK = frozenset({"127.0.0.1", "::1"})


class NonLoopbackConnect(OSError):
    """A test tried to reach a non-loopback address."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)  # strerror: what aiohttp shows of it


class LeakGuard:
    """What ``loopback_only`` refused; :meth:`take` claims the refusals a
    test provoked on purpose, anything left fails the test."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def check(self, what: str, address: object) -> None:
        """Raise (and remember) unless ``address`` is loopback or a local socket path."""
        if isinstance(address, str | bytes):
            return  # an AF_UNIX path: no network
        host = address[0] if isinstance(address, tuple) and address else address
        if isinstance(host, str) and host in LOOPBACK:
            return
        self.refused.append(f"{what} {address!r}")
        raise NonLoopbackConnect(f"test tried {what} to {address!r}; only 127.0.0.1 and ::1 may be reached")

    def check_lookup(self, host: object) -> None:
        """Raise (and remember) unless ``host`` needs no query: None or a numeric address."""
        if host is None:
            return
        text = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            self.refused.append(f"getaddrinfo {text!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"test tried to look up {text!r}; names are not resolved "
                                                     "in tests") from None

    def take(self) -> list[str]:
        """The refusals so far, forgotten."""
        out, self.refused = self.refused, []
        return out


def guard_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[LeakGuard]:
    """The ``loopback_only`` fixture: refuse, and fail the test on, any
    connection beyond loopback; see the module docstring."""
    guard = LeakGuard()
    raw = socket.socket

    real_connect = raw.connect
    real_connect_ex = raw.connect_ex
    real_sendto = raw.sendto
    real_sendmsg = raw.sendmsg

    def connect(self: socket.socket, address: Any) -> None:
        guard.check("connect", address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        guard.check("connect_ex", address)
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        guard.check("sendto", args[-1])
        return real_sendto(self, data, *args)  # type: ignore[call-overload,no-any-return]

    def sendmsg(self: socket.socket, *args: Any) -> int:
        if len(args) >= 4 and args[3] is not None:
            guard.check("sendmsg", args[3])
        return real_sendmsg(self, *args)

    loop_cls = asyncio.selector_events.BaseSelectorEventLoop
    real_sock_connect = loop_cls.sock_connect
    base_cls = asyncio.base_events.BaseEventLoop
    real_create_connection = base_cls.create_connection
    real_datagram = base_cls.create_datagram_endpoint
    real_getaddrinfo = socket.getaddrinfo

    async def sock_connect(self: asyncio.AbstractEventLoop, sock: socket.socket, address: Any) -> None:
        guard.check("sock_connect", address)
        await real_sock_connect(self, sock, address)  # type: ignore[arg-type]

    async def create_connection(self: asyncio.AbstractEventLoop, factory: Any, host: Any = None, port: Any = None,
                                **kw: Any) -> Any:
        if host is not None:
            guard.check("create_connection", (host, port))
        return await real_create_connection(self, factory, host, port, **kw)  # type: ignore[arg-type]

    async def create_datagram_endpoint(self: asyncio.AbstractEventLoop, factory: Any, local_addr: Any = None,
                                       remote_addr: Any = None, **kw: Any) -> Any:
        if remote_addr is not None:
            guard.check("create_datagram_endpoint", remote_addr)
        return await real_datagram(self, factory, local_addr, remote_addr, **kw)  # type: ignore[arg-type]

    def getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
        guard.check_lookup(host)
        return real_getaddrinfo(host, *args, **kw)

    monkeypatch.setattr(raw, "connect", connect)
    monkeypatch.setattr(raw, "connect_ex", connect_ex)
    monkeypatch.setattr(raw, "sendto", sendto)
    monkeypatch.setattr(raw, "sendmsg", sendmsg)
    monkeypatch.setattr(loop_cls, "sock_connect", sock_connect)
    monkeypatch.setattr(base_cls, "create_connection", create_connection)
    monkeypatch.setattr(base_cls, "create_datagram_endpoint", create_datagram_endpoint)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield guard
    assert not guard.refused, f"the test tried to leave loopback: {guard.refused}"


Answer = list[str] | Callable[[], list[str]]


class FakeDNS(AbstractResolver):
    """Names to addresses, as a test says; an unknown name fails, as NXDOMAIN would."""

    def __init__(self) -> None:
        self.names: dict[str, Answer] = {}
        self.asked: list[str] = []

    def add(self, name: str, answer: Answer) -> None:
        """``name`` resolves to ``answer`` (a list, or a function called per lookup)."""
        self.names[name.lower()] = answer

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        """The addresses given for ``host``."""
        self.asked.append(host)
        answer = self.names.get(host.lower().rstrip("."))
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, f"test DNS: no such name {host!r}")
        addresses = answer() if callable(answer) else answer
        return [ResolveResult(hostname=host, host=a, port=port,
                              family=socket.AF_INET6 if ":" in a else socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST) for a in addresses]

    async def close(self) -> None:
        """Nothing to release."""


def install_fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    """The ``fake_dns`` fixture: the webhook dispatcher's resolver for this
    test (see the module docstring)."""
    dns = FakeDNS()
    monkeypatch.setattr(netguard, "system_resolver", lambda: dns)
    return dns
