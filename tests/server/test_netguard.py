"""The SSRF address policy (server/netguard.py): pure functions, the guarded
resolver and socket factory, and the create-time check in validate.py.

No test here opens a connection: the resolver is fed by a fake, and the
socket factory's sockets are closed unconnected.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from google.protobuf import struct_pb2

from longbatch.server.config import ConfigError, Limits, WebhookSettings, config_from_dict
from longbatch.server.errors import InvalidArgument
from longbatch.server.netguard import (
    ALLOW_HINT,
    AllowList,
    ForbiddenAddress,
    Guard,
    forbidden_reason,
    host_problem,
    malformed_host,
    normalize_allow_entry,
    parse_ipv4_loose,
    parse_literal_host,
)
from longbatch.server.validate import MAX_USER_METADATA_BYTES, validate_create
from longbatch.v1 import batch_pb2

from support import generate_batch

# (address, words its reason must hold)
FORBIDDEN = [
    ("127.0.0.1", "a loopback address"),
    ("127.255.255.254", "a loopback address"),
    ("0.0.0.0", "the unspecified address"),
    ("0.1.2.3", "'this network'"),
    ("10.0.0.5", "a private address"),
    ("172.16.0.1", "a private address"),
    ("172.31.255.255", "a private address"),
    ("192.168.1.1", "a private address"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.255", "carrier-grade NAT"),
    ("169.254.169.254", "a link-local address"),
    ("224.0.0.1", "a multicast address"),
    ("239.255.255.250", "a multicast address"),
    ("255.255.255.255", "the broadcast address"),
    ("240.0.0.1", "a reserved address"),
    ("192.0.0.8", "IETF protocol assignments"),
    ("192.0.2.1", "a documentation address"),
    ("198.51.100.7", "a documentation address"),
    ("203.0.113.9", "a documentation address"),
    ("198.18.0.1", "a benchmarking address"),
    ("198.19.255.255", "a benchmarking address"),
    ("192.88.99.1", "6to4 relay anycast"),
    ("::", "the unspecified address"),
    ("::1", "a loopback address"),
    ("fe80::1", "a link-local address"),
    ("fe80::1%eth0", "a link-local address"),
    ("febf::1", "a link-local address"),
    ("fc00::1", "unique local"),
    ("fd12:3456::1", "unique local"),
    ("fec0::1", "site-local"),
    ("ff02::1", "a multicast address"),
    ("ff0e::1", "a multicast address"),
    ("2001:db8::1", "a documentation address"),
    ("3fff::1", "a documentation address"),
    ("100::1", "discard-only"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("5f00::1", "SRv6"),
    ("2001:2::1", "IETF protocol assignments"),
    ("4000::1", "not global unicast"),
    # IPv6 forms carrying a refused IPv4 address: the IPv4 reason, and the form.
    ("::ffff:127.0.0.1", "a loopback address (IPv4-mapped 127.0.0.1)"),
    ("::ffff:169.254.169.254", "a link-local address (IPv4-mapped 169.254.169.254)"),
    ("::ffff:10.0.0.1", "a private address (IPv4-mapped 10.0.0.1)"),
    ("::ffff:0.0.0.0", "the unspecified address (IPv4-mapped 0.0.0.0)"),
    ("::127.0.0.1", "a loopback address (IPv4-compatible 127.0.0.1)"),
    ("::8.8.8.8", "IPv4-compatible, deprecated"),
    ("::ffff:0:7f00:1", "a loopback address (IPv4-translated 127.0.0.1)"),
    ("::1:0:0:1", "a reserved address"),
    ("64:ff9b::7f00:1", "a loopback address (NAT64 127.0.0.1)"),
    ("64:ff9b::a9fe:a9fe", "a link-local address (NAT64 169.254.169.254)"),
    ("2002:7f00:1::", "a loopback address (6to4 127.0.0.1)"),
    ("2002:a00:5::1", "a private address (6to4 10.0.0.5)"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "a documentation address (Teredo client 192.0.2.45)"),
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "a reserved address (Teredo)"),
]

PUBLIC = [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "11.0.0.1", "100.63.255.255", "100.128.0.0", "169.253.255.255",
    "172.32.0.1", "192.0.3.1", "198.20.0.1", "223.255.255.255", "2606:4700:4700::1111", "2a00:1450:4001::1",
    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
]


@pytest.mark.parametrize(("address", "reason"), FORBIDDEN)
def test_forbidden_addresses(address: str, reason: str) -> None:
    got = forbidden_reason(ipaddress.ip_address(address))
    assert got is not None and reason in got, got


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(("host", "address"), [
    ("0x7f000001", "127.0.0.1"),
    ("0X7F000001", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("0300.0250.0.1", "192.168.0.1"),
    ("0xA9.0xFE.0xA9.0xFE", "169.254.169.254"),
    ("3232235521", "192.168.0.1"),
    ("8.8.8.8", "8.8.8.8"),
])
def test_loose_ipv4_spellings(host: str, address: str) -> None:
    assert parse_ipv4_loose(host) == ipaddress.IPv4Address(address)


@pytest.mark.parametrize("host", ["example.com", "1.2.3.4.5", "256.1.1.1", "1.2.3.256", "08.0.0.1", "4294967296",
                                  "1..2", "", "127.0.0.1..", "0x1g", "1.2.65536", "-1"])
def test_not_ipv4(host: str) -> None:
    assert parse_ipv4_loose(host) is None


def test_literal_hosts_as_urlsplit_gives_them() -> None:
    def host(uri: str) -> str:
        parsed = urlsplit(uri).hostname
        assert parsed is not None
        return parsed

    assert parse_literal_host(host("http://[::ffff:127.0.0.1]:8080/x")) == ipaddress.ip_address("::ffff:7f00:1")
    assert parse_literal_host("[::1]") == ipaddress.ip_address("::1")
    assert parse_literal_host(host("http://0x7f000001/")) == ipaddress.ip_address("127.0.0.1")
    assert parse_literal_host(host("http://hooks.example.com/")) is None
    assert parse_literal_host("not:an:address") is None


ALLOW_NONE = AllowList()


@pytest.mark.parametrize(("host", "words"), [
    ("127.0.0.1", "points at 127.0.0.1, a loopback address"),
    ("0x7f000001", "points at 127.0.0.1 (written '0x7f000001'), a loopback address"),
    ("2130706433", "points at 127.0.0.1 (written '2130706433')"),
    ("0177.0.0.1", "points at 127.0.0.1 (written '0177.0.0.1')"),
    ("127.1", "points at 127.0.0.1 (written '127.1')"),
    ("::ffff:127.0.0.1", "points at ::ffff:7f00:1 (written '::ffff:127.0.0.1'), a loopback address (IPv4-mapped"),
    ("0.0.0.0", "the unspecified address"),
    ("::", "the unspecified address"),
    ("169.254.169.254", "a link-local address"),
    ("10.1.2.3", "a private address"),
    ("localhost", "names 'localhost', a loopback host"),
    ("LOCALHOST.", "a loopback host"),
    ("api.localhost", "a loopback host"),
    ("ip6-localhost", "a loopback host"),
])
def test_host_problem(host: str, words: str) -> None:
    problem = host_problem(host, ALLOW_NONE)
    assert problem is not None and words in problem, problem


def test_host_problem_leaves_names_and_public_addresses() -> None:
    for host in ("hooks.example.com", "8.8.8.8", "2606:4700:4700::1111", "localhost.example.com", "x-1.test"):
        assert host_problem(host, ALLOW_NONE) is None


def test_allow_list() -> None:
    allow = AllowList.parse(["10.1.2.0/24", "hooks.internal", "127.0.0.1", "fd00::/8", "Upper.Example."])
    assert allow.permits_address(ipaddress.ip_address("10.1.2.200"))
    assert not allow.permits_address(ipaddress.ip_address("10.1.3.1"))
    assert allow.permits_address(ipaddress.ip_address("127.0.0.1"))
    assert not allow.permits_address(ipaddress.ip_address("127.0.0.2"))
    # The IPv4-mapped form is the same host, so the IPv4 entry covers it.
    assert allow.permits_address(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert allow.permits_address(ipaddress.ip_address("fd00::1%eth0"))
    assert allow.permits_name("hooks.internal") and allow.permits_name("HOOKS.internal.")
    assert allow.permits_name("upper.example") and not allow.permits_name("other.internal")
    assert host_problem("127.0.0.1", allow) is None and host_problem("10.1.2.3", allow) is None
    assert host_problem("0x7f000001", allow) is None  # the same address, however spelt
    assert host_problem("127.0.0.2", allow) is not None
    assert host_problem("localhost", AllowList.parse(["localhost"])) is None


@pytest.mark.parametrize(("entry", "words"), [
    ("10.1.2.5/24", "did you mean '10.1.2.0/24'"),
    ("10.1.2.0/33", "is not a network"),
    ("127.1", "four decimal numbers"),
    ("0x7f000001", "four decimal numbers"),
    ("bad host!", "neither a network, an address nor a host name"),
    ("", "expected a network"),
])
def test_bad_allow_entries(entry: str, words: str) -> None:
    with pytest.raises(ValueError) as e:
        normalize_allow_entry(entry)
    assert words in str(e.value)


def test_config_allow() -> None:
    config = config_from_dict({"webhooks": {"allow": ["10.1.2.0/24", "hooks.internal", "127.0.0.1", "[::1]",
                                                      "Hooks.Example."]}})
    assert config.webhooks.allow == ("10.1.2.0/24", "hooks.internal", "127.0.0.1", "::1", "hooks.example")
    assert config_from_dict({}).webhooks.allow == ()
    with pytest.raises(ConfigError, match=r"webhooks\.allow\[1\]: '10\.0\.0\.1/8' has bits set"):
        config_from_dict({"webhooks": {"allow": ["hooks.internal", "10.0.0.1/8"]}})
    with pytest.raises(ConfigError, match=r"webhooks\.allow: expected a list"):
        config_from_dict({"webhooks": {"allow": "10.0.0.0/8"}})
    with pytest.raises(ConfigError, match=r"webhooks\.allow\[0\]"):
        config_from_dict({"webhooks": {"allow": [10]}})


class Answers(AbstractResolver):
    """A resolver stand-in: fixed answers, every question recorded."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        self.asked.append(host)
        return [ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                              proto=0, flags=0) for a in self.answers[host]]

    async def close(self) -> None:
        pass


