"""Proto JSON in and out, in the shape Gemini's REST API uses and the
google-genai SDK reads.

In: proto JSON as protobuf's own parser reads it (camelCase or snake_case
names, int64 as strings or numbers, enums by name, bytes in either base64
alphabet), strictly: an unknown field is an error naming it, as a typo
should be. Out: camelCase, int64 as strings, enums by name, with three
adjustments to what the SDK parses:

* a per-request error inside an output has its ``details`` as strings (each
  the proto JSON of one detail): the SDK's model of it is ``list[str]`` and
  it refuses objects there;
* files use Gemini's enum names (``ACTIVE``, ``GENERATED``) and carry a
  ``uri`` and a ``downloadUri`` on this server;
* models also carry ``supportedGenerationMethods``, Gemini's name for the
  methods list.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from google.longrunning import operations_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from longbatch.v1 import file_pb2, model_pb2

from .. import jsonl
from ..errors import InvalidArgument
from ..validate import Violations

M = TypeVar("M", bound=Message)

_MAX_SHOWN = 300


def parse_json(body: bytes, what: str) -> dict[str, Any]:
    """A request body that must be a JSON object (empty means ``{}``)."""
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidArgument(f"the {what} is not valid JSON: {e}", reason="INVALID_JSON",
                              violations=[("body", "is not valid JSON")]) from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"the {what} must be a JSON object, got {type(value).__name__}",
                              reason="INVALID_JSON", violations=[("body", "must be a JSON object")])
    return value


def to_message(value: dict[str, Any], message: M, what: str) -> M:
    """``value`` parsed into ``message`` as proto JSON, strictly."""
    try:
        json_format.ParseDict(value, message, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as e:
        text = str(e)
        shown = text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."
        raise InvalidArgument(f"invalid {what}: {shown}", reason="INVALID_REQUEST_BODY",
                              violations=[("body", shown)]) from None
    return message


def create_request(body: dict[str, Any], message: M, kind: str) -> M:
    """A create body (``{"batch": {...}, "requestId"?}``) parsed into ``message``.

    The inline requests, which can be 10,000 in one body, go through the
    same fast parser as the lines of a JSONL file (``jsonl``, about ten
    times quicker than ``ParseDict`` and accepting the same JSON, Gemini's
    short task type names included), each error naming its request; the
    rest of the body goes through ``ParseDict``.
    """
    batch = body.get("batch")
    if not isinstance(batch, dict) or ("input_config" in batch and "inputConfig" in batch):
        return to_message(body, message, f"{kind} request")
    config_key = "input_config" if "input_config" in batch else "inputConfig"
    config = batch.get(config_key)
    inlined = config.get("requests") if isinstance(config, dict) else None
    items = inlined.get("requests") if isinstance(inlined, dict) else None
    if not isinstance(config, dict) or not isinstance(inlined, dict) or not isinstance(items, list) \
            or len(inlined) != 1:
        return to_message(body, message, f"{kind} request")
    rest = {**body, "batch": {**batch, config_key: {**config, "requests": {}}}}
    to_message(rest, message, f"{kind} request")
    target = message.batch.input_config.requests.requests  # type: ignore[attr-defined]
    parse_line = jsonl.parse_generate_line if kind == "batchGenerateContent" else jsonl.parse_embed_line
    v = Violations()
    for i, item in enumerate(items):
        where = f"batch.input_config.requests.requests[{i}]"
        if type(item) is not dict:
            v.add(where, "must be an object holding 'request' and, optionally, 'metadata'")
            continue
        unknown = [k for k in item if k not in ("request", "metadata")]
        if unknown:
            v.add(where, f"unknown field {unknown[0][:60]!r}; an item holds 'request' and 'metadata'")
            continue
        request = item.get("request")
        if request is None:
            v.add(f"{where}.request", "is required")
            continue
        try:
            _, parsed = parse_line(orjson.dumps({"request": request}))
        except jsonl.LineError as e:
            v.add(f"{where}.request", str(e).removeprefix("request").lstrip(": "))
            continue
        entry = target.add()
        entry.request.CopyFrom(parsed)
        metadata = item.get("metadata")
        if metadata is not None:
            try:
                json_format.ParseDict(metadata, entry.metadata)
            except (json_format.ParseError, ValueError, TypeError, AttributeError) as e:
                v.add(f"{where}.metadata", f"must be a JSON object: {str(e)[:100]}")
    if v.items:
        field, problem = v.items[0]
        more = f" (and {v.total - 1} more)" if v.total > 1 else ""
        raise InvalidArgument(f"invalid {kind} request: {field} {problem}{more}", reason="INVALID_REQUEST_BODY",
                              violations=v.items)
    return message


def dumps(value: Any) -> bytes:
    """Compact JSON bytes."""
    return orjson.dumps(value)


def operation_json(op: operations_pb2.Operation) -> bytes:
    """An Operation as the REST API answers it (see the module docstring)."""
    return orjson.dumps(operation_dict(op))


def operation_dict(op: operations_pb2.Operation) -> dict[str, Any]:
    """An Operation as a JSON-ready dict, item errors' details as strings."""
    value = json_format.MessageToDict(op)
    _flatten_item_errors(value.get("metadata", {}).get("output"))
    _flatten_item_errors(value.get("response"))
    return value


def batch_json(batch: Message) -> bytes:
    """A GenerateContentBatch or EmbedContentBatch, item errors' details as strings."""
    value = json_format.MessageToDict(batch)
    _flatten_item_errors(value.get("output"))
    return orjson.dumps(value)


def _flatten_item_errors(output: dict[str, Any] | None) -> None:
    """Inline outcomes as the SDK models them: error details as strings,
    finish reasons by Gemini's names."""
    if not output:
        return
    for item in output.get("inlinedResponses", {}).get("inlinedResponses", ()):
        error = item.get("error")
        if error and "details" in error:
            error["details"] = [orjson.dumps(d).decode() for d in error["details"]]
        for candidate in item.get("response", {}).get("candidates", ()):
            reason = candidate.get("finishReason")
            if reason is not None:
                candidate["finishReason"] = _FINISH_REASONS.get(reason, reason)


# buf's lint wants enum values prefixed with the enum's name; Gemini's REST
# names them bare. Out, the bare names; in, both.
_FINISH_REASONS = {f"FINISH_REASON_{n}": n for n in ("STOP", "MAX_TOKENS", "SAFETY", "OTHER")}


_FILE_STATES = {"STATE_UNSPECIFIED": "STATE_UNSPECIFIED", "STATE_PROCESSING": "PROCESSING",
                "STATE_ACTIVE": "ACTIVE", "STATE_FAILED": "FAILED"}


def file_dict(f: file_pb2.File, base_url: str, version: str) -> dict[str, Any]:
    """A File as the REST API answers it; ``base_url`` is where this server
    was reached (``http://host:port``), for ``uri`` and ``downloadUri``."""
    value = json_format.MessageToDict(f)
    if "state" in value:
        value["state"] = _FILE_STATES.get(value["state"], value["state"])
    if "source" in value:
        value["source"] = value["source"].removeprefix("SOURCE_")
    file_id = f.name.removeprefix("files/")
    value["uri"] = f"{base_url}/{version}/files/{file_id}"
    value["downloadUri"] = f"{base_url}/download/{version}/files/{file_id}:download?alt=media"
    return value


def model_dict(m: model_pb2.Model) -> dict[str, Any]:
    """A Model as the REST API answers it."""
    value = json_format.MessageToDict(m)
    value["supportedGenerationMethods"] = list(m.supported_methods)
    return value
