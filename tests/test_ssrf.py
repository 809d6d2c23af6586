"""The webhook SSRF guard against the real server (issue 12, item 2).

Every form of a refused address, written literally in a URI or reached
through a name, is refused without a packet; an allow-listed receiver is
delivered. Names are resolved by the test DNS (``netsafety.fake_dns``), and
``netsafety.loopback_only`` fails any test that tries to connect anywhere but
127.0.0.1 and ::1, so a bug in the guard cannot send a packet out either.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from conftest import MakeServer
from netsafety import FakeDNS, LeakGuard, NonLoopbackConnect
from test_webhooks import Plan, Receiver, Reply, delivery_rows, fast, receiver_pool, wait_rows, webhook_batch

from longbatch.server import netguard
from longbatch.server.config import DEFAULT_MODELS, ModelConfig, ServerConfig
from longbatch.server.netguard import ALLOW_HINT
from longbatch.v1 import batch_pb2

from support import Stubs, details, metadata_of, wait_done

pytestmark = pytest.mark.usefixtures("loopback_only", "fake_dns")


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[[Plan], Awaitable[Receiver]]]:
    async for make in receiver_pool():
        yield make

SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED

# Written in a URI: (host as written, the address or name it is refused as).
LITERALS = [
    ("127.0.0.1", "points at 127.0.0.1, a loopback address"),
    ("localhost", "names 'localhost', a loopback host"),
    ("[::ffff:127.0.0.1]", "points at ::ffff:7f00:1 (written '::ffff:127.0.0.1'), a loopback address"),
    ("0x7f000001", "points at 127.0.0.1 (written '0x7f000001'), a loopback address"),
    ("2130706433", "points at 127.0.0.1 (written '2130706433')"),
    ("0177.0.0.1", "points at 127.0.0.1 (written '0177.0.0.1')"),
    ("127.1", "points at 127.0.0.1 (written '127.1')"),
    ("0.0.0.0", "points at 0.0.0.0, the unspecified address"),
    ("[::]", "points at ::, the unspecified address"),
    ("169.254.169.254", "points at 169.254.169.254, a link-local address"),
    ("[fe80::1]", "a link-local address"),
    ("10.0.0.5", "points at 10.0.0.5, a private address"),
    ("172.16.0.1", "a private address"),
    ("192.168.1.1", "a private address"),
    ("100.64.0.1", "a private address (carrier-grade NAT)"),
    ("[fc00::1]", "a private address (unique local)"),
    ("[::1]", "points at ::1, a loopback address"),
    ("224.0.0.1", "a multicast address"),
    ("[ff02::1]", "a multicast address"),
    ("240.0.0.1", "a reserved address"),
    ("255.255.255.255", "the broadcast address"),
    ("192.0.2.1", "a documentation address"),
    ("[2001:db8::1]", "a documentation address"),
    ("198.18.0.1", "a benchmarking address"),
    ("api.localhost", "names 'api.localhost', a loopback host"),
    ("[::127.0.0.1]", "a loopback address (IPv4-compatible 127.0.0.1)"),
    ("[64:ff9b::a9fe:a9fe]", "a link-local address (NAT64 169.254.169.254)"),
    ("[2002:7f00:1::]", "a loopback address (6to4 127.0.0.1)"),
]

# Reached through a name: (name, the address the test DNS answers, its reason).
RESOLVED = [
    ("loopback.test", "127.0.0.1", "a loopback address"),
    ("loopback6.test", "::1", "a loopback address"),
    ("mapped.test", "::ffff:127.0.0.1", "a loopback address (IPv4-mapped 127.0.0.1)"),
    ("zero.test", "0.0.0.0", "the unspecified address"),
    ("unspecified6.test", "::", "the unspecified address"),
    ("metadata.test", "169.254.169.254", "a link-local address"),
    ("linklocal6.test", "fe80::1", "a link-local address"),
    ("private.test", "10.0.0.5", "a private address"),
    ("private172.test", "172.16.5.4", "a private address"),
    ("private192.test", "192.168.0.10", "a private address"),
    ("cgnat.test", "100.64.1.2", "a private address (carrier-grade NAT)"),
    ("ula.test", "fd00::5", "a private address (unique local)"),
    ("multicast.test", "224.0.0.251", "a multicast address"),
    ("multicast6.test", "ff02::fb", "a multicast address"),
    ("reserved.test", "240.0.0.1", "a reserved address"),
    ("broadcast.test", "255.255.255.255", "the broadcast address"),
    ("doc.test", "192.0.2.10", "a documentation address"),
    ("doc6.test", "2001:db8::10", "a documentation address"),
    ("bench.test", "198.18.0.10", "a benchmarking address"),
    ("compat.test", "::127.0.0.1", "a loopback address (IPv4-compatible 127.0.0.1)"),
    ("nat64.test", "64:ff9b::a00:5", "a private address (NAT64 10.0.0.5)"),
    ("sixtofour.test", "2002:a9fe:a9fe::1", "a link-local address (6to4 169.254.169.254)"),
]

# Holds a batch unfinished for as long as a test needs (one request, 60 s).
HOLD = ModelConfig(name="models/hold", backend="echo", max_concurrency=1, latency_s=60.0)
RELEASED = ModelConfig(name="models/hold", backend="echo", max_concurrency=1)


def chunks(items: list[str], size: int = 10) -> list[list[str]]:
    """Webhook URIs a batch at a time (10 at most per batch)."""
    return [items[i:i + size] for i in range(0, len(items), size)]


async def test_literal_forms_are_refused_at_create(make_server: MakeServer) -> None:
    server = await make_server(ServerConfig(webhooks=fast(allow=())))
    stubs = Stubs.connect(server.target)
    try:
        for host, words in LITERALS:
            uri = f"http://{host}:8080/hook"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stubs.batches.BatchGenerateContent(webhook_batch(["https://hooks.example.com/ok", uri]))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, host
            got = details(e.value)
            assert [f for f, _ in got.violations] == ["batch.webhook_config.uris[1]"], host
            assert words in got.violations[0][1], got.violations
        assert delivery_rows(server.data_dir) == []
    finally:
        await stubs.channel.close()


async def test_stored_deliveries_to_literal_forms_fail_without_a_connection(
    make_server: MakeServer, tmp_path: Path, fake_dns: FakeDNS
) -> None:
    """A delivery stored while the allow-list covered its host (or before the
    guard existed) is refused at send time once it no longer does."""
    data = tmp_path / "data"
    everything = ("0.0.0.0/0", "::/0", "localhost", "api.localhost")
    first = await make_server(ServerConfig(models=(*DEFAULT_MODELS, HOLD), webhooks=fast(allow=everything)),
                              data_dir=data)
    stubs = Stubs.connect(first.target)
    uris = [f"http://{host}:8080/hook" for host, _ in LITERALS]
    try:
        names = [(await stubs.batches.BatchGenerateContent(webhook_batch(group, model=HOLD.name, n=1))).name
                 for group in chunks(uris)]
    finally:
        await stubs.channel.close()
    # Stopped with its batches unfinished: nothing was ever sent from here.
    await first.running.stop(grace_s=0.5)
    assert delivery_rows(data) == []

    second = await make_server(ServerConfig(models=(*DEFAULT_MODELS, RELEASED), webhooks=fast(allow=())),
                               data_dir=data)
    stubs = Stubs.connect(second.target)
    try:
        for name in names:
            assert metadata_of(await wait_done(stubs, name, within=15)).state == SUCCEEDED
        rows = await wait_rows(data, lambda rows: len(rows) == len(uris) and all(r[1] == "failed" for r in rows))
    finally:
        await stubs.channel.close()
    by_uri = {uri: (status, attempts, error) for uri, status, attempts, error in rows}
    for (_, words), uri in zip(LITERALS, uris, strict=True):
        status, attempts, error = by_uri[uri]
        # One attempt, final: the host alone decides, so retrying cannot help.
        assert (status, attempts) == ("failed", 1), uri
        assert error is not None and words in error and error.endswith(ALLOW_HINT), (uri, error)
    assert fake_dns.asked == []  # localhost names and odd spellings are never looked up


async def test_names_resolving_to_refused_addresses_fail_at_connect(
    make_server: MakeServer, fake_dns: FakeDNS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="longbatch.webhooks")
    for name, address, _ in RESOLVED:
        fake_dns.add(name, [address])
    server = await make_server(ServerConfig(webhooks=fast(max_attempts=1, allow=())))
    stubs = Stubs.connect(server.target)
    uris = [f"http://{name}:8080/hook?token=secret" for name, _, _ in RESOLVED]
    try:
        for group in chunks(uris):
            op = await stubs.batches.BatchGenerateContent(webhook_batch(group))
            assert metadata_of(await wait_done(stubs, op.name, within=15)).state == SUCCEEDED
        rows = await wait_rows(server.data_dir,
                               lambda rows: len(rows) == len(uris) and all(r[1] == "failed" for r in rows))
    finally:
        await stubs.channel.close()
    by_uri = {uri: error for uri, _, _, error in rows}
    for (name, address, reason), uri in zip(RESOLVED, uris, strict=True):
        canonical = str(ipaddress.ip_address(address))
        assert by_uri[uri] == f"webhook host {name} resolves to {canonical}, {reason}; {ALLOW_HINT}"
    assert sorted(set(fake_dns.asked)) == sorted(name for name, _, _ in RESOLVED)
    assert "resolves to 10.0.0.5, a private address; allow it with [webhooks] allow" in caplog.text
    assert "secret" not in caplog.text


async def test_allow_listed_receivers_are_delivered(
    make_server: MakeServer, fake_dns: FakeDNS, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    rx = await receivers(lambda _path, _n: Reply(200))
    port = int(rx.base.rsplit(":", 1)[1])
    fake_dns.add("rx.test", ["127.0.0.1"])
    fake_dns.add("hooks.internal", ["127.0.0.1"])
    # A private address first: it is dropped, the allowed one is connected to.
    fake_dns.add("mixed.test", ["10.0.0.5", "127.0.0.1"])

    # By address (a literal and two names that resolve to it).
    by_address = await make_server(ServerConfig(webhooks=fast(allow=("127.0.0.1",))))
    stubs = Stubs.connect(by_address.target)
    try:
        uris = [f"{rx.base}/literal", f"http://rx.test:{port}/name", f"http://mixed.test:{port}/mixed"]
        op = await stubs.batches.BatchGenerateContent(webhook_batch(uris))
        await wait_done(stubs, op.name, within=15)
        await rx.wait_for(lambda: {h.path for h in rx.hits} == {"/literal", "/name", "/mixed"})
        rows = await wait_rows(by_address.data_dir, lambda rows: [r[1] for r in rows] == ["delivered"] * 3)
        assert all(attempts == 1 for _, _, attempts, _ in rows)
    finally:
        await stubs.channel.close()

    # By name: hooks.internal may resolve to loopback; another name to the
    # same address may not, nor the address itself.
    by_name = await make_server(ServerConfig(webhooks=fast(allow=("hooks.internal",), max_attempts=1)))
    stubs = Stubs.connect(by_name.target)
    try:
        uris = [f"http://hooks.internal:{port}/allowed-name", f"http://rx.test:{port}/other-name"]
        op = await stubs.batches.BatchGenerateContent(webhook_batch(uris))
        await wait_done(stubs, op.name, within=15)
        rows = await wait_rows(by_name.data_dir, lambda rows: sorted(r[1] for r in rows) == ["delivered", "failed"])
    finally:
        await stubs.channel.close()
    errors = {uri: error for uri, _, _, error in rows}
    assert errors[uris[0]] is None
    assert errors[uris[1]] == f"webhook host rx.test resolves to 127.0.0.1, a loopback address; {ALLOW_HINT}"
    assert len(rx.on("/allowed-name")) == 1 and rx.on("/other-name") == []


async def test_default_server_refuses_a_loopback_receiver(
    make_server: MakeServer, fake_dns: FakeDNS, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    rx = await receivers(lambda _path, _n: Reply(200))
    port = int(rx.base.rsplit(":", 1)[1])
    fake_dns.add("rx.test", ["127.0.0.1"])
    server = await make_server(ServerConfig(webhooks=fast(max_attempts=2, allow=())))
    stubs = Stubs.connect(server.target)
    try:
        op = await stubs.batches.BatchGenerateContent(webhook_batch([f"http://rx.test:{port}/hook"]))
        await wait_done(stubs, op.name, within=15)
        rows = await wait_rows(server.data_dir, lambda rows: [r[1] for r in rows] == ["failed"])
    finally:
        await stubs.channel.close()
    # Two attempts (a name may resolve elsewhere later), neither sent.
    assert rows[0][2] == 2 and rows[0][3] is not None and "resolves to 127.0.0.1, a loopback address" in rows[0][3]
    assert rx.hits == []


async def test_dns_rebinding_is_checked_on_each_connection(
    make_server: MakeServer, fake_dns: FakeDNS, receivers: Callable[[Plan], Awaitable[Receiver]],
    caplog: pytest.LogCaptureFixture
) -> None:
    """The name answers loopback (allowed), then a private address, then
    loopback again: the second attempt is refused on the address it got."""
    caplog.set_level(logging.WARNING, logger="longbatch.webhooks")
    # The receiver closes each connection, so every attempt connects (and resolves) anew.
    rx = await receivers(lambda _path, n: Reply(500 if n == 1 else 200, {"Connection": "close"}))
    port = int(rx.base.rsplit(":", 1)[1])
    answers = iter([["127.0.0.1"], ["10.0.0.5"], ["127.0.0.1"]])
    fake_dns.add("flip.test", lambda: next(answers))
    server = await make_server(ServerConfig(webhooks=fast(allow=("127.0.0.1",))))
    stubs = Stubs.connect(server.target)
    try:
        op = await stubs.batches.BatchGenerateContent(webhook_batch([f"http://flip.test:{port}/hook"]))
        await wait_done(stubs, op.name, within=15)
        rows = await wait_rows(server.data_dir, lambda rows: [r[1] for r in rows] == ["delivered"])
    finally:
        await stubs.channel.close()
    assert rows[0][2] == 3 and [h.answered for h in rx.hits] == [500, 200]
    assert fake_dns.asked == ["flip.test"] * 3
    assert (f"attempt 2 failed (webhook host flip.test resolves to 10.0.0.5, a private address; {ALLOW_HINT})"
            in caplog.text)


async def test_a_guard_bug_still_sends_nothing(
    make_server: MakeServer, fake_dns: FakeDNS, loopback_only: LeakGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the address policy broken on purpose, the test's socket layer is
    what stops the connection: proof that these tests cannot leak a packet."""
    monkeypatch.setattr(netguard, "forbidden_reason", lambda _ip: None)
    fake_dns.add("private.test", ["10.0.0.5"])
    server = await make_server(ServerConfig(webhooks=fast(max_attempts=1, allow=())))
    stubs = Stubs.connect(server.target)
    try:
        op = await stubs.batches.BatchGenerateContent(webhook_batch(["http://private.test:8080/hook"]))
        await wait_done(stubs, op.name, within=15)
        rows = await wait_rows(server.data_dir, lambda rows: [r[1] for r in rows] == ["failed"])
    finally:
        await stubs.channel.close()
    assert rows[0][3] is not None and "only 127.0.0.1 and ::1 may be reached" in rows[0][3]
    assert loopback_only.take() == ["sock_connect ('10.0.0.5', 8080)"]


