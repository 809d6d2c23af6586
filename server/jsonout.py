"""Fast proto-JSON for the messages written to responses files.

``json_format.MessageToDict`` costs ~20 µs per response through reflection; the
responses file of a 1M-request batch is on the hot path. These converters
build the same dicts (camelCase names, defaults omitted, enums by name) for
the few message types we write, falling back to ``MessageToDict`` for
anything rare (status details). tests/server/test_jsonout.py proves equality.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.internal import type_checkers
from google.rpc import status_pb2

from longbatch.v1 import content_pb2

_FINISH = {v.number: v.name for v in content_pb2.FinishReason.DESCRIPTOR.values}


def _content(c: content_pb2.Content) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if c.parts:
        d["parts"] = [_part(p) for p in c.parts]
    if c.role:
        d["role"] = c.role
    return d


def _part(p: content_pb2.Part) -> dict[str, Any]:
    which = p.WhichOneof("data")
    if which == "text":
        return {"text": p.text}
    if which == "inline_data":
        blob: dict[str, str] = {}
        if p.inline_data.mime_type:
            blob["mimeType"] = p.inline_data.mime_type
        if p.inline_data.data:
            blob["data"] = base64.b64encode(p.inline_data.data).decode()
        return {"inlineData": blob}
    return {}


def generate_response(data: bytes) -> dict[str, Any]:
    """MessageToDict of a serialized GenerateContentResponse."""
    r = content_pb2.GenerateContentResponse.FromString(data)
    d: dict[str, Any] = {}
    if r.candidates:
        cands = []
        for c in r.candidates:
            cd: dict[str, Any] = {}
            if c.HasField("content"):
                cd["content"] = _content(c.content)
            if c.finish_reason:
                cd["finishReason"] = _FINISH.get(c.finish_reason, c.finish_reason)
            if c.index:
                cd["index"] = c.index
            cands.append(cd)
        d["candidates"] = cands
    if r.HasField("usage_metadata"):
        u = r.usage_metadata
        ud: dict[str, int] = {}
        if u.prompt_token_count:
            ud["promptTokenCount"] = u.prompt_token_count
        if u.candidates_token_count:
            ud["candidatesTokenCount"] = u.candidates_token_count
        if u.total_token_count:
            ud["totalTokenCount"] = u.total_token_count
        d["usageMetadata"] = ud
    if r.model_version:
        d["modelVersion"] = r.model_version
    return d


def embed_response(data: bytes) -> dict[str, Any]:
    """MessageToDict of a serialized EmbedContentResponse."""
    r = content_pb2.EmbedContentResponse.FromString(data)
    if not r.HasField("embedding"):
        return {}
    values = r.embedding.values
    if not values:
        return {"embedding": {}}
    # float fields print as the shortest decimal that round-trips in 32 bits.
    return {"embedding": {"values": [_float(v) for v in values]}}


def _float(v: float) -> float | str:
    if math.isfinite(v):
        return type_checkers.ToShortestFloat(v)
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def status(data: bytes) -> dict[str, Any]:
    """MessageToDict of a serialized google.rpc.Status."""
    s = status_pb2.Status.FromString(data)
    if s.details:
        return json_format.MessageToDict(s)
    d: dict[str, Any] = {}
    if s.code:
        d["code"] = s.code
    if s.message:
        d["message"] = s.message
    return d


def struct(data: bytes) -> dict[str, Any]:
    """MessageToDict of a serialized google.protobuf.Struct, keys sorted.

    A Struct is a map, whose order is the runtime's: it differs between
    processes, and a responses file must not depend on which one wrote it.
    """
    value: dict[str, Any] = _sorted_keys(json_format.MessageToDict(struct_pb2.Struct.FromString(data)))
    return value


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value
