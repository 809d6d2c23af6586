"""Server configuration: frozen dataclasses read from a TOML file.

Library code never reads the environment; `longbatch serve` resolves flags and
``LONGBATCH_*`` variables and passes the result here.

The TOML's shape is declared once as msgspec structs (``_ConfigFile`` and the
``_*Table`` classes below): msgspec checks every type strictly (no ``"3"``
for 3, no ``true`` for 1), refuses unknown keys and reports the path of the
first bad value, which :func:`config_from_dict` words as one line, e.g.
``models[2].max_concurrency: expected int, got str`` or ``unknown key
limits.foo (known: …)``. Rules that span keys (one identity per
``[[tls_clients]]`` table, names listed once) are checked after. The public
dataclasses stay plain: callers never see msgspec.
"""

from __future__ import annotations

import math
import re
import tomllib
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from .netguard import normalize_allow_entry

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
               "KB": 1000, "MB": 1000**2, "GB": 1000**3}


class ConfigError(ValueError):
    """The config file is missing, not TOML, or holds a bad value."""


def _shown(value: object) -> str:
    """A bad value as an error shows it: scalars as written, containers by kind
    (a whole table in a message helps no one and may hold a secret)."""
    if isinstance(value, str | int | float):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    return "a table" if isinstance(value, dict) else type(value).__name__


def _seconds(value: object) -> float:
    """``"50ms"``, ``"24h"`` or a number of seconds, in seconds.

    Raises:
        ValueError: not a duration, or negative; the message names no key.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration like '50ms', '30s', '24h', got {_shown(value)}")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def _bytes(value: object) -> int:
    """``"4MiB"`` or a number of bytes, in bytes.

    Raises:
        ValueError: not a size, or negative; the message names no key.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a size like '4MiB', got {_shown(value)}")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def parse_duration(value: str | int | float, what: str) -> float:
    """Parse ``"50ms"``, ``"24h"`` or a number of seconds into seconds.

    Raises:
        ConfigError: ``"{what}: expected a duration like …"`` or ``"{what}: must not be negative"``.
    """
    try:
        return _seconds(value)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None


def parse_size(value: str | int, what: str) -> int:
    """Parse ``"4MiB"`` or a number of bytes into bytes.

    Raises:
        ConfigError: ``"{what}: expected a size like …"`` or ``"{what}: must not be negative"``.
    """
    try:
        return _bytes(value)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None


@dataclass(frozen=True)
class Limits:
    """Limits on what clients may send and how long things live."""

    max_inlined_requests: int = 10_000
    """Requests per inlined create call."""
    max_create_bytes: int = 20 << 20
    """Bytes of one create call (20 MiB); also the gRPC receive limit."""
    max_request_bytes: int = 1 << 20
    """Bytes of one serialized request inside a batch (1 MiB)."""
    max_inline_output: int = 4 << 20
    """Bytes of inline output (4 MiB); larger outputs go to a responses file."""
    batch_ttl_s: float = 24 * 3600.0
    """Seconds a batch may take before it becomes EXPIRED (24 h)."""
    file_ttl_s: float = 48 * 3600.0
    """Seconds an uploaded file lives (48 h)."""
    request_id_ttl_s: float = 24 * 3600.0
    """Seconds a create ``request_id`` stays deduplicated (24 h)."""
    retention_s: float = 30 * 86400.0
    """Seconds a done batch (by end time) and its generated files are kept before they are purged (30 d)."""
    max_file_bytes: int = 2 << 30
    """Bytes of one uploaded file (2 GiB)."""
    max_file_lines: int = 5_000_000
    """Request lines of one file batch."""


@dataclass(frozen=True)
class ModelConfig:
    """A model name bound to a backend."""

    name: str
    """Resource name, ``models/{model}``."""
    backend: str = "echo"
    """Backend kind; built in: ``echo``."""
    max_concurrency: int = 64
    """Requests of this model that run at once."""
    latency_s: float = 0.0
    """Simulated latency per request, seconds (echo only)."""
    display_name: str = ""
    """Human-readable name."""
    options: dict[str, Any] = field(default_factory=dict)
    """Backend-specific options, passed through."""

    def __repr__(self) -> str:
        # options hold upstream secrets (api_key, an Authorization header):
        # a config printed or logged must not show them.
        return (f"ModelConfig(name={self.name!r}, backend={self.backend!r}, max_concurrency={self.max_concurrency!r}, "
                f"latency_s={self.latency_s!r}, display_name={self.display_name!r}, "
                f"options={_masked(self.options)!r})")