async def test_resolver_refuses_names_that_resolve_to_refused_addresses() -> None:
    inner = Answers({"private.test": ["10.0.0.5"], "meta.test": ["169.254.169.254"],
                     "mapped.test": ["::ffff:127.0.0.1"], "mixed.test": ["10.0.0.5", "8.8.8.8"],
                     "public.test": ["8.8.8.8"], "odd.test": ["0x7f000001"], "hooks.internal": ["10.9.9.9"],
                     "empty.test": []})
    resolver = Guard(AllowList.parse(["hooks.internal"])).resolver(inner)
    for name, words in (("private.test", "resolves to 10.0.0.5, a private address"),
                        ("meta.test", "resolves to 169.254.169.254, a link-local address"),
                        ("mapped.test", "resolves to ::ffff:7f00:1, a loopback address (IPv4-mapped 127.0.0.1)"),
                        ("odd.test", "resolves to '0x7f000001', not a numeric address"),
                        ("empty.test", "resolves to no address")):
        with pytest.raises(ForbiddenAddress) as e:
            await resolver.resolve(name, 80)
        assert f"webhook host {name} {words}" in str(e.value)
    with pytest.raises(ForbiddenAddress, match=r"resolves to 10\.0\.0\.5, a private address; allow it with"):
        await resolver.resolve("private.test", 80)
    # A refused answer is dropped, a permitted one kept.
    assert [r["host"] for r in await resolver.resolve("mixed.test", 80)] == ["8.8.8.8"]
    assert [r["host"] for r in await resolver.resolve("public.test", 443)] == ["8.8.8.8"]
    # An allowed name may resolve to anything.
    assert [r["host"] for r in await resolver.resolve("hooks.internal", 80)] == ["10.9.9.9"]

    # Literals aiohttp hands over as names, and the localhost names, are
    # judged without asking the resolver.
    inner.asked.clear()
    for host, words in (("0x7f000001", "is 127.0.0.1, a loopback address"), ("2130706433", "is 127.0.0.1"),
                        ("127.1", "is 127.0.0.1"), ("0xa9fea9fe", "is 169.254.169.254, a link-local address"),
                        ("localhost", "is a loopback name"), ("x.localhost", "is a loopback name")):
        with pytest.raises(ForbiddenAddress, match=words):
            await resolver.resolve(host, 80)
    assert [r["host"] for r in await resolver.resolve("0x08080808", 80)] == ["8.8.8.8"]
    assert inner.asked == []
    await resolver.close()


