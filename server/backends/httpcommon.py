"""What the HTTP backends (``gemini-http``, ``openai``) share: transport, errors, options.

One :class:`HttpClient` per backend instance holds pooled keep-alive
connections (:mod:`.h1`), opened on the first call. It never follows a
redirect (that would send the API key to another host), never reads proxy
variables from the environment, and turns every transport failure and
non-2xx answer into a :class:`~.base.BackendError` whose code, ``retryable``,
``outage`` and ``overload`` tell the executor what to do next:

======================== ==================== ======= ===================
HTTP status / failure    google.rpc code      retried also
======================== ==================== ======= ===================
400, 413, 422, other 4xx INVALID_ARGUMENT     no
401                      UNAUTHENTICATED      no
403                      PERMISSION_DENIED    no
404                      NOT_FOUND            no
408                      DEADLINE_EXCEEDED    yes
409                      ABORTED              no
412                      FAILED_PRECONDITION  no
429                      RESOURCE_EXHAUSTED   yes     overload
499                      CANCELLED            no
500, other 5xx           INTERNAL/UNAVAILABLE yes
501                      UNIMPLEMENTED        no
502                      UNAVAILABLE          yes     outage
503                      UNAVAILABLE          yes     overload
504                      DEADLINE_EXCEEDED    yes     outage
1xx, 3xx                 INTERNAL             no      (redirects are refused)
connection refused/reset UNAVAILABLE          yes     outage
no answer in ``timeout`` DEADLINE_EXCEEDED    yes     outage
certificate rejected     FAILED_PRECONDITION  no
======================== ==================== ======= ===================

A retried status honours ``retry-after-ms`` and ``Retry-After``
(:func:`~longbatch.server.retry.retry_after_from_headers`); an
``x-should-retry: true|false`` header (OpenAI's) overrides the column. A
backend may override the rest (``openai`` refuses to retry a 429 that says
``insufficient_quota``).

Every message is single-line, at most 1 KiB, and has the API key replaced by
``***``: servers have been seen echoing the key they were given.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson
from google.rpc import code_pb2

from ..config import ConfigError, ModelConfig, parse_duration
from ..retry import retry_after_from_headers
from .base import BackendError
from .h1 import ConnectError, ConnectionLost, H1Pool, ProtocolError

__all__ = [
    "MAX_MESSAGE_BYTES", "HttpClient", "OptionReader", "error_detail", "excerpt", "header_safe", "status_error",
]

MAX_MESSAGE_BYTES = 1024
"""Longest item error message taken from a server's answer, in UTF-8 bytes."""

# status: (code, retryable, outage, overload); statuses not listed fall to
# their class (see _rule).
_RULES: dict[int, tuple[int, bool, bool, bool]] = {
    400: (code_pb2.INVALID_ARGUMENT, False, False, False),
    401: (code_pb2.UNAUTHENTICATED, False, False, False),
    403: (code_pb2.PERMISSION_DENIED, False, False, False),
    404: (code_pb2.NOT_FOUND, False, False, False),
    408: (code_pb2.DEADLINE_EXCEEDED, True, False, False),
    409: (code_pb2.ABORTED, False, False, False),
    412: (code_pb2.FAILED_PRECONDITION, False, False, False),
    413: (code_pb2.INVALID_ARGUMENT, False, False, False),
    422: (code_pb2.INVALID_ARGUMENT, False, False, False),
    429: (code_pb2.RESOURCE_EXHAUSTED, True, False, True),
    499: (code_pb2.CANCELLED, False, False, False),
    500: (code_pb2.INTERNAL, True, False, False),
    501: (code_pb2.UNIMPLEMENTED, False, False, False),
    # A gateway (LiteLLM, nginx) in front of a model server that is down or
    # restarting answers 502/504: the model server is not reachable.
    502: (code_pb2.UNAVAILABLE, True, True, False),
    503: (code_pb2.UNAVAILABLE, True, False, True),
    504: (code_pb2.DEADLINE_EXCEEDED, True, True, False),
}
_OTHER_5XX = (code_pb2.UNAVAILABLE, True, False, False)
_OTHER_4XX = (code_pb2.INVALID_ARGUMENT, False, False, False)
_NOT_2XX = (code_pb2.INTERNAL, False, False, False)