def test_the_socket_layer_refuses_everything_but_loopback(loopback_only: LeakGuard) -> None:
    targets: list[tuple[socket.AddressFamily, tuple[object, ...]]] = [(socket.AF_INET, ("10.0.0.1", 80))]
    if socket.has_ipv6:
        targets.append((socket.AF_INET6, ("2001:4860::1", 80, 0, 0)))
    for family, address in targets:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            with pytest.raises(NonLoopbackConnect):
                sock.connect(address)
            with pytest.raises(NonLoopbackConnect):
                sock.connect_ex(address)
        with socket.socket(family, socket.SOCK_DGRAM) as sock, pytest.raises(NonLoopbackConnect):
            sock.sendto(b"x", address)
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("example.com", 80)
    assert len(loopback_only.take()) == 3 * len(targets) + 1
    # Loopback and numeric lookups pass.
    assert socket.getaddrinfo("127.0.0.1", 80)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.connect(listener.getsockname())


async def test_redirects_are_not_followed(
    make_server: MakeServer, receivers: Callable[[Plan], Awaitable[Receiver]]
) -> None:
    """A receiver cannot bounce the POST to a refused address: a 3xx is a failed attempt."""
    rx = await receivers(lambda _path, _n: Reply(307, {"Location": "http://169.254.169.254/latest/meta-data"}))
    server = await make_server(ServerConfig(webhooks=fast(allow=("127.0.0.1",), max_attempts=1)))
    stubs = Stubs.connect(server.target)
    try:
        op = await stubs.batches.BatchGenerateContent(webhook_batch([f"{rx.base}/hook"]))
        await wait_done(stubs, op.name, within=15)
        rows = await wait_rows(server.data_dir, lambda rows: [r[1] for r in rows] == ["failed"])
    finally:
        await stubs.channel.close()
    assert rows[0][3] == "HTTP 307" and len(rx.hits) == 1