_SECRET_OPTION = re.compile(r"key|token|secret|password|auth|cookie|credential", re.IGNORECASE)


def _masked(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the values of secret-looking keys, and every header
    value, replaced by ``'***'``."""
    masked: dict[str, Any] = {}
    for key, value in options.items():
        if key == "headers" and isinstance(value, dict):
            masked[key] = {name: "***" for name in value}
        elif _SECRET_OPTION.search(key):
            masked[key] = "***"
        else:
            masked[key] = value
    return masked


@dataclass(frozen=True)
class ApiKey:
    """An API key and the tenant it acts for."""

    key: str
    """The secret key."""
    tenant: str
    """Tenant whose resources the key sees."""

    def __repr__(self) -> str:  # keys must never reach a log
        return f"ApiKey(key='***', tenant={self.tenant!r})"


@dataclass(frozen=True)
class TlsClient:
    """A client certificate identity (mTLS) and the tenant it acts for.

    Exactly one of ``subject_cn``, ``san_uri`` and ``san_dns`` is set; a
    certificate matches when it carries that value (verified against
    ``--tls-client-ca`` during the handshake)."""

    tenant: str
    """Tenant whose resources the certificate sees."""
    subject_cn: str = ""
    """The certificate's subject common name."""
    san_uri: str = ""
    """A URI subject alternative name, e.g. a SPIFFE id ``spiffe://example.org/svc-a``."""
    san_dns: str = ""
    """A DNS subject alternative name."""


@dataclass(frozen=True)
class ExecutorSettings:
    """Tuning of the background executor (retries, outages; see docs/execution.md)."""

    max_attempts: int = 5
    """Calls per request in all, for transient backend errors (5)."""
    backoff_initial_s: float = 0.2
    """First retry delay, seconds; doubles each attempt, with jitter (0.2 s)."""
    backoff_max_s: float = 10.0
    """Cap on one retry delay, seconds; six times this caps an honoured Retry-After (10 s)."""
    request_timeout_s: float = 300.0
    """Per-call backend timeout, seconds (300 s)."""
    outage_timeout_s: float = 600.0
    """How long a model's backend may stay unreachable before its waiting
    requests fail with the outage error, seconds, counted from when the
    outage began (10 min)."""
    probe_initial_s: float = 0.5
    """First wait before a probe call to an unreachable backend, seconds;
    doubles per failed probe, with jitter (0.5 s)."""
    probe_max_s: float = 30.0
    """Cap on the wait between probes, seconds (30 s)."""


@dataclass(frozen=True)
class WebhookSettings:
    """Delivery of webhook notifications (API.md section 8)."""

    max_attempts: int = 32
    """POSTs per delivery before it is marked failed; with the defaults they span about 18 h."""
    initial_backoff_s: float = 1.0
    """First retry delay, seconds; doubles each attempt, with jitter (1 s)."""
    max_backoff_s: float = 3600.0
    """Cap on one retry delay, seconds, also on an honoured Retry-After (1 h)."""
    timeout_s: float = 10.0
    """Time one POST may take, connecting included, seconds (10 s)."""
    max_concurrency: int = 8
    """POSTs in flight at once (8)."""
    allow: tuple[str, ...] = ()
    """Networks (``10.1.2.0/24``), addresses and host names webhooks may reach
    although the SSRF guard refuses them by default (loopback, private,
    link-local, ...; see ``netguard``). Empty: public addresses only."""


@dataclass(frozen=True)
class TenantQuota:
    """One tenant's quotas (``[quotas]``, see docs/reference.md#quotas).

    ``None`` lifts a limit (``"unlimited"`` in the config); 0 allows none.
    The defaults protect a small server from one tenant: five files of the
    largest size, Gemini's 100 concurrent batch jobs, and one largest file
    batch's requests waiting at a time.
    """

    max_stored_bytes: int | None = 10 << 30
    """Bytes of the tenant's files, uploaded and generated (10 GiB)."""
    max_files: int | None = 1000
    """Files the tenant holds, uploaded and generated (1000)."""
    max_unfinished_batches: int | None = 100
    """Batches not done yet (100)."""
    max_pending_requests: int | None = 5_000_000
    """Requests stored in batches not done and not run yet (5,000,000, ``limits.max_file_lines``)."""
    max_creates: int | None = 60
    """Batch creates and file uploads together in any ``create_window`` (60)."""
    create_window_s: float = 60.0
    """The sliding window of ``max_creates``, seconds (1 min)."""


@dataclass(frozen=True)
class QuotaSettings:
    """``[quotas]`` and its ``[[quotas.tenants]]`` overrides."""

    defaults: TenantQuota | None = None
    """Every tenant's quotas. None (no ``[quotas]`` in the config): the
    built-in ``TenantQuota()`` when callers authenticate, no limits on an
    open server (one caller, the operator, on loopback)."""
    tenants: tuple[tuple[str, TenantQuota], ...] = ()
    """(tenant, its quotas) overrides; keys a tenant's table leaves out come from ``defaults``."""

    def for_tenant(self, tenant: str, open_server: bool) -> TenantQuota:
        """The quotas of ``tenant``."""
        for name, quota in self.tenants:
            if name == tenant:
                return quota
        if self.defaults is not None:
            return self.defaults
        return _NO_QUOTA if open_server else TenantQuota()


_NO_QUOTA = TenantQuota(max_stored_bytes=None, max_files=None, max_unfinished_batches=None,
                        max_pending_requests=None, max_creates=None)


@dataclass(frozen=True)
class TenantConfig:
    """How one tenant is treated (``[[tenants]]``)."""

    name: str
    """The tenant, as the API keys (or client certificates) name it."""
    weight: int = 1
    """Its share of each model against the other tenants with work there, 1 to 1000 (1)."""


DEFAULT_MODELS = (
    ModelConfig(name="models/echo", backend="echo", max_concurrency=1024, display_name="Echo (test model)"),
    ModelConfig(name="models/echo-slow", backend="echo", max_concurrency=16, latency_s=0.05,
                display_name="Echo with 50 ms latency (test model)"),
)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs besides where to listen."""

    models: tuple[ModelConfig, ...] = DEFAULT_MODELS
    """Models by name; the built-in echo models unless the config sets any."""
    api_keys: tuple[ApiKey, ...] = ()
    """API keys; none means open, one tenant, loopback only."""
    tenants: tuple[TenantConfig, ...] = ()
    """Per-tenant settings (scheduling weights); a tenant not listed has the defaults."""
    limits: Limits = field(default_factory=Limits)
    """Input limits and lifetimes."""
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    """Executor tuning."""
    webhook_secret: str = field(default="", repr=False)  # a signing key must never reach a log
    """HMAC-SHA256 key for webhook signatures; empty means unsigned."""
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    """Webhook delivery retries and timeouts."""
    grace_period_s: float = 10.0
    """Seconds in-flight RPCs get to finish on shutdown."""
    tls_clients: tuple[TlsClient, ...] = ()
    """Client certificates that act for a tenant (``[[tls_clients]]``; needs ``--tls-client-ca``)."""
    quotas: QuotaSettings = field(default_factory=QuotaSettings)
    """Per-tenant quotas (``[quotas]``)."""
    workers: int = 2
    """Processes for CPU-bound work (parsing input files, writing results
    files, the echo model); 0 keeps that work in the server process."""


# -- the TOML's shape ------------------------------------------------------------------
#
# Field names are the dataclasses' (``batch_ttl_s``), ``name=`` the TOML key
# (``batch_ttl``). A key left out is UNSET, so that its default is written
# once, in the dataclass above, and a [[quotas.tenants]] table can tell a key
# it leaves out (taken from [quotas]) from one it sets.


class _Duration(float):
    """A duration key: seconds, or a string like ``"50ms"``, ``"30s"``, ``"24h"``, ``"30d"``."""


class _PositiveDuration(_Duration):
    """A duration that must be more than zero (a wait of zero would spin)."""


class _Size(int):
    """A size key: bytes, or a string like ``"4MiB"``."""


class _Quota:
    """A quota's limit: a count, or ``"unlimited"`` (``limit`` None)."""

    __slots__ = ("limit",)

    def __init__(self, limit: int | None) -> None:
        self.limit = limit


class _QuotaSize(_Quota):
    """A quota's limit in bytes: a size, or ``"unlimited"``."""


def _decode(kind: type, value: Any) -> Any:
    """msgspec's hook for the custom key types above. A ValueError's message
    becomes the error, msgspec adding where it was."""
    if kind is _PositiveDuration or kind is _Duration:
        seconds = _seconds(value)
        if not math.isfinite(seconds):  # a TTL of inf would overflow every timestamp it is added to
            raise ValueError(f"expected a duration like '50ms', '30s', '24h', got {_shown(value)}")
        if kind is _PositiveDuration and seconds <= 0:
            raise ValueError("must be positive")
        return kind(seconds)
    if kind is _Size:
        return _Size(_bytes(value))
    if issubclass(kind, _Quota):
        if value == "unlimited":
            return kind(None)
        if kind is _QuotaSize:
            if not isinstance(value, int | str) or isinstance(value, bool) or (
                    isinstance(value, str) and not _SIZE.match(value)):
                raise ValueError(f"expected a size like '4MiB' or \"unlimited\", got {_shown(value)}")
            return kind(_bytes(value))
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected a number or \"unlimited\", got {_shown(value)}")
        if value < 0:
            raise ValueError("must not be negative (0 allows none; \"unlimited\" lifts the limit)")
        return kind(value)
    raise NotImplementedError(kind)


