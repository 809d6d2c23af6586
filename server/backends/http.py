"""The ``gemini-http`` backend: a remote model server speaking the Gemini REST API.

Each request is sent as proto JSON to ``POST {base_url}/v1beta/{model}:generateContent``
(or ``:embedContent``) and the JSON answer is parsed back into the response
message. HTTP and transport failures become :class:`BackendError` with the
google.rpc code the executor needs to decide on a retry:

=========================== ====================== =========
failure                     code                   retried
=========================== ====================== =========
429                         RESOURCE_EXHAUSTED     yes (Retry-After honoured)
500, 502, 503, 504, 5xx     UNAVAILABLE            yes (Retry-After honoured)
408                         DEADLINE_EXCEEDED      yes
400, other 4xx              INVALID_ARGUMENT       no
401, 403                    PERMISSION_DENIED      no
404                         NOT_FOUND              no
501                         UNIMPLEMENTED          no
connection failures         UNAVAILABLE            yes
client-side ``timeout``     DEADLINE_EXCEEDED      yes
a 2xx that is not the JSON  INTERNAL               no
=========================== ====================== =========

Model options (extra keys of the model's ``[[models]]`` table):

* ``base_url`` (required): ``http://host:port`` or ``https://…``, optionally
  with a path prefix.
* ``api_key``: sent as ``x-goog-api-key``; never logged or put in an error.
* ``remote_model``: the model's name on the remote server (default: the
  longbatch model name), with or without the ``models/`` prefix.
* ``timeout``: per-call limit, a duration like ``"30s"``; unset leaves the
  executor's ``request_timeout`` as the only limit.
"""

from __future__ import annotations

import email.utils
import math
import time
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import code_pb2

from longbatch.v1 import content_pb2

from ..config import ConfigError, ModelConfig, parse_duration
from .base import BackendError

_OPTIONS = frozenset({"base_url", "api_key", "remote_model", "timeout"})
_EXCERPT = 200
_FINISH_NAMES = frozenset(v.name for v in content_pb2.FinishReason.DESCRIPTOR.values)
_FINISH_PREFIX = "FINISH_REASON_"
_TASK_PREFIX = "TASK_TYPE_"
_STATUS_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.PERMISSION_DENIED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    408: code_pb2.DEADLINE_EXCEEDED,
    409: code_pb2.ABORTED,
    412: code_pb2.FAILED_PRECONDITION,
    429: code_pb2.RESOURCE_EXHAUSTED,
    499: code_pb2.CANCELLED,
    501: code_pb2.UNIMPLEMENTED,
}

_R = TypeVar("_R", bound=Message)


