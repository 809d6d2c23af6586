"""Server configuration: frozen dataclasses read from a TOML file.

Library code never reads the environment; `longbatch serve` resolves flags and
``LONGBATCH_*`` variables and passes the result here.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .netguard import normalize_allow_entry

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
               "KB": 1000, "MB": 1000**2, "GB": 1000**3}


class ConfigError(ValueError):
    """The config file is missing, not TOML, or holds a bad value."""


def parse_duration(value: str | int | float, what: str) -> float:
    """Parse ``"50ms"``, ``"24h"`` or a number of seconds into seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration like '30s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(value)
        if not m:
            raise ConfigError(f"{what}: expected a duration like '50ms', '30s', '24h', got {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds < 0:
        raise ConfigError(f"{what}: must not be negative")
    return seconds


def parse_size(value: str | int, what: str) -> int:
    """Parse ``"4MiB"`` or a number of bytes into bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{what}: expected a size like '4MiB', got {value!r}")
    if size < 0:
        raise ConfigError(f"{what}: must not be negative")
    return size


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


# Echo answers in bulk, a chunk of a quarter of its concurrency per call: a
# high limit lets one commit carry hundreds of results. A local embedding
# model groups the requests in flight into encode calls of up to group_size
# (256 by default) texts, so fewer in flight than that makes smaller groups.
_DEFAULT_CONCURRENCY = {"echo": 1024, "sentence-transformers": 256}

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


def _get(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = table[key]
    # bool is an int subclass, but `max_concurrency = true` is a mistake.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


_MAX_WEIGHT = 1000


def _tenants(tables: Any) -> tuple[TenantConfig, ...]:
    """The ``[[tenants]]`` tables: a name and a scheduling weight each."""
    if not isinstance(tables, list):
        raise ConfigError("tenants: expected [[tenants]] tables")
    tenants: list[TenantConfig] = []
    for i, t in enumerate(tables):
        where = f"tenants[{i}]"
        if not isinstance(t, dict):
            raise ConfigError(f"{where}: expected a table")
        if unknown := set(t) - {"name", "weight"}:
            raise ConfigError(f"unknown key {where}.{sorted(unknown)[0]}")
        if "name" not in t or not _get(t, "name", str, where):
            raise ConfigError(f"{where}.name is required")
        weight = _get(t, "weight", int, where) if "weight" in t else 1
        # A turn is weight x chunk requests (up to 512 per chunk): capped so
        # that the other tenants still get theirs within seconds.
        if not 1 <= weight <= _MAX_WEIGHT:
            raise ConfigError(f"{where}.weight must be between 1 and {_MAX_WEIGHT}")
        tenants.append(TenantConfig(name=t["name"], weight=weight))
    if len({t.name for t in tenants}) != len(tenants):
        raise ConfigError("tenants: a tenant is listed twice")
    return tuple(tenants)


def config_from_dict(data: dict[str, Any]) -> ServerConfig:
    """Build a ServerConfig from parsed TOML, rejecting unknown keys."""
    known = {"limits", "models", "api_keys", "webhooks", "executor", "server", "tenants", "tls_clients", "quotas"}
    if unknown := set(data) - known:
        raise ConfigError(f"unknown config sections: {', '.join(sorted(unknown))}")
    lim = data.get("limits", {})
    kw: dict[str, Any] = {}
    for key, value in lim.items():
        if key in ("max_inlined_requests", "max_file_lines"):
            kw[key] = _get(lim, key, int, "limits")
        elif key in ("max_inline_output", "max_create_bytes", "max_request_bytes", "max_file_bytes"):
            kw[key] = parse_size(value, f"limits.{key}")
        elif key in ("batch_ttl", "file_ttl", "request_id_ttl", "retention"):
            kw[f"{key}_s"] = parse_duration(value, f"limits.{key}")
        else:
            raise ConfigError(f"unknown key limits.{key}")
    limits = Limits(**kw)

    models: list[ModelConfig] = []
    for i, m in enumerate(data.get("models", [])):
        where = f"models[{i}]"
        if "name" not in m:
            raise ConfigError(f"{where}.name is required")
        name = _get(m, "name", str, where)
        if not re.fullmatch(r"models/[a-z0-9][a-z0-9._-]{0,62}", name):
            raise ConfigError(f"{where}.name must look like 'models/my-model', got {name!r}")
        extra = {k: v for k, v in m.items() if k not in ("name", "backend", "max_concurrency", "latency",
                                                         "display_name")}
        models.append(ModelConfig(
            name=name,
            backend=_get(m, "backend", str, where) if "backend" in m else "echo",
            max_concurrency=(_get(m, "max_concurrency", int, where) if "max_concurrency" in m
                             else _DEFAULT_CONCURRENCY.get(m.get("backend"), 64)),
            latency_s=parse_duration(m["latency"], f"{where}.latency") if "latency" in m else 0.0,
            display_name=_get(m, "display_name", str, where) if "display_name" in m else "",
            options=extra,
        ))
        if models[-1].max_concurrency < 1:
            raise ConfigError(f"{where}.max_concurrency must be at least 1")
    if len({m.name for m in models}) != len(models):
        raise ConfigError("models: duplicate model names")

    keys = []
    for i, k in enumerate(data.get("api_keys", [])):
        where = f"api_keys[{i}]"
        if "key" not in k or "tenant" not in k:
            raise ConfigError(f"{where}: needs key and tenant")
        keys.append(ApiKey(key=_get(k, "key", str, where), tenant=_get(k, "tenant", str, where)))
        if not keys[-1].key or not keys[-1].tenant:
            raise ConfigError(f"{where}: key and tenant must not be empty")
    if len({k.key for k in keys}) != len(keys):
        raise ConfigError("api_keys: duplicate keys")

    hooks = data.get("webhooks", {})
    secret = _get(hooks, "secret", str, "webhooks") if "secret" in hooks else ""
    webhooks = _webhook_settings(hooks)

    ex = data.get("executor", {})
    ex_kw: dict[str, Any] = {}
    for key, value in ex.items():
        if key == "max_attempts":
            ex_kw[key] = _get(ex, key, int, "executor")
            if ex_kw[key] < 1:
                raise ConfigError("executor.max_attempts must be at least 1")
        elif key in ("backoff_initial", "backoff_max", "request_timeout", "outage_timeout", "probe_initial",
                     "probe_max"):
            ex_kw[f"{key}_s"] = parse_duration(value, f"executor.{key}")
            if key.startswith("probe_") and ex_kw[f"{key}_s"] <= 0:
                # Probes without a wait would hammer a server that is down.
                raise ConfigError(f"executor.{key} must be positive")
        else:
            raise ConfigError(f"unknown key executor.{key}")

    srv = data.get("server", {})
    grace = parse_duration(srv["grace_period"], "server.grace_period") if "grace_period" in srv else 10.0
    workers = _get(srv, "workers", int, "server") if "workers" in srv else 2
    if not 0 <= workers <= 16:
        raise ConfigError("server.workers must be between 0 and 16")
    tls_clients = _tls_clients(data.get("tls_clients", []))
    return ServerConfig(
        tls_clients=tls_clients,
        models=tuple(models) if models else DEFAULT_MODELS,
        api_keys=tuple(keys),
        tenants=_tenants(data.get("tenants", [])),
        limits=limits,
        executor=ExecutorSettings(**ex_kw),
        webhook_secret=secret,
        webhooks=webhooks,
        grace_period_s=grace,
        workers=workers,
        quotas=_quota_settings(data),
    )


def _webhook_settings(hooks: dict[str, Any]) -> WebhookSettings:
    """The ``[webhooks]`` table less its ``secret``."""
    kw: dict[str, Any] = {}
    for key, value in hooks.items():
        if key == "secret":
            continue
        if key in ("max_attempts", "max_concurrency"):
            kw[key] = _get(hooks, key, int, "webhooks")
            if kw[key] < 1:
                raise ConfigError(f"webhooks.{key} must be at least 1")
        elif key in ("initial_backoff", "max_backoff", "timeout"):
            kw[f"{key}_s"] = parse_duration(value, f"webhooks.{key}")
        elif key == "allow":
            kw[key] = _webhook_allow(value)
        else:
            raise ConfigError(f"unknown key webhooks.{key}")
    if kw.get("timeout_s", 1.0) <= 0:
        raise ConfigError("webhooks.timeout must be positive")
    return WebhookSettings(**kw)


def _webhook_allow(value: Any) -> tuple[str, ...]:
    """``webhooks.allow``: each entry checked and written the one way it is compared."""
    if not isinstance(value, list):
        raise ConfigError(f"webhooks.allow: expected a list of networks, addresses and host names, "
                          f"got {type(value).__name__}")
    entries: list[str] = []
    for i, entry in enumerate(value):
        try:
            entries.append(normalize_allow_entry(entry))
        except ValueError as e:
            raise ConfigError(f"webhooks.allow[{i}]: {e}") from None
    return tuple(entries)


def _quota_value(table: dict[str, Any], key: str, where: str) -> int | None:
    """A quota's limit: a count (a size for bytes), or ``"unlimited"`` (None)."""
    value = table[key]
    if value == "unlimited":
        return None
    if key == "max_stored_bytes":
        return parse_size(value, f"{where}.{key}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected a number or \"unlimited\", got {value!r}")
    if value < 0:
        raise ConfigError(f"{where}.{key}: must not be negative (0 allows none; \"unlimited\" lifts the limit)")
    return value


def _quota_table(table: Any, base: TenantQuota, where: str, extra: tuple[str, ...] = ()) -> TenantQuota:
    """``base`` with the quota keys of one ``[quotas]``-like table applied."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    kw: dict[str, Any] = {}
    for key in table:
        if key in extra:
            continue
        if key in ("max_stored_bytes", "max_files", "max_unfinished_batches", "max_pending_requests", "max_creates"):
            kw[key] = _quota_value(table, key, where)
        elif key == "create_window":
            kw["create_window_s"] = parse_duration(table[key], f"{where}.create_window")
            if kw["create_window_s"] <= 0:
                raise ConfigError(f"{where}.create_window must be positive")
        else:
            raise ConfigError(f"unknown key {where}.{key}")
    return replace(base, **kw)


def _quota_settings(data: dict[str, Any]) -> QuotaSettings:
    """``[quotas]`` (defaults for every tenant) and ``[[quotas.tenants]]``
    (one tenant's own, the keys it leaves out taken from ``[quotas]``)."""
    if "quotas" not in data:
        return QuotaSettings()
    table = data["quotas"]
    defaults = _quota_table(table, TenantQuota(), "quotas", extra=("tenants",))
    tables = table.get("tenants", [])
    if not isinstance(tables, list):
        raise ConfigError("quotas.tenants: expected [[quotas.tenants]] tables")
    tenants: list[tuple[str, TenantQuota]] = []
    for i, t in enumerate(tables):
        where = f"quotas.tenants[{i}]"
        if not isinstance(t, dict) or "name" not in t or not _get(t, "name", str, where):
            raise ConfigError(f"{where}.name is required")
        tenants.append((t["name"], _quota_table(t, defaults, where, extra=("name",))))
    if len({name for name, _ in tenants}) != len(tenants):
        raise ConfigError("quotas.tenants: a tenant is listed twice")
    return QuotaSettings(defaults=defaults, tenants=tuple(tenants))


def _tls_clients(tables: Any) -> tuple[TlsClient, ...]:
    """The ``[[tls_clients]]`` tables: each one identity and a tenant."""
    if not isinstance(tables, list):
        raise ConfigError("tls_clients: expected [[tls_clients]] tables")
    clients: list[TlsClient] = []
    for i, t in enumerate(tables):
        where = f"tls_clients[{i}]"
        if not isinstance(t, dict):
            raise ConfigError(f"{where}: expected a table")
        if unknown := set(t) - {"tenant", "subject_cn", "san_uri", "san_dns"}:
            raise ConfigError(f"unknown key {where}.{sorted(unknown)[0]}")
        ids = [k for k in ("subject_cn", "san_uri", "san_dns") if k in t]
        if len(ids) != 1 or "tenant" not in t:
            raise ConfigError(f"{where}: needs a tenant and exactly one of subject_cn, san_uri, san_dns")
        value, tenant = _get(t, ids[0], str, where), _get(t, "tenant", str, where)
        if not value or not tenant:
            raise ConfigError(f"{where}: {ids[0]} and tenant must not be empty")
        clients.append(TlsClient(tenant=tenant, **{ids[0]: value}))
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