_AtLeast1 = Annotated[int, Meta(ge=1)]
_Text = Annotated[str, Meta(min_length=1)]
"""A string that must not be empty (a name, a key)."""


class _Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A TOML table of the config: unknown keys are refused."""


class _LimitsTable(_Table):
    max_inlined_requests: int | UnsetType = UNSET
    max_create_bytes: _Size | UnsetType = UNSET
    max_request_bytes: _Size | UnsetType = UNSET
    max_inline_output: _Size | UnsetType = UNSET
    max_file_bytes: _Size | UnsetType = UNSET
    max_file_lines: int | UnsetType = UNSET
    batch_ttl_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="batch_ttl")
    file_ttl_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="file_ttl")
    request_id_ttl_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="request_id_ttl")
    retention_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="retention")


class _ModelTable(_Table, forbid_unknown_fields=False):
    """A [[models]] table; its other keys are the backend's options, which
    the backend checks (server/backends)."""

    name: str
    backend: str | UnsetType = UNSET
    max_concurrency: _AtLeast1 | UnsetType = UNSET
    latency_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="latency")
    display_name: str | UnsetType = UNSET


class _ApiKeyTable(_Table):
    key: _Text
    tenant: _Text

    def __repr__(self) -> str:  # keys must never reach a log, not even half-read ones
        return f"_ApiKeyTable(key='***', tenant={self.tenant!r})"


class _TlsClientTable(_Table):
    tenant: _Text
    subject_cn: _Text | UnsetType = UNSET
    san_uri: _Text | UnsetType = UNSET
    san_dns: _Text | UnsetType = UNSET


class _TenantTable(_Table):
    name: _Text
    # A turn is weight x chunk requests (up to 512 per chunk): capped so
    # that the other tenants still get theirs within seconds.
    weight: Annotated[int, Meta(ge=1, le=1000)] | UnsetType = UNSET


class _ExecutorTable(_Table):
    max_attempts: _AtLeast1 | UnsetType = UNSET
    backoff_initial_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="backoff_initial")
    backoff_max_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="backoff_max")
    request_timeout_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="request_timeout")
    outage_timeout_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="outage_timeout")
    # Probes without a wait would hammer a server that is down.
    probe_initial_s: _PositiveDuration | UnsetType = msgspec.field(default=UNSET, name="probe_initial")
    probe_max_s: _PositiveDuration | UnsetType = msgspec.field(default=UNSET, name="probe_max")


class _WebhooksTable(_Table):
    secret: str | UnsetType = UNSET
    max_attempts: _AtLeast1 | UnsetType = UNSET
    initial_backoff_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="initial_backoff")
    max_backoff_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="max_backoff")
    timeout_s: _PositiveDuration | UnsetType = msgspec.field(default=UNSET, name="timeout")
    max_concurrency: _AtLeast1 | UnsetType = UNSET
    allow: list[str] | UnsetType = UNSET
    """Checked and normalized by netguard after."""

    def __repr__(self) -> str:  # a signing key must never reach a log
        return "_WebhooksTable(...)"


class _ServerTable(_Table):
    grace_period_s: _Duration | UnsetType = msgspec.field(default=UNSET, name="grace_period")
    workers: Annotated[int, Meta(ge=0, le=16)] | UnsetType = UNSET


class _QuotaKeys(_Table):
    max_stored_bytes: _QuotaSize | UnsetType = UNSET
    max_files: _Quota | UnsetType = UNSET
    max_unfinished_batches: _Quota | UnsetType = UNSET
    max_pending_requests: _Quota | UnsetType = UNSET
    max_creates: _Quota | UnsetType = UNSET
    create_window_s: _PositiveDuration | UnsetType = msgspec.field(default=UNSET, name="create_window")


class _QuotaTenantTable(_QuotaKeys, kw_only=True):  # (mypy does not see kw_only inherited)
    name: _Text


class _QuotasTable(_QuotaKeys):
    tenants: list[_QuotaTenantTable] = msgspec.field(default_factory=list)


class _ConfigFile(_Table):
    limits: _LimitsTable = msgspec.field(default_factory=_LimitsTable)
    models: list[_ModelTable] = msgspec.field(default_factory=list)
    api_keys: list[_ApiKeyTable] = msgspec.field(default_factory=list)
    webhooks: _WebhooksTable = msgspec.field(default_factory=_WebhooksTable)
    executor: _ExecutorTable = msgspec.field(default_factory=_ExecutorTable)
    server: _ServerTable = msgspec.field(default_factory=_ServerTable)
    tenants: list[_TenantTable] = msgspec.field(default_factory=list)
    tls_clients: list[_TlsClientTable] = msgspec.field(default_factory=list)
    quotas: _QuotasTable | UnsetType = UNSET
    """UNSET (no [quotas]) differs from an empty one: see QuotaSettings.defaults."""


_ARRAYS_OF_TABLES = {"models", "api_keys", "tenants", "tls_clients", "quotas.tenants"}
"""Keys written ``[[key]]``: a ``[key]`` there gets a hint of the brackets."""


# -- msgspec's errors in the config's words --------------------------------------------

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_TYPE_NAMES = {"object": "a table", "array": "a list"}
"""msgspec speaks JSON; TOML calls an object a table."""
_CONSTRAINTS = [
    (re.compile(r"^Expected `\w+` >= 0$"), "must not be negative"),
    (re.compile(r"^Expected `\w+` >= (.+)$"), "must be at least {}"),
    (re.compile(r"^Expected `\w+` <= (.+)$"), "must be at most {}"),
    (re.compile(r"^Expected `str` of length >= 1$"), "must not be empty"),
]


def _struct_of(kind: Any) -> Any:
    """The struct a field holds: itself, or the items of a list of them."""
    for arg in (kind, *typing.get_args(kind)):
        if isinstance(arg, type) and issubclass(arg, msgspec.Struct):
            return arg
    return None


def _schema_at(path: str) -> Any:
    """The declared type at ``path`` (``quotas.tenants[0].name``), None if unknown."""
    kind: Any = _ConfigFile
    for part in re.sub(r"\[\d+\]", "", path).split(".") if path else ():
        table = _struct_of(kind)
        if table is None:
            return None
        kind = {f.encode_name: f.type for f in msgspec.structs.fields(table)}.get(part)
    return kind


def _known_keys(path: str) -> list[str]:
    """The keys the table at ``path`` may hold."""
    table = _struct_of(_schema_at(path))
    return sorted(f.encode_name for f in msgspec.structs.fields(table)) if table is not None else []


def _range(path: str) -> tuple[int, int] | None:
    """The ``ge``..``le`` range declared for the number at ``path``, if both are:
    "must be between 1 and 1000" says more than msgspec's one broken bound."""
    for arg in typing.get_args(_schema_at(path)):
        for meta in getattr(arg, "__metadata__", ()):
            if isinstance(meta, Meta) and meta.ge is not None and meta.le is not None:
                return int(meta.ge), int(meta.le)
    return None


