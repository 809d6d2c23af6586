"""The ``gemini-http`` backend: a remote model server speaking the Gemini REST API.

Each request is sent as proto JSON to ``POST {base_url}/v1beta/{model}:generateContent``
(or ``:embedContent``) and the JSON answer is parsed back into the response
message. HTTP and transport failures become :class:`BackendError` by the
table in :mod:`.httpcommon` (shared with ``openai``); a 2xx that is not the
JSON of the response message is ``INTERNAL``, not retried.

Model options (extra keys of the model's ``[[models]]`` table):

* ``base_url`` (required): ``http://host:port`` or ``https://…``, optionally
  with a path prefix.
* ``api_key``: sent as ``x-goog-api-key``; never logged or put in an error.
* ``remote_model``: the model's name on the remote server (default: the
  longbatch model name), with or without the ``models/`` prefix.
* ``timeout``: per-call limit, a duration like ``"30s"``; unset leaves the
  executor's ``request_timeout`` as the only limit.
* ``connect_timeout``: limit on opening a connection (default ``"10s"``).
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import code_pb2

from longbatch.v1 import content_pb2

from ..config import ModelConfig
from .base import BackendError
from .httpcommon import HttpClient, OptionReader

OPTIONS = ("base_url", "api_key", "remote_model", "timeout", "connect_timeout")
"""The keys a gemini-http model's table may hold besides the common ones."""

_FINISH_NAMES = frozenset(v.name for v in content_pb2.FinishReason.DESCRIPTOR.values)
_FINISH_PREFIX = "FINISH_REASON_"
_TASK_PREFIX = "TASK_TYPE_"

_R = TypeVar("_R", bound=Message)


class GeminiHttpBackend:
    """Calls a Gemini-REST-compatible model server over one pooled aiohttp session."""

    def __init__(self, *, base_url: str, remote_model: str, api_key: str | None = None,
                 timeout_s: float | None = None, connect_timeout_s: float | None = 10.0,
                 max_concurrency: int = 64) -> None:
        """Build the backend; the HTTP session opens on the first call.

        Args:
            base_url: ``http(s)://host[:port][/prefix]``, already validated.
            remote_model: ``models/{name}`` on the remote server.
            api_key: sent as ``x-goog-api-key`` when set.
            timeout_s: per-call limit in seconds; None for none.
            connect_timeout_s: limit on opening a connection, seconds.
            max_concurrency: connections kept to the server at most.
        """
        self.base_url = base_url
        self._generate_url = f"{base_url}/v1beta/{remote_model}:generateContent"
        self._embed_url = f"{base_url}/v1beta/{remote_model}:embedContent"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["x-goog-api-key"] = api_key
        self._http = HttpClient(base_url, headers=headers, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                                max_concurrency=max_concurrency, secret=api_key, name="gemini-http")
        self._generate_endpoint = self._http.endpoint(f"/v1beta/{remote_model}:generateContent")
        self._embed_endpoint = self._http.endpoint(f"/v1beta/{remote_model}:embedContent")

    @classmethod
    def from_config(cls, model: ModelConfig) -> GeminiHttpBackend:
        """Validate a model's options and build its backend.

        Raises:
            ConfigError: an option is missing, unknown or malformed.
        """
        opts = OptionReader(model, OPTIONS)
        base_url = opts.base_url()
        api_key = opts.api_key()
        remote = opts.string("remote_model", model.name) or model.name
        if not remote.strip("/") or any(c in remote for c in "?#: "):
            raise opts.error("remote_model", "must be a model name like 'models/gemini-2.0-flash'")
        remote = remote.strip("/")
        if not remote.startswith("models/") and not remote.startswith("tunedModels/"):
            remote = f"models/{remote}"
        return cls(base_url=base_url, remote_model=remote, api_key=api_key, timeout_s=opts.duration("timeout"),
                   connect_timeout_s=opts.duration("connect_timeout", 10.0), max_concurrency=model.max_concurrency)

    # -- Backend protocol ------------------------------------------------------------

    async def generate(self, request: content_pb2.GenerateContentRequest) -> content_pb2.GenerateContentResponse:
        """Send one generateContent call and parse its answer."""
        body = json_format.MessageToDict(request)
        # The model is in the URL; a body naming the longbatch model would
        # contradict remote_model.
        body.pop("model", None)
        data = await self._post(self._generate_endpoint, body)
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
        data = await self._post(self._embed_endpoint, body)
        return self._parse(data, content_pb2.EmbedContentResponse())

    async def aclose(self) -> None:
        """Close the pooled connections; safe to call twice."""
        await self._http.aclose()

    # -- internals -----------------------------------------------------------------------

    async def _post(self, url: Any, body: dict[str, Any]) -> Any:
        """POST ``body`` and return the decoded JSON of a 2xx answer."""
        status, raw, headers = await self._http.post(url, orjson.dumps(body))
        if not 200 <= status < 300:
            raise self._http.http_error(status, raw, headers)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise BackendError(code_pb2.INTERNAL, f"model server answered HTTP {status} with invalid JSON: "
                               f"{self._http.body_excerpt(raw)}") from e

    def _parse(self, data: Any, message: _R) -> _R:
        if not isinstance(data, dict):
            raise BackendError(code_pb2.INTERNAL, f"model server answered a JSON {type(data).__name__}, not an object")
        try:
            json_format.ParseDict(data, message, ignore_unknown_fields=True)
        except (json_format.ParseError, TypeError, ValueError) as e:
            what = message.DESCRIPTOR.name
            why = self._http.redact(str(e))
            raise BackendError(code_pb2.INTERNAL, f"model server answer is not a {what}: {why}") from e
        return message


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