def _rule(status: int) -> tuple[int, bool, bool, bool]:
    rule = _RULES.get(status)
    if rule is not None:
        return rule
    if status >= 500:
        return _OTHER_5XX
    if status >= 400:
        return _OTHER_4XX
    return _NOT_2XX


def status_error(status: int, message: str, headers: Mapping[str, str], *,
                 retryable: bool | None = None, overload: bool | None = None) -> BackendError:
    """The BackendError for a non-2xx answer.

    Args:
        status: the HTTP status.
        message: the item error message (already redacted and cut).
        headers: the answer's headers, for Retry-After and x-should-retry.
        retryable: the backend's own verdict, overriding the table.
        overload: likewise for ``overload``.
    """
    code, table_retryable, outage, table_overload = _rule(status)
    if retryable is None:
        should = headers.get("x-should-retry")
        retryable = table_retryable if should not in ("true", "false") else should == "true"
    hint = retry_after_from_headers(headers) if retryable else None
    return BackendError(code, message, retry_after_s=hint, retryable=retryable, outage=outage,
                        overload=table_overload if overload is None else overload)


def error_detail(data: Any) -> tuple[str | None, str]:
    """The message and the machine-readable kind of an error body, as far as known.

    Reads every shape the servers we talk to send:

    - OpenAI, vLLM (new), llama.cpp, Ollama ``/v1``, Gemini:
      ``{"error": {"message", "type", "code", …}}``
    - vLLM (old): ``{"object": "error", "message", "type", "code"}``
    - Ollama native: ``{"error": "text"}``; TGI: ``{"error": "text", "error_type"}``
    - FastAPI (Infinity, LiteLLM validation): ``{"detail": "text"}`` or
      ``{"detail": [{"loc", "msg", "type"}, …]}``

    Returns:
        ``(message or None, kind)`` where ``kind`` joins the body's
        ``type``/``code``/``error_type``/``status`` strings with spaces
        (``"insufficient_quota insufficient_quota"``), ``""`` if none.
    """
    if not isinstance(data, dict):
        return None, ""
    err = data.get("error")
    inner: dict[str, Any] = data
    message: Any = None
    if isinstance(err, dict):
        inner, message = err, err.get("message")
    elif isinstance(err, str):
        message = err
    elif "message" in data:
        message = data.get("message")
    elif "detail" in data:
        message = _detail_text(data["detail"])
    kinds = [inner.get("type"), inner.get("code"), inner.get("status"), data.get("error_type")]
    kind = " ".join(k for k in kinds if isinstance(k, str) and k)
    return (message if isinstance(message, str) and message else None), kind


def _detail_text(detail: Any) -> str | None:
    if isinstance(detail, str):
        return detail
    if not isinstance(detail, list):
        return None
    texts = []
    for d in detail[:8]:  # a validation error per input; a few say enough
        if isinstance(d, dict) and isinstance(d.get("msg"), str):
            loc = d.get("loc")
            where = ".".join(str(x) for x in loc) if isinstance(loc, list) else ""
            texts.append(f"{where}: {d['msg']}" if where else d["msg"])
    return "; ".join(texts) or None