def _config_error(error: msgspec.ValidationError) -> ConfigError:
    """msgspec's ``Expected `int`, got `str` - at `$.models[2].max_concurrency```
    as ``models[2].max_concurrency: expected int, got str``: the TOML path
    first, the words a TOML user knows."""
    m = _AT.match(str(error))
    assert m is not None  # the pattern matches any text
    what, path = m["what"], (m["path"] or "").removeprefix(".")
    where = path or "config"
    if unknown := re.fullmatch(r"Object contains unknown field `(.*)`", what):
        known = _known_keys(path)
        hint = f" (known: {', '.join(known)})" if known else ""
        return ConfigError(f"unknown key {path + '.' if path else ''}{unknown[1]}{hint}")
    if missing := re.fullmatch(r"Object missing required field `(.*)`", what):
        return ConfigError(f"{path + '.' if path else ''}{missing[1]} is required")
    if kinds := re.fullmatch(r"Expected `([^`]+)`, got `([^`]+)`", what):
        expected, got = (_TYPE_NAMES.get(k, k) for k in kinds.groups())
        if path in _ARRAYS_OF_TABLES and kinds[1] == "array":
            expected = f"[[{path}]] tables"
        return ConfigError(f"{where}: expected {expected}, got {got}")
    if what.startswith("Expected `int` ") and (bounds := _range(path)):
        return ConfigError(f"{where}: must be between {bounds[0]} and {bounds[1]}")
    for pattern, words in _CONSTRAINTS:
        if c := pattern.fullmatch(what):
            return ConfigError(f"{where}: {words.format(*c.groups())}")
    # Our own hook's messages ("expected a duration like …"), and any msgspec
    # wording not met above, as they are.
    return ConfigError(f"{where}: {what}")


