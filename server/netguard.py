"""Which addresses a webhook may reach: the server-side request forgery guard.

A tenant chooses the URIs the server POSTs to, so without a guard any tenant
could make the server call its own loopback services, the cloud metadata
endpoint (``169.254.169.254``) or hosts on private networks. By default a
webhook may reach only public unicast addresses; refused are

- loopback, unspecified (``0.0.0.0``, ``::``) and "this network" (``0/8``);
- link-local (``169.254.0.0/16``, ``fe80::/10``);
- private: RFC 1918, carrier-grade NAT (``100.64.0.0/10``), unique local
  (``fc00::/7``), site-local (``fec0::/10``), local-use NAT64;
- multicast, broadcast, documentation and benchmarking ranges, and every other
  reserved range (IPv6 outside ``2000::/3`` included);
- the IPv6 forms that carry one of those IPv4 addresses: IPv4-mapped
  (``::ffff:127.0.0.1``), IPv4-compatible (``::127.0.0.1``), NAT64
  (``64:ff9b::7f00:1``), 6to4 (``2002:7f00:1::``) and Teredo clients.

``[webhooks] allow`` (an :class:`AllowList`) lets an operator's internal
receivers through: networks, addresses and exact host names.

The check happens twice. At create time :func:`host_problem` refuses what the
URI alone shows: literal addresses, in every spelling a resolver accepts
(``0x7f000001``, ``2130706433``, ``0177.0.0.1``, ``127.1``), and the
``localhost`` names. At connect time :class:`Guard` checks the address that is
actually connected to: its :class:`GuardedResolver` resolves names and drops
refused answers, and its :meth:`Guard.socket_factory` refuses any socket to a
refused address whatever path led there. Because the address checked is the
one the connection uses, a name that resolves to a public address once and to
a private one later (DNS rebinding) gains nothing.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import AddrInfoType
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW_HINT = "allow it with [webhooks] allow"

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# First match wins, so a narrow range with its own reason comes before the
# wider one holding it (0.0.0.0 before 0/8, broadcast before 240/4).
_V4_RULES: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/32"), "the unspecified address"),
    (_V4("0.0.0.0/8"), "a reserved address ('this network')"),
    (_V4("10.0.0.0/8"), "a private address"),
    (_V4("100.64.0.0/10"), "a private address (carrier-grade NAT)"),
    (_V4("127.0.0.0/8"), "a loopback address"),
    (_V4("169.254.0.0/16"), "a link-local address"),
    (_V4("172.16.0.0/12"), "a private address"),
    (_V4("192.0.0.0/24"), "a reserved address (IETF protocol assignments)"),
    (_V4("192.0.2.0/24"), "a documentation address"),
    (_V4("192.88.99.0/24"), "a reserved address (6to4 relay anycast)"),
    (_V4("192.168.0.0/16"), "a private address"),
    (_V4("198.18.0.0/15"), "a benchmarking address"),
    (_V4("198.51.100.0/24"), "a documentation address"),
    (_V4("203.0.113.0/24"), "a documentation address"),
    (_V4("224.0.0.0/4"), "a multicast address"),
    (_V4("255.255.255.255/32"), "the broadcast address"),
    (_V4("240.0.0.0/4"), "a reserved address"),
)

_V6_RULES: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("100::/64"), "a reserved address (discard-only)"),
    (_V6("2001:db8::/32"), "a documentation address"),
    (_V6("2001::/23"), "a reserved address (IETF protocol assignments)"),
    (_V6("3fff::/20"), "a documentation address"),
    (_V6("5f00::/16"), "a reserved address (SRv6)"),
    (_V6("fc00::/7"), "a private address (unique local)"),
    (_V6("fe80::/10"), "a link-local address"),
    (_V6("fec0::/10"), "a private address (site-local)"),
    (_V6("ff00::/8"), "a multicast address"),
)
_V6_GLOBAL = _V6("2000::/3")  # IANA assigns global unicast from here only
_V4_MAPPED = _V6("::ffff:0:0/96")
_V4_COMPATIBLE = _V6("::/96")
_V4_TRANSLATED = _V6("::ffff:0:0:0/96")
_NAT64_LOCAL = _V6("64:ff9b:1::/48")
_V6_LOW = _V6("::/8")  # ::, ::1, IPv4-compatible, IPv4-mapped, IPv4-translated
_NAT64 = _V6("64:ff9b::/96")
_6TO4 = _V6("2002::/16")
_TEREDO = _V6("2001::/32")

# RFC 6761 reserves localhost and every name under it; the others are the
# loopback names Debian-style /etc/hosts files carry.
_LOCAL_NAMES = frozenset(("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"))
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)
_MAX_VOUCHED = 4096


class ForbiddenAddress(OSError):
    """A webhook connection refused by the address policy (no packet was sent)."""

    def __init__(self, message: str) -> None:
        # With an errno, ``strerror`` is the message, which is what aiohttp
        # shows of an OSError it wraps.
        super().__init__(errno.EACCES, message)

    def __str__(self) -> str:
        return str(self.strerror)


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` may not be reached by default ("a loopback address", ...), or
    None for a public unicast address. Ignores any allow-list."""
    if isinstance(ip, ipaddress.IPv4Address):
        for network, reason in _V4_RULES:
            if ip in network:
                return reason
        return None
    if ip.scope_id is not None:  # fe80::1%eth0: the zone does not change the range
        ip = ipaddress.IPv6Address(int(ip))
    # NAT64 first: 64:ff9b::/96 lies inside ::/8.
    if ip in _NAT64:
        return _embedded("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF), None)
    if ip in _NAT64_LOCAL:
        return "a private address (local-use NAT64)"
    if ip in _V6_LOW:
        if ip == ipaddress.IPv6Address(0):
            return "the unspecified address"
        if ip == ipaddress.IPv6Address(1):
            return "a loopback address"
        inner = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
        if ip in _V4_MAPPED:
            # An IPv6 socket connects to the IPv4 host itself: same policy.
            return _embedded("IPv4-mapped", inner, None)
        if ip in _V4_COMPATIBLE:
            return _embedded("IPv4-compatible", inner, "a reserved address (IPv4-compatible, deprecated)")
        if ip in _V4_TRANSLATED:
            return _embedded("IPv4-translated", inner, "a reserved address (IPv4-translated)")
        return "a reserved address"
    if ip in _6TO4:
        return _embedded("6to4", ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFF_FFFF), None)
    if ip in _TEREDO:
        # The client's address is stored inverted in the last 32 bits.
        client = ipaddress.IPv4Address(~int(ip) & 0xFFFF_FFFF)
        return _embedded("Teredo client", client, "a reserved address (Teredo)")
    for network6, reason in _V6_RULES:
        if ip in network6:
            return reason
    if ip not in _V6_GLOBAL:
        return "a reserved address (not global unicast)"
    return None


