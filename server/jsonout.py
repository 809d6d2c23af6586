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

import numpy as np
import orjson
from google.protobuf import json_format, struct_pb2
from google.protobuf.internal import type_checkers
from google.rpc import status_pb2

from longbatch.v1 import content_pb2

from .wire import read_varint

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


def generate_response_json(data: bytes) -> bytes:
    """``orjson.dumps(generate_response(data))``.

    The commonest answer, one candidate of one text part, is turned into
    JSON straight from its wire bytes (about a third of the cost: upb's parse,
    a dozen field reads and the dicts are most of it); anything else takes
    generate_response. tests/server/test_jsonout.py proves both equal.
    """
    fast = _one_text_candidate(data)
    return fast if fast is not None else orjson.dumps(generate_response(data))


_FINISH_JSON = {number: orjson.dumps(name) for number, name in _FINISH.items()}
_INT32_MAX = 0x7FFFFFFF


def _one_text_candidate(data: bytes) -> bytes | None:
    """The JSON of ``{candidates: [{content: {parts: [{text}], role},
    finish_reason}], usage_metadata, model_version}`` as upb serializes it
    (each field present or not, in field order), or None for any other
    bytes, valid or not.

    Everything after the text (role, finish reason, usage, version) repeats
    from answer to answer; its JSON is computed once per distinct tail.
    """
    end = len(data)
    if end < 2 or data[0] != 0x0A:
        return None
    n, p = read_varint(data, 1)
    candidate_end = p + n
    if candidate_end > end or p >= candidate_end or data[p] != 0x0A:  # Candidate.content
        return None
    n, p = read_varint(data, p + 1)
    content_end = p + n
    if content_end > candidate_end or p >= content_end or data[p] != 0x0A:  # Content.parts
        return None
    n, p = read_varint(data, p + 1)
    part_end = p + n
    if part_end > content_end or p >= part_end or data[p] != 0x12:  # Part.text, alone
        return None
    n, p = read_varint(data, p + 1)
    if p + n != part_end:
        return None
    key = (data[part_end:], content_end - part_end, candidate_end - part_end)
    tail = _TAILS.get(key, _UNSEEN)
    if tail is _UNSEEN:
        tail = _tail_json(*key)
        if len(key[0]) <= _TAIL_MAX_BYTES:  # a long one (more candidates, say) is rarely seen twice
            if len(_TAILS) >= _TAILS_MAX:
                _TAILS.clear()
            _TAILS[key] = tail
    if tail is None:
        return None
    try:
        text = orjson.dumps(data[p:part_end].decode())
    except UnicodeDecodeError:
        return None
    return b'{"candidates":[{"content":{"parts":[{"text":' + text + tail


_UNSEEN = b""
_TAILS: dict[tuple[bytes, int, int], bytes | None] = {}
_TAILS_MAX = 4096
_TAIL_MAX_BYTES = 256


def _tail_json(data: bytes, content_end: int, candidate_end: int) -> bytes | None:
    """The JSON after the text for ``data``, the bytes after the Part, whose
    Content ends at ``content_end`` and Candidate at ``candidate_end``; None
    if they are not the rest of a one-text-candidate answer."""
    end = len(data)
    out = [b"}]"]
    p = 0
    try:
        if p < content_end:
            if data[p] != 0x12:  # Content.role
                return None
            n, p = read_varint(data, p + 1)
            if p + n != content_end:
                return None
            if n:
                out += (b',"role":', orjson.dumps(data[p:content_end].decode()))
        out.append(b"}")
        p = content_end
        if p < candidate_end:
            if data[p] != 0x10:  # Candidate.finish_reason, and nothing after it
                return None
            finish, p = read_varint(data, p + 1)
            if p != candidate_end or not 0 < finish <= _INT32_MAX:
                return None
            out += (b',"finishReason":', _FINISH_JSON.get(finish) or str(finish).encode())
        out.append(b"}]")
        p = candidate_end
        if p < end and data[p] == 0x12:  # usage_metadata
            n, p = read_varint(data, p + 1)
            usage_end = p + n
            if usage_end > end:
                return None
            fields = []
            for tag, name in _USAGE_FIELDS:
                if p < usage_end and data[p] == tag:
                    value, p = read_varint(data, p + 1)
                    if not 0 < value <= _INT32_MAX:
                        return None
                    fields.append(name + str(value).encode())
            if p != usage_end:
                return None
            out += (b',"usageMetadata":{', b",".join(fields), b"}")
        if p < end and data[p] == 0x22:  # model_version
            n, p = read_varint(data, p + 1)
            if p + n != end:
                return None
            if n:
                out += (b',"modelVersion":', orjson.dumps(data[p:end].decode()))
            p = end
    except UnicodeDecodeError:
        return None
    if p != end:
        return None
    out.append(b"}")
    return b"".join(out)


_USAGE_FIELDS = ((0x08, b'"promptTokenCount":'), (0x10, b'"candidatesTokenCount":'), (0x18, b'"totalTokenCount":'))


def embed_response_json(data: bytes) -> bytes:
    """``orjson.dumps(embed_response(data))``, without a Python float per component.

    The usual answer is one packed run of little-endian float32 (field 1 of
    field 1): it is read as a float32 array and orjson writes each value as
    the shortest decimal that round-trips in 32 bits, as protobuf's JSON
    does (~11 µs for 384 components, against ~590 µs through
    ``ToShortestFloat``). Spellings may differ (``1e-05`` and ``1e-5``), the
    values never. Anything else (other fields, unpacked values, NaN or
    infinity, which JSON has no number for) takes the general route.
    """
    fast = _packed_embedding(data)
    if fast is not None:
        return fast
    return orjson.dumps(embed_response(data))


def _packed_embedding(data: bytes) -> bytes | None:
    if len(data) < 4 or data[0] != 0x0A:
        return None
    size, p = read_varint(data, 1)
    if p + size != len(data) or size < 2 or data[p] != 0x0A:
        return None
    count, q = read_varint(data, p + 1)
    if q + count != len(data) or count % 4:
        return None
    values = np.frombuffer(data, dtype="<f4", count=count // 4, offset=q)
    if not np.isfinite(values).all():
        return None
    return b'{"embedding":{"values":' + orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY) + b"}}"


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