def _given(table: msgspec.Struct, *leave_out: str) -> dict[str, Any]:
    """The keys ``table`` sets, by dataclass field name, as plain values."""
    given: dict[str, Any] = {}
    for name in table.__struct_fields__:
        value = getattr(table, name)
        if value is UNSET or name in leave_out:
            continue
        if isinstance(value, _Duration):
            value = float(value)
        elif isinstance(value, _Size):
            value = int(value)
        elif isinstance(value, _Quota):
            value = value.limit
        given[name] = value
    return given


# -- from the parsed TOML to the dataclasses -------------------------------------------

# Echo answers in bulk, a chunk of a quarter of its concurrency per call: a
# high limit lets one commit carry hundreds of results. A local embedding
# model groups the requests in flight into encode calls of up to group_size
# (256 by default) texts, so fewer in flight than that makes smaller groups.
_DEFAULT_CONCURRENCY = {"echo": 1024, "sentence-transformers": 256}
_MODEL_NAME = re.compile(r"models/[a-z0-9][a-z0-9._-]{0,62}")
_MODEL_KEYS = frozenset(f.encode_name for f in msgspec.structs.fields(_ModelTable))


def config_from_dict(data: dict[str, Any]) -> ServerConfig:
    """Build a ServerConfig from parsed TOML, rejecting unknown keys.

    Raises:
        ConfigError: one line naming the first bad key by its path.
    """
    try:
        raw = msgspec.convert(data, _ConfigFile, strict=True, dec_hook=_decode)
    except msgspec.ValidationError as e:
        raise _config_error(e) from None
    hooks = _given(raw.webhooks, "secret", "allow")
    if raw.webhooks.allow is not UNSET:
        hooks["allow"] = _webhook_allow(raw.webhooks.allow)
    return ServerConfig(
        models=_models(raw.models, data.get("models", [])) or DEFAULT_MODELS,
        api_keys=_api_keys(raw.api_keys),
        tenants=_tenants(raw.tenants),
        limits=Limits(**_given(raw.limits)),
        executor=ExecutorSettings(**_given(raw.executor)),
        webhook_secret="" if isinstance(raw.webhooks.secret, UnsetType) else raw.webhooks.secret,
        webhooks=WebhookSettings(**hooks),
        tls_clients=_tls_clients(raw.tls_clients),
        quotas=_quota_settings(raw.quotas),
        **_given(raw.server),
    )


