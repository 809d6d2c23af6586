"""The config's shape and its one-line errors (server/config.py, on msgspec)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from longbatch.server.config import (
    ConfigError,
    ModelConfig,
    ServerConfig,
    config_from_dict,
    load_config,
    parse_duration,
    parse_size,
)


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_nothing_written_is_the_dataclass_defaults() -> None:
    assert config_from_dict({}) == ServerConfig()
    empty = {"limits": {}, "executor": {}, "webhooks": {}, "server": {}}
    assert config_from_dict(empty) == ServerConfig()


@pytest.mark.parametrize(("data", "message"), [
    ({"models": [{"name": "models/a"}, {"name": "models/b"}, {"name": "models/c", "max_concurrency": "8"}]},
     "models[2].max_concurrency: expected int, got str"),
    ({"models": [{"name": "models/a", "max_concurrency": 0}]}, "models[0].max_concurrency: must be at least 1"),
    ({"models": [{"backend": "echo"}]}, "models[0].name is required"),
    ({"models": [{"name": "a"}]}, "models[0].name: must look like 'models/my-model', got 'a'"),
    ({"models": [{"name": "models/a"}, {"name": "models/a"}]}, "models[1].name: models/a is listed twice"),
    ({"models": {"name": "models/a"}}, "models: expected [[models]] tables, got a table"),
    ({"limits": {"foo": 1}}, "unknown key limits.foo (known: batch_ttl, file_ttl, max_create_bytes, "),
    ({"limit": {}}, "unknown key limit (known: api_keys, executor, limits, models, quotas, server, "),
    ({"limits": 3}, "limits: expected a table, got int"),
    ({"limits": {"max_inlined_requests": True}}, "limits.max_inlined_requests: expected int, got bool"),
    ({"limits": {"batch_ttl": "soon"}}, "limits.batch_ttl: expected a duration like '50ms', '30s', '24h', got 'soon'"),
    ({"limits": {"batch_ttl": [1]}}, "limits.batch_ttl: expected a duration like '50ms', '30s', '24h', got a list"),
    ({"limits": {"file_ttl": math.inf}}, "limits.file_ttl: expected a duration"),
    ({"limits": {"retention": math.nan}}, "limits.retention: expected a duration"),
    ({"limits": {"retention": -1}}, "limits.retention: must not be negative"),
    ({"limits": {"max_file_bytes": "2 GB-ish"}}, "limits.max_file_bytes: expected a size like '4MiB', got '2 GB-ish'"),
    ({"server": {"workers": 17}}, "server.workers: must be between 0 and 16"),
    ({"server": {"workers": -1}}, "server.workers: must be between 0 and 16"),
    ({"webhooks": {"timeout": "0s"}}, "webhooks.timeout: must be positive"),
    ({"webhooks": {"allow": "10.0.0.0/8"}}, "webhooks.allow: expected a list, got str"),
    ({"executor": {"probe_max": 0}}, "executor.probe_max: must be positive"),
    ({"api_keys": [{"key": "k"}]}, "api_keys[0].tenant is required"),
    ({"api_keys": [{"key": "", "tenant": "t"}]}, "api_keys[0].key: must not be empty"),
    ({"api_keys": [{"key": "k", "tenant": "t"}, {"key": "k", "tenant": "u"}]},
     "api_keys[1].key: the same key is listed twice"),
    ({"tls_clients": [{"tenant": "t", "san_uri": "spiffe://x/a", "san_dns": "a"}]},
     "tls_clients[0]: needs exactly one of subject_cn, san_uri, san_dns; it has san_uri and san_dns"),
    ({"quotas": {"tenants": [{"name": "a", "max_stored_bytes": "lots"}]}},
     "quotas.tenants[0].max_stored_bytes: expected a size like '4MiB' or \"unlimited\", got 'lots'"),
])
def test_a_bad_value_is_one_line_naming_its_path(data: dict[str, Any], message: str) -> None:
    assert error(data).startswith(message), error(data)


def test_errors_never_show_a_secret() -> None:
    for data in ({"api_keys": [{"key": "sk-123-secret", "tenant": 7}]},
                 {"api_keys": [{"key": "sk-123-secret", "tenant": "t", "tenat": "u"}]},
                 {"webhooks": {"secret": "sk-123-secret", "timeout": "soon"}},
                 {"webhooks": {"secret": ["sk-123-secret"]}}):
        assert "sk-123-secret" not in error(data)


def test_model_options_pass_through_and_default_concurrency() -> None:
    config = config_from_dict({"models": [
        {"name": "models/a", "backend": "openai", "base_url": "http://h/v1", "api_key": "sk-x", "timeout": "5s"},
        {"name": "models/b", "backend": "echo"},
        {"name": "models/c", "latency": "50ms", "display_name": "C"},
        {"name": "models/d", "backend": "sentence-transformers", "max_concurrency": 3},
    ]})
    a, b, c, d = config.models
    assert a.options == {"base_url": "http://h/v1", "api_key": "sk-x", "timeout": "5s"}
    assert "sk-x" not in repr(a)
    assert (a.max_concurrency, b.max_concurrency, c.max_concurrency, d.max_concurrency) == (64, 1024, 64, 3)
    assert c == ModelConfig(name="models/c", backend="echo", max_concurrency=64, latency_s=0.05, display_name="C")


def test_values_are_plain_python_types() -> None:
    config = config_from_dict({"limits": {"batch_ttl": "2h", "max_file_bytes": "1KiB"},
                               "quotas": {"max_stored_bytes": "1MiB", "max_files": "unlimited"}})
    assert type(config.limits.batch_ttl_s) is float and config.limits.batch_ttl_s == 7200.0
    assert type(config.limits.max_file_bytes) is int and config.limits.max_file_bytes == 1024
    assert config.quotas.defaults is not None
    assert type(config.quotas.defaults.max_stored_bytes) is int and config.quotas.defaults.max_files is None


def test_parsers_keep_their_wording() -> None:
    assert parse_duration("1.5m", "x") == 90.0 and parse_size("4MiB", "x") == 4 << 20
    with pytest.raises(ConfigError, match=r"^m: timeout: expected a duration like '50ms', '30s', '24h', got True$"):
        parse_duration(True, "m: timeout")
    with pytest.raises(ConfigError, match=r"^y: must not be negative$"):
        parse_size(-1, "y")


def test_load_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[limits]\nbatch_ttl = "1h"\n[[tenants]]\nname = "a"\nweight = 3\n')
    config = load_config(path)
    assert config.limits.batch_ttl_s == 3600.0 and config.tenants[0].weight == 3
    path.write_text("[limits\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path)