def test_socket_factory_checks_the_address_connected_to() -> None:
    guard = Guard(AllowList.parse(["127.0.0.1"]))
    for address, words in ((("10.0.0.5", 80), "connection to 10.0.0.5 refused: a private address; " + ALLOW_HINT),
                           (("::ffff:169.254.169.254", 80, 0, 0), "a link-local address (IPv4-mapped"),
                           (("::1", 80, 0, 0), "a loopback address"),
                           (("localhost", 80), "not a numeric address"),
                           (("2130706433", 80), "not a numeric address")):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        with pytest.raises(ForbiddenAddress) as e:
            guard.socket_factory((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address))
        assert words in str(e.value)
    sock = guard.socket_factory((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 80)))
    sock.close()
    # Addresses an allowed name resolved to pass too.
    guard.vouch([ipaddress.ip_address("10.0.0.5")])
    guard.socket_factory((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("10.0.0.5", 80))).close()


def _with_hooks(uris: list[str], metadata: struct_pb2.Struct | None = None) -> batch_pb2.GenerateContentBatch:
    return generate_batch(1, webhook_config=batch_pb2.WebhookConfig(uris=uris, user_metadata=metadata)).batch


def _violations(batch: batch_pb2.GenerateContentBatch, allow: AllowList | None) -> list[tuple[str, str]]:
    try:
        validate_create(batch, "", Limits(), allow)
    except InvalidArgument as e:
        return list(e.violations)
    return []