def _models(tables: list[_ModelTable], given: list[dict[str, Any]]) -> tuple[ModelConfig, ...]:
    """The [[models]] tables; ``given`` are the same tables as written, whose
    keys msgspec does not know are the backend's options."""
    models: list[ModelConfig] = []
    for i, (m, written) in enumerate(zip(tables, given, strict=True)):
        if not _MODEL_NAME.fullmatch(m.name):
            raise ConfigError(f"models[{i}].name: must look like 'models/my-model', got {m.name!r}")
        if m.name in {seen.name for seen in models}:
            raise ConfigError(f"models[{i}].name: {m.name} is listed twice")
        # The default concurrency follows a backend written out: no backend
        # key is echo, but with the common default (see the reference).
        backend = "echo" if isinstance(m.backend, UnsetType) else m.backend
        concurrency = 64 if isinstance(m.backend, UnsetType) else _DEFAULT_CONCURRENCY.get(backend, 64)
        models.append(ModelConfig(
            name=m.name,
            backend=backend,
            options={k: v for k, v in written.items() if k not in _MODEL_KEYS},
            **{"max_concurrency": concurrency, **_given(m, "name", "backend")},
        ))
    return tuple(models)


def _api_keys(tables: list[_ApiKeyTable]) -> tuple[ApiKey, ...]:
    """The [[api_keys]] tables, each key listed once."""
    keys: list[ApiKey] = []
    for i, k in enumerate(tables):
        if k.key in {seen.key for seen in keys}:
            raise ConfigError(f"api_keys[{i}].key: the same key is listed twice")
        keys.append(ApiKey(key=k.key, tenant=k.tenant))
    return tuple(keys)