def _embedded(form: str, inner: ipaddress.IPv4Address, otherwise: str | None) -> str | None:
    reason = forbidden_reason(inner)
    if reason is not None:
        return f"{reason} ({form} {inner})"
    return otherwise


def parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """``host`` read the way ``inet_aton`` (and so getaddrinfo) reads it, or
    None if it is not such an address.

    One to four dot-separated parts, each decimal, octal (leading ``0``) or
    hex (``0x``); the last part fills the remaining bytes: ``127.1``,
    ``0x7f000001``, ``2130706433`` and ``0177.0.0.1`` are all ``127.0.0.1``.
    One trailing dot (the fully qualified spelling) is ignored.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        if not _NUMERIC_LABEL.fullmatch(part):
            return None
        if part[:2].lower() == "0x":
            value = int(part[2:] or "0", 16)
        elif len(part) > 1 and part[0] == "0":
            if not part.isdigit() or any(c in "89" for c in part):
                return None
            value = int(part, 8)
        else:
            value = int(part)
        values.append(value)
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (24 - 8 * i)
    return ipaddress.IPv4Address(number)


def parse_literal_host(host: str) -> IPAddress | None:
    """The address a URI host denotes when it is a literal, else None.

    ``host`` is the host as ``urlsplit(...).hostname`` or aiohttp gives it:
    IPv6 without brackets (brackets are accepted too), IPv4 in any spelling of
    :func:`parse_ipv4_loose`.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    return parse_ipv4_loose(host)


def normalize_host(host: str) -> str:
    """Lower case, without one trailing dot: how host names are compared."""
    host = host.lower()
    return host[:-1] if host.endswith(".") and not host.endswith("..") else host


def is_local_name(host: str) -> bool:
    """True for ``localhost``, a name under it, and the other loopback names."""
    name = normalize_host(host)
    return name in _LOCAL_NAMES or name.endswith(".localhost")