class GeminiHttpBackend:
    """Calls a Gemini-REST-compatible model server over one pooled aiohttp session."""

    def __init__(self, *, base_url: str, remote_model: str, api_key: str | None = None,
                 timeout_s: float | None = None, max_concurrency: int = 64) -> None:
        """Build the backend; the HTTP session opens on the first call.

        Args:
            base_url: ``http(s)://host[:port][/prefix]``, already validated.
            remote_model: ``models/{name}`` on the remote server.
            api_key: sent as ``x-goog-api-key`` when set.
            timeout_s: per-call limit in seconds; None for none.
            max_concurrency: connections kept to the server at most.
        """
        self._generate_url = f"{base_url}/v1beta/{remote_model}:generateContent"
        self._embed_url = f"{base_url}/v1beta/{remote_model}:embedContent"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["x-goog-api-key"] = api_key
        self._api_key = api_key
        # No limit by default: the executor's request_timeout watchdog bounds every call.
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self._limit = max_concurrency
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @classmethod
    def from_config(cls, model: ModelConfig) -> GeminiHttpBackend:
        """Validate a model's options and build its backend.

        Raises:
            ConfigError: an option is missing, unknown or malformed.
        """
        where = f"{model.name} (backend gemini-http)"
        opts = model.options
        if unknown := sorted(set(opts) - _OPTIONS):
            raise ConfigError(f"{where}: unknown options {', '.join(unknown)} (known: {', '.join(sorted(_OPTIONS))})")
        if "base_url" not in opts:
            raise ConfigError(f"{where}: base_url is required, e.g. base_url = \"http://127.0.0.1:8080\"")
        base_url = _base_url(opts["base_url"], where)
        api_key = opts.get("api_key")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ConfigError(f"{where}: api_key must be a non-empty string")
        remote = opts.get("remote_model", model.name)
        if not isinstance(remote, str) or not remote.strip("/") or any(c in remote for c in "?#: "):
            raise ConfigError(f"{where}: remote_model must be a model name like 'models/gemini-2.0-flash'")
        remote = remote.strip("/")
        if not remote.startswith("models/") and not remote.startswith("tunedModels/"):
            remote = f"models/{remote}"
        timeout_s = None
        if "timeout" in opts:
            timeout_s = parse_duration(opts["timeout"], f"{where}: timeout")
            if timeout_s <= 0:
                raise ConfigError(f"{where}: timeout must be positive")
        return cls(base_url=base_url, remote_model=remote, api_key=api_key, timeout_s=timeout_s,
                   max_concurrency=model.max_concurrency)

    # -- Backend protocol ------------------------------------------------------------

    async def generate(self, request: content_pb2.GenerateContentRequest) -> content_pb2.GenerateContentResponse:
        """Send one generateContent call and parse its answer."""
        body = json_format.MessageToDict(request)
        # The model is in the URL; a body naming the longbatch model would
        # contradict remote_model.
        body.pop("model", None)
        data = await self._post(self._generate_url, body)
        if isinstance(data, dict):
            _normalize_finish_reasons(data)
        return self._parse(data, content_pb2.GenerateContentResponse())

    async def embed(self, request: content_pb2.EmbedContentRequest) -> content_pb2.EmbedContentResponse:
        """Send one embedContent call and parse its answer."""
        body = json_format.MessageToDict(request)
        body.pop("model", None)
        # Gemini names task types without the proto's enum prefix.
        task = body.get("taskType")
        if isinstance(task, str) and task.startswith(_TASK_PREFIX):
            body["taskType"] = task[len(_TASK_PREFIX):]
        data = await self._post(self._embed_url, body)
        return self._parse(data, content_pb2.EmbedContentResponse())

    async def aclose(self) -> None:
        """Close the pooled connections; safe to call twice."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- internals -----------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a session belongs to the running loop, and the
        # backend is built before the server's loop runs it.
        if self._session is None:
            if self._closed:
                raise BackendError(code_pb2.UNAVAILABLE, "the gemini-http backend is shut down")
            connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=0)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, headers=self._headers, trust_env=False,
            )
        return self._session

    async def _post(self, url: str, body: dict[str, Any]) -> Any:
        """POST ``body`` and return the decoded JSON of a 2xx answer."""
        payload = orjson.dumps(body)
        try:
            # No redirects: following one would send the API key elsewhere.
            async with self._client().post(url, data=payload, allow_redirects=False) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError as e:
            # aiohttp's own timeouts; the executor's watchdog cancels instead.
            within = f" within {self._timeout_s:g}s" if self._timeout_s else ""
            raise BackendError(code_pb2.DEADLINE_EXCEEDED, f"model server did not answer{within}") from e
        except aiohttp.ClientConnectorCertificateError as e:
            # A certificate that does not verify will not verify next time either.
            raise BackendError(code_pb2.FAILED_PRECONDITION, f"model server certificate rejected: {e}") from e
        except aiohttp.ClientError as e:
            raise BackendError(code_pb2.UNAVAILABLE, f"model server unreachable: {self._redact(str(e))}") from e
        except OSError as e:
            raise BackendError(code_pb2.UNAVAILABLE, f"model server unreachable: {e.strerror or e}") from e
        if not 200 <= status < 300:
            raise self._http_error(status, raw, retry_after)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise BackendError(code_pb2.INTERNAL,
                               f"model server answered HTTP {status} with invalid JSON: {self._excerpt(raw)}") from e

    def _parse(self, data: Any, message: _R) -> _R:
        if not isinstance(data, dict):
            raise BackendError(code_pb2.INTERNAL, f"model server answered a JSON {type(data).__name__}, not an object")
        try:
            json_format.ParseDict(data, message, ignore_unknown_fields=True)
        except (json_format.ParseError, TypeError, ValueError) as e:
            why = self._redact(str(e))[:_EXCERPT]
            what = message.DESCRIPTOR.name
            raise BackendError(code_pb2.INTERNAL, f"model server answer is not a {what}: {why}") from e
        return message

    def _http_error(self, status: int, raw: bytes, retry_after: str | None) -> BackendError:
        if status in _STATUS_CODES:
            code = _STATUS_CODES[status]
        elif status >= 500:
            code = code_pb2.UNAVAILABLE
        elif status >= 400:
            code = code_pb2.INVALID_ARGUMENT
        else:
            code = code_pb2.INTERNAL  # 1xx/3xx: nothing a retry would change
        hint = parse_retry_after(retry_after) if code in (code_pb2.RESOURCE_EXHAUSTED, code_pb2.UNAVAILABLE) else None
        return BackendError(code, f"model server answered HTTP {status}: {self._excerpt(raw)}", retry_after_s=hint)

    def _excerpt(self, raw: bytes) -> str:
        """A short, single-line, key-free excerpt of an answer body.

        Gemini-shaped error bodies (``{"error": {"message": …}}``) give their
        message; anything else its first bytes.
        """
        text = ""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            message = data["error"].get("message")
            if isinstance(message, str):
                text = message
        if not text:
            text = raw[: _EXCERPT * 4].decode("utf-8", "replace")
        text = " ".join(self._redact(text).split())
        if len(text) > _EXCERPT:
            text = text[: _EXCERPT - 1] + "…"
        return text or "(empty body)"

    def _redact(self, text: str) -> str:
        # A server may echo the key it was given (some do in 400 bodies).
        return text.replace(self._api_key, "***") if self._api_key else text


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Args:
        value: the header, or None.
        now: the current Unix time (for tests); defaults to ``time.time()``.

    Returns:
        Non-negative seconds, or None when absent or unreadable.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None  # HTTP dates are GMT; a zoneless one is malformed
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _base_url(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: base_url must be a URL like 'http://127.0.0.1:8080'")
    value = value.strip()
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError when not a number in 0..65535
    except ValueError as e:
        raise ConfigError(f"{where}: base_url {value!r} is not a valid URL: {e}") from e
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{where}: base_url must start with http:// or https://, got {value!r}")
    if not parts.hostname:
        raise ConfigError(f"{where}: base_url {value!r} has no host")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: base_url {value!r} must not have a query or fragment")
    if parts.username or parts.password:
        raise ConfigError(f"{where}: base_url must not hold credentials; use api_key")
    if port == 0:
        raise ConfigError(f"{where}: base_url {value!r} has port 0")
    return value.rstrip("/")


def _normalize_finish_reasons(data: dict[str, Any]) -> None:
    """Map Gemini's ``"STOP"`` to the proto's ``"FINISH_REASON_STOP"``.

    Reasons this API has no name for (``RECITATION``, ``BLOCKLIST``, …) become
    ``FINISH_REASON_OTHER`` instead of silently reading as unspecified.
    """
    candidates = data.get("candidates")
    if not isinstance(candidates, list):
        return
    for c in candidates:
        if not isinstance(c, dict):
            continue
        reason = c.get("finishReason")
        if isinstance(reason, str) and reason not in _FINISH_NAMES:
            prefixed = _FINISH_PREFIX + reason
            c["finishReason"] = prefixed if prefixed in _FINISH_NAMES else "FINISH_REASON_OTHER"