def _tenants(tables: list[_TenantTable]) -> tuple[TenantConfig, ...]:
    """The ``[[tenants]]`` tables: a name and a scheduling weight each."""
    tenants = tuple(TenantConfig(**_given(t)) for t in tables)
    if len({t.name for t in tenants}) != len(tenants):
        raise ConfigError("tenants: a tenant is listed twice")
    return tenants


def _webhook_allow(value: list[str]) -> tuple[str, ...]:
    """``webhooks.allow``: each entry checked and written the one way it is compared."""
    entries: list[str] = []
    for i, entry in enumerate(value):
        try:
            entries.append(normalize_allow_entry(entry))
        except ValueError as e:
            raise ConfigError(f"webhooks.allow[{i}]: {e}") from None
    return tuple(entries)


def _quota_settings(table: _QuotasTable | UnsetType) -> QuotaSettings:
    """``[quotas]`` (defaults for every tenant) and ``[[quotas.tenants]]``
    (one tenant's own, the keys it leaves out taken from ``[quotas]``)."""
    if isinstance(table, UnsetType):
        return QuotaSettings()
    defaults = replace(TenantQuota(), **_given(table, "tenants"))
    tenants = tuple((t.name, replace(defaults, **_given(t, "name"))) for t in table.tenants)
    if len({name for name, _ in tenants}) != len(tenants):
        raise ConfigError("quotas.tenants: a tenant is listed twice")
    return QuotaSettings(defaults=defaults, tenants=tenants)


def _tls_clients(tables: list[_TlsClientTable]) -> tuple[TlsClient, ...]:
    """The ``[[tls_clients]]`` tables: each one identity and a tenant."""
    clients: list[TlsClient] = []
    for i, t in enumerate(tables):
        ids = _given(t, "tenant")
        if len(ids) != 1:
            raise ConfigError(f"tls_clients[{i}]: needs exactly one of subject_cn, san_uri, san_dns; "
                              f"it has {' and '.join(ids) if ids else 'none'}")
        clients.append(TlsClient(tenant=t.tenant, **ids))
    identities = [(c.subject_cn, c.san_uri, c.san_dns) for c in clients]
    if len(set(identities)) != len(identities):
        raise ConfigError("tls_clients: the same certificate identity is listed twice")
    return tuple(clients)


def load_config(path: Path | None) -> ServerConfig:
    """Read a TOML config file; ``None`` gives the embedded defaults."""
    if path is None:
        return ServerConfig()
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from e
    return config_from_dict(data)