def looks_numeric(host: str) -> bool:
    """True when the last label is a number, which makes ``host`` an IPv4
    address or nothing at all (the WHATWG URL rule): ``1.2.3.08`` is no name."""
    labels = normalize_host(host).split(".")
    return bool(labels[-1]) and _NUMERIC_LABEL.fullmatch(labels[-1]) is not None


@dataclass(frozen=True)
class AllowList:
    """``[webhooks] allow``: networks, addresses and host names a webhook may
    reach even though the default policy refuses them."""

    networks: tuple[IPNetwork, ...] = ()
    """Networks allowed; an address entry is a /32 or /128 network."""
    names: frozenset[str] = field(default_factory=frozenset)
    """Host names allowed whatever they resolve to (compared by :func:`normalize_host`)."""

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """Read the entries; ValueError names the first bad one."""
        networks: list[IPNetwork] = []
        names: set[str] = set()
        for entry in entries:
            _, value = parse_allow_entry(entry)
            if isinstance(value, str):
                names.add(value)
            else:
                networks.append(value)
        return cls(tuple(networks), frozenset(names))

    def permits_address(self, ip: IPAddress) -> bool:
        """True when an entry covers ``ip`` (or the IPv4 host of a mapped ``ip``)."""
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.scope_id is not None:
                ip = ipaddress.IPv6Address(int(ip))
                candidates.append(ip)
            if ip.ipv4_mapped is not None:
                candidates.append(ip.ipv4_mapped)
        return any(c in network for c in candidates for network in self.networks if c.version == network.version)

    def permits_name(self, host: str) -> bool:
        """True when ``host`` is one of the allowed names."""
        return normalize_host(host) in self.names


def parse_allow_entry(entry: object) -> tuple[str, IPNetwork | str]:
    """One ``allow`` entry as ``("network", net)``, ``("address", /32 or /128
    net)`` or ``("name", host)``; ValueError says what is wrong with it."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"expected a network, an address or a host name, got {entry!r}")
    text = entry.strip()
    if "/" in text:
        try:
            return "network", ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not a network like '10.1.2.0/24': {e}") from None
            raise ValueError(f"{entry!r} has bits set past its prefix length; did you mean '{loose}'?") from None
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:
        return "address", ipaddress.ip_network(ip)
    if parse_ipv4_loose(bare) is not None or looks_numeric(bare):
        raise ValueError(f"{entry!r} is not a plain address; write an IPv4 address as four decimal numbers "
                         "like '10.1.2.3'")
    name = normalize_host(bare)
    if not _HOSTNAME.fullmatch(name):
        raise ValueError(f"{entry!r} is neither a network, an address nor a host name")
    return "name", name


def normalize_allow_entry(entry: object) -> str:
    """``entry`` written the one way it is compared (``10.1.2.0/24``,
    ``10.1.2.3``, ``hooks.internal``); ValueError as :func:`parse_allow_entry`."""
    kind, value = parse_allow_entry(entry)
    if isinstance(value, str):
        return value
    return str(value.network_address) if kind == "address" else str(value)


def address_problem(ip: IPAddress, allow: AllowList) -> str | None:
    """Why a webhook may not connect to ``ip`` under ``allow``, or None."""
    if allow.permits_address(ip):
        return None
    return forbidden_reason(ip)


def host_problem(host: str, allow: AllowList) -> str | None:
    """What the URI host alone shows to be refused, as a phrase for a client
    ("points at 127.0.0.1 (written '0x7f000001'), a loopback address"), or
    None: a host name is checked when it is resolved (see :class:`Guard`)."""
    if allow.permits_name(host):
        return None
    ip = parse_literal_host(host)
    if ip is not None:
        problem = address_problem(ip, allow)
        if problem is None:
            return None
        written = "" if str(ip) == host.strip("[]").lower() else f" (written {host!r})"
        return f"points at {ip}{written}, {problem}"
    if is_local_name(host):
        return f"names {host!r}, a loopback host"
    return None


def malformed_host(host: str) -> bool:
    """True for a host that is neither an IP address nor a host name, such
    as ``1.2.3.08``: its last label is numeric (see :func:`looks_numeric`)
    but it is no address. Resolvers differ on such hosts; refuse them."""
    return ":" not in host and looks_numeric(host) and parse_literal_host(host) is None


def system_resolver() -> AbstractResolver:
    """The resolver names are looked up with: getaddrinfo on a thread, so
    /etc/hosts and the system's DNS settings apply. Tests replace this."""
    return ThreadedResolver()