CREATE_REFUSED = ["http://127.0.0.1/h", "http://localhost:8080/h", "http://[::ffff:127.0.0.1]/h",
                  "http://0x7f000001/h", "http://0.0.0.0/h", "https://169.254.169.254/latest/meta-data",
                  "http://10.0.0.5/h", "http://172.16.0.1/h", "http://192.168.0.1/h", "http://100.64.0.1/h",
                  "http://[::1]/h", "http://[::]/h", "http://[fe80::1%25eth0]/h", "http://[fc00::1]/h",
                  "http://224.0.0.1/h", "http://[ff02::1]/h", "http://240.0.0.1/h", "http://255.255.255.255/h",
                  "http://192.0.2.1/h", "http://[2001:db8::1]/h", "http://198.18.0.1/h", "http://2130706433/h",
                  "http://0177.0.0.1/h", "http://127.1/h", "http://hooks.localhost/h", "http://[::127.0.0.1]/h",
                  "http://[64:ff9b::a9fe:a9fe]/h", "http://[2002:7f00:1::]/h", "http://0xa9fea9fe/h",
                  "http://user:pw@127.0.0.1:9/h?x=1"]


@pytest.mark.parametrize("uri", CREATE_REFUSED)
def test_create_refuses_literal_forbidden_hosts(uri: str) -> None:
    violations = _violations(_with_hooks(["https://hooks.example.com/ok", uri]), ALLOW_NONE)
    assert len(violations) == 1, violations
    field, description = violations[0]
    assert field == "batch.webhook_config.uris[1]"
    assert "unless the server's [webhooks] allow lists them" in description
    # The server that lists the host lets it through.
    host = urlsplit(uri).hostname
    assert host is not None
    entry = host if not parse_literal_host(host) else str(parse_literal_host(host)).split("%")[0]
    assert _violations(_with_hooks([uri]), AllowList.parse([entry])) == []
    # Without the allow-list (a caller that does not pass it) the check is left to delivery.
    assert _violations(_with_hooks([uri]), None) == []


def test_create_refuses_malformed_hosts_and_ports() -> None:
    assert malformed_host("1.2.3.08") and malformed_host("1.2.3.4.5") and malformed_host("host.0x10")
    assert not malformed_host("127.1") and not malformed_host("example.com") and not malformed_host("::1")
    for uri in ("http://[::1/h", "http://example.com:99999/h", "http://example.com:x/h", "http://1.2.3.08/h",
                "http://1.2.3.4.5/h"):
        assert [f for f, _ in _violations(_with_hooks([uri]), ALLOW_NONE)] == ["batch.webhook_config.uris[0]"], uri


def test_user_metadata_is_capped() -> None:
    def metadata(size: int) -> struct_pb2.Struct:
        # Length prefixes grow with the string: step down to the exact size.
        meta = struct_pb2.Struct()
        n = size
        while True:
            meta.update({"blob": "x" * n})
            if meta.ByteSize() <= size:
                return meta
            n -= 1

    at_limit = metadata(MAX_USER_METADATA_BYTES)
    assert MAX_USER_METADATA_BYTES - 2 <= at_limit.ByteSize() <= MAX_USER_METADATA_BYTES
    assert _violations(_with_hooks(["https://hooks.example.com/"], at_limit), ALLOW_NONE) == []
    over = metadata(MAX_USER_METADATA_BYTES + 3)
    size = over.ByteSize()
    assert size > MAX_USER_METADATA_BYTES
    assert _violations(_with_hooks(["https://hooks.example.com/"], over), ALLOW_NONE) == [
        ("batch.webhook_config.user_metadata", f"is {size} bytes serialized; the limit is {MAX_USER_METADATA_BYTES}")]


def test_settings_default_allow_nothing() -> None:
    assert WebhookSettings().allow == ()