def excerpt(text: str, secret: str | None = None, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``text`` on one line, without ``secret``, cut to ``limit`` UTF-8 bytes."""
    if secret:
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    if len(text) * 4 <= limit:  # no UTF-8 character is longer than 4 bytes
        return text
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "…"


class HttpClient:
    """Pooled keep-alive connections to one model server; see the module docstring.

    The calls go through :class:`~.h1.H1Pool` (httptools' parser under
    asyncio protocols) rather than aiohttp: a model call is one small JSON
    POST on a reused connection, and aiohttp's client costs about five times
    the CPU per call, which on a small machine is CPU the model server needs.
    """

    def __init__(self, base_url: str, *, headers: Mapping[str, str], timeout_s: float | None,
                 connect_timeout_s: float | None, max_concurrency: int, secret: str | None = None,
                 name: str = "http") -> None:
        """Build the client; connections open on the first call.

        Args:
            base_url: ``http(s)://host[:port][/prefix]``, already validated;
                :meth:`endpoint` paths go below it.
            headers: sent with every call (the API key among them).
            timeout_s: a whole call's limit, seconds; None for none (the
                executor's ``request_timeout`` watchdog still bounds it).
            connect_timeout_s: limit on opening a connection, seconds.
            max_concurrency: connections kept to the server at most.
            secret: the API key, replaced by ``***`` in every message.
            name: the backend's name, for "shut down" errors.
        """
        self._headers = dict(headers)
        self.timeout_s = timeout_s
        self.secret = secret
        self._name = name
        self._pool = H1Pool(base_url, max_connections=max_concurrency, timeout_s=timeout_s,
                            connect_timeout_s=connect_timeout_s or 10.0)
        self._closed = False

    def endpoint(self, path: str) -> bytes:
        """The prepared request head of ``POST {base_url}{path}``, built once per endpoint."""
        return self._pool.head("POST", path, self._headers)

    async def post(self, endpoint: bytes, body: bytes) -> tuple[int, bytes, Mapping[str, str]]:
        """POST ``body`` (JSON) to an :meth:`endpoint` and read the whole answer.

        Returns:
            ``(status, body, headers)`` for any HTTP answer, 2xx or not;
            header names are lower-case. Redirects are returned, not followed.

        Raises:
            BackendError: the server could not be reached or did not answer.
        """
        if self._closed:
            raise BackendError(code_pb2.UNAVAILABLE, f"the {self._name} backend is shut down", retryable=False)
        try:
            response = await self._pool.request(endpoint, body)
        except TimeoutError as e:
            # Our own timeout option; the executor's watchdog cancels instead.
            within = f" within {self.timeout_s:g}s" if self.timeout_s else ""
            raise BackendError(code_pb2.DEADLINE_EXCEEDED, f"model server did not answer{within}",
                               retryable=True, outage=True) from e
        except ConnectError as e:
            if isinstance(e.__cause__, ssl.SSLCertVerificationError):
                # A certificate that does not verify will not verify next time either.
                raise BackendError(code_pb2.FAILED_PRECONDITION,
                                   f"model server certificate rejected: {self.redact(str(e))}") from e
            raise BackendError(code_pb2.UNAVAILABLE, f"model server unreachable: {self.redact(str(e))}",
                               retryable=True, outage=True) from e
        except ConnectionLost as e:
            # Reset or closed before the answer was whole: a restart, a crash.
            raise BackendError(code_pb2.UNAVAILABLE, f"model server unreachable: {self.redact(str(e))}",
                               retryable=True, outage=True) from e
        except ProtocolError as e:
            raise BackendError(code_pb2.UNAVAILABLE, f"model server answered malformed HTTP: "
                               f"{self.redact(str(e))}", retryable=True) from e
        return response.status, response.body, response.headers

    def redact(self, text: str) -> str:
        """``text`` as :func:`excerpt` makes it (key-free, one line, ≤ 1 KiB)."""
        return excerpt(text, self.secret)

    def body_excerpt(self, raw: bytes) -> str:
        """A key-free, one-line excerpt of an answer body: its error message
        when it is an error body we can read, else its first bytes."""
        text = None
        if raw[:1] in (b"{", b"[", b" ", b"\n"):
            try:
                text = error_detail(orjson.loads(raw))[0]
            except orjson.JSONDecodeError:
                text = None
        if text is None:
            text = raw[: MAX_MESSAGE_BYTES * 2].decode("utf-8", "replace")
        return self.redact(text) or "(empty body)"

    def http_error(self, status: int, raw: bytes, headers: Mapping[str, str], *, message: str | None = None,
                   retryable: bool | None = None, overload: bool | None = None) -> BackendError:
        """The item error for a non-2xx answer: ``model server answered HTTP {status}: {message}``.

        Args:
            status: the HTTP status.
            raw: the answer's body, excerpted when ``message`` is None.
            headers: the answer's headers.
            message: the server's message, if the caller already read it.
            retryable: overrides the status table (see :func:`status_error`).
            overload: likewise.
        """
        if 300 <= status < 400:
            text = "redirects are not followed (they could send the API key elsewhere)"
        else:
            text = self.redact(message) if message else self.body_excerpt(raw)
        return status_error(status, f"model server answered HTTP {status}: {text}", headers,
                            retryable=retryable, overload=overload)

    async def aclose(self) -> None:
        """Close the pooled connections; later calls fail; safe to call twice."""
        self._closed = True
        await self._pool.aclose()


def header_safe(text: str) -> bool:
    """Whether ``text`` can be sent as an HTTP header name or value as it is (printable ASCII)."""
    return text.isascii() and text.isprintable()


class OptionReader:
    """Reads and validates one model's backend options.

    Every error is a one-line :class:`ConfigError` that starts with
    ``models/x (backend b): `` and names the key, so ``longbatch serve``
    can print it and exit.
    """

    def __init__(self, model: ModelConfig, known: Iterable[str]) -> None:
        """Refuse unknown keys at once.

        Raises:
            ConfigError: a key is not among ``known``.
        """
        self.model = model
        self.where = f"{model.name} (backend {model.backend})"
        self._opts = model.options
        known = sorted(known)
        if unknown := sorted(set(self._opts) - set(known)):
            raise ConfigError(f"{self.where}: unknown options {', '.join(unknown)} (known: {', '.join(known)})")

    def error(self, key: str, why: str) -> ConfigError:
        """A ConfigError about ``key``: ``"{where}: {key} {why}"``."""
        return ConfigError(" ".join(f"{self.where}: {key} {why}".split()))

    def __contains__(self, key: str) -> bool:
        return key in self._opts

    def string(self, key: str, default: str | None = None, *, example: str = "") -> str | None:
        """A non-empty string option, or ``default`` when unset."""
        if key not in self._opts:
            return default
        value = self._opts[key]
        if not isinstance(value, str) or not value.strip():
            hint = f", e.g. {example}" if example else ""
            raise self.error(key, f"must be a non-empty string{hint}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        """A boolean option (``true``/``false`` in TOML)."""
        value = self._opts.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def integer(self, key: str, default: int | None, *, lo: int = 1, hi: int = 1 << 31) -> int | None:
        """An integer option in ``lo..hi``, or ``default`` when unset."""
        if key not in self._opts:
            return default
        value = self._opts[key]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.error(key, f"must be an integer from {lo} to {hi}, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        """One of ``choices``."""
        value = self._opts.get(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return str(value)

    def duration(self, key: str, default: float | None = None, *, zero: bool = False) -> float | None:
        """A positive (or with ``zero``, non-negative) duration (``"30s"``,
        ``"500ms"`` or seconds) in seconds, or ``default`` when unset."""
        if key not in self._opts:
            return default
        value = self._opts[key]
        if not isinstance(value, str | int | float):
            raise self.error(key, f"must be a duration like '30s', got {value!r}")
        seconds = parse_duration(value, f"{self.where}: {key}")
        if not math.isfinite(seconds) or (seconds == 0 and not zero):
            raise self.error(key, "must be positive")
        return seconds

    def api_key(self, key: str = "api_key") -> str | None:
        """An optional secret; never echoed in an error."""
        if key not in self._opts:
            return None
        value = self._opts[key]
        if not isinstance(value, str) or not value or value != value.strip() or not header_safe(value):
            # It travels in a header: printable ASCII only, or the first call could not be sent.
            raise self.error(key, "must be a non-empty string of printable ASCII without surrounding whitespace")
        return value

    def base_url(self, key: str = "base_url", example: str = "http://127.0.0.1:8080") -> str:
        """A required ``http(s)://host[:port][/prefix]``, without a trailing slash."""
        if key not in self._opts:
            raise self.error(key, f'is required, e.g. {key} = "{example}"')
        value = self._opts[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a URL like '{example}'")
        value = value.strip()
        try:
            parts = urlsplit(value)
            port = parts.port  # raises ValueError when not a number in 0..65535
        except ValueError as e:
            raise self.error(key, f"{value!r} is not a valid URL: {e}") from e
        if parts.scheme not in ("http", "https"):
            raise self.error(key, f"must start with http:// or https://, got {value!r}")
        if parts.username or parts.password:
            # Checked before anything that would echo the value.
            raise self.error(key, "must not hold credentials; use api_key")
        if not parts.hostname:
            raise self.error(key, f"{value!r} has no host")
        if parts.query or parts.fragment:
            raise self.error(key, f"{value!r} must not have a query or fragment")
        if port == 0:
            raise self.error(key, f"{value!r} has port 0")
        return value.rstrip("/")