class Guard:
    """The connect-time check for one webhook session: a resolver and a socket
    factory for an ``aiohttp.TCPConnector``."""

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow
        # Addresses an allowed *name* resolved to: the socket factory sees only
        # the address, and must let these through too.
        self._vouched: set[IPAddress] = set()

    def resolver(self, inner: AbstractResolver | None = None) -> GuardedResolver:
        """A resolver that answers only with addresses this guard permits."""
        return GuardedResolver(self, inner if inner is not None else system_resolver())

    def vouch(self, addresses: Iterable[IPAddress]) -> None:
        """Remember addresses of an allowed name for :meth:`socket_factory`."""
        if len(self._vouched) > _MAX_VOUCHED:
            self._vouched.clear()  # at worst an attempt is refused, and retried
        self._vouched.update(addresses)

    def socket_factory(self, addr_info: AddrInfoType) -> socket.socket:
        """aiohttp's ``socket_factory``: a socket for ``addr_info``, or
        :class:`ForbiddenAddress` when its address is refused.

        The last check before any packet: it sees the address the connection
        is made to, however the URI was spelled or resolved.
        """
        family, type_, proto, _, sockaddr = addr_info
        host = sockaddr[0] if sockaddr else None
        try:
            ip = ipaddress.ip_address(host) if isinstance(host, str) else None
        except ValueError:
            ip = None
        if ip is None:
            # A non-numeric host here would be resolved again by the event
            # loop, past the resolver: refuse it.
            raise ForbiddenAddress(f"webhook connection to {host!r} refused: not a numeric address")
        if ip not in self._vouched:
            problem = address_problem(ip, self.allow)
            if problem is not None:
                raise ForbiddenAddress(f"webhook connection to {ip} refused: {problem}; {ALLOW_HINT}")
        return socket.socket(family=family, type=type_, proto=proto)


class GuardedResolver(AbstractResolver):
    """Resolves webhook hosts, keeping only addresses the guard permits.

    A refused name raises :class:`ForbiddenAddress` with the reason, for
    instance ``webhook host x.example resolves to 10.0.0.5, a private address;
    allow it with [webhooks] allow``. Literal hosts that aiohttp passes on as
    names (``0x7f000001``) are judged as the address they spell, and the
    ``localhost`` names without asking any resolver.
    """

    def __init__(self, guard: Guard, inner: AbstractResolver) -> None:
        self._guard = guard
        self._inner = inner

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        """Resolve ``host``; see the class docstring."""
        allow = self._guard.allow
        literal = parse_literal_host(host)
        if literal is not None:
            problem = address_problem(literal, allow)
            if problem is not None:
                raise ForbiddenAddress(f"webhook host {host} is {literal}, {problem}; {ALLOW_HINT}")
            fam = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            return [ResolveResult(hostname=host, host=str(literal), port=port, family=fam, proto=0,
                                  flags=socket.AI_NUMERICHOST)]
        if allow.permits_name(host):
            answers = await self._inner.resolve(host, port, family)
            self._guard.vouch(_addresses(answers))
            return answers
        if is_local_name(host):
            raise ForbiddenAddress(f"webhook host {host} is a loopback name; {ALLOW_HINT}")
        answers = await self._inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        refused: list[str] = []
        for answer in answers:
            try:
                ip = ipaddress.ip_address(answer["host"])
            except ValueError:
                refused.append(f"{answer['host']!r}, not a numeric address")
                continue
            problem = address_problem(ip, allow)
            if problem is None:
                # The canonical spelling: the event loop must not resolve it again.
                kept.append(ResolveResult(hostname=answer["hostname"], host=str(ip), port=answer["port"],
                                          family=answer["family"], proto=answer["proto"], flags=answer["flags"]))
            else:
                refused.append(f"{ip}, {problem}")
        if not kept:
            if not refused:
                raise ForbiddenAddress(f"webhook host {host} resolves to no address")
            raise ForbiddenAddress(f"webhook host {host} resolves to {refused[0]}; {ALLOW_HINT}")
        return kept

    async def close(self) -> None:
        """Close the inner resolver."""
        await self._inner.close()


def _addresses(answers: Sequence[ResolveResult]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for answer in answers:
        try:
            out.append(ipaddress.ip_address(answer["host"]))
        except ValueError:
            continue
    return out
