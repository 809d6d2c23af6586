"""The fast JSON converters produce exactly what json_format.MessageToDict does."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import orjson
from google.protobuf import any_pb2, json_format, struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from hypothesis import example, given, settings
from hypothesis import strategies as st

from longbatch.server import jsonout
from longbatch.v1 import content_pb2 as c

texts = st.text(max_size=20)
counts = st.integers(min_value=0, max_value=2**31 - 1)


@st.composite
def parts(draw: st.DrawFn) -> c.Part:
    kind = draw(st.sampled_from(["text", "blob", "none"]))
    if kind == "text":
        return c.Part(text=draw(texts))
    if kind == "blob":
        return c.Part(inline_data=c.Blob(mime_type=draw(texts), data=draw(st.binary(max_size=20))))
    return c.Part()


@st.composite
def responses(draw: st.DrawFn) -> c.GenerateContentResponse:
    r = c.GenerateContentResponse(model_version=draw(texts))
    for _ in range(draw(st.integers(0, 3))):
        cand = r.candidates.add(finish_reason=draw(st.sampled_from([0, 1, 2, 3, 5])), index=draw(counts))
        if draw(st.booleans()):
            cand.content.SetInParent()
            cand.content.role = draw(st.sampled_from(["", "model", "user"]))
            cand.content.parts.extend(draw(st.lists(parts(), max_size=3)))
    if draw(st.booleans()):
        r.usage_metadata.SetInParent()
        r.usage_metadata.prompt_token_count = draw(counts)
        r.usage_metadata.candidates_token_count = draw(counts)
        r.usage_metadata.total_token_count = draw(counts)
    return r


@settings(max_examples=300, deadline=None)
@given(responses())
def test_generate_response_matches_message_to_dict(r: c.GenerateContentResponse) -> None:
    assert jsonout.generate_response(r.SerializeToString()) == json_format.MessageToDict(r)


def _json_outcome(data: bytes, convert: Callable[[bytes], bytes]) -> bytes | str:
    try:
        return convert(data)
    except DecodeError as e:
        return type(e).__name__


@settings(max_examples=600, deadline=None)
@given(responses(), st.none() | responses(), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=3),
       st.integers(0, 300))
@example(c.GenerateContentResponse(candidates=[c.Candidate(content=c.Content(parts=[c.Part(text="")]))]), None, [], 0)
@example(c.GenerateContentResponse(usage_metadata=c.UsageMetadata()), None, [], 0)
def test_response_json_from_the_wire_equals_the_dict_route(
    r: c.GenerateContentResponse, more: c.GenerateContentResponse | None, flips: list[tuple[int, int]], cut: int
) -> None:
    # Any bytes: valid responses, two back to back (upb merges them: a
    # field given twice), and damaged ones. The wire route must give the
    # dict route's JSON, or leave the bytes to it.
    data = r.SerializeToString() + (more.SerializeToString() if more is not None else b"")
    for candidate in (data, _damaged(data, flips, cut)):
        assert _json_outcome(candidate, jsonout.generate_response_json) == _json_outcome(
            candidate, lambda d: orjson.dumps(jsonout.generate_response(d)))


def _damaged(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    damaged = bytearray(data)
    for at, value in flips:
        if at < len(damaged):
            damaged[at] = value
    return bytes(damaged[: len(damaged) - cut % (len(damaged) + 1)])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@st.composite
def near_plain_wire(draw: st.DrawFn) -> bytes:
    """Bytes shaped like the wire route's response, each piece sometimes
    encoded as upb never would (zeros written out, fields repeated or out of
    order, extra fields, lengths off by one): every branch of the route."""
    def field(tag: bytes, body: bytes) -> bytes:
        skew = draw(st.sampled_from([0] * 12 + [-1, 1]))
        return tag + _varint(max(0, len(body) + skew)) + body

    def odd(*options: bytes) -> bytes:
        return draw(st.sampled_from([b""] * (3 * len(options)) + list(options)))

    text = draw(st.text(max_size=8) | st.sampled_from(["x" * 200, "\u00e9\"\\\n"])).encode()
    if draw(st.integers(0, 9)) == 0:
        text = b"\xff" + text  # not UTF-8
    part = field(b"\x12", text) + odd(b"\x12\x01a", b"\x1a\x00")
    role = draw(st.sampled_from([b"", b"model", b"user"]))
    content = (odd(b"\x12\x01r") + field(b"\x0a", part) + odd(b"\x0a\x00", field(b"\x0a", part))
               + (field(b"\x12", role) if role or draw(st.booleans()) else b"") + odd(b"\x18\x01"))
    finish = draw(st.sampled_from([None, 0, 1, 2, 99, 2**31, 2**64 - 1]))
    candidate = (field(b"\x0a", content) + (b"\x10" + _varint(finish) if finish is not None else b"")
                 + odd(b"\x18\x02", b"\x10\x01"))
    counts = [draw(st.sampled_from([None, 0, 1, 300, 2**31 - 1, 2**31])) for _ in range(3)]
    usage = b"".join(bytes([tag]) + _varint(v) for tag, v in zip(b"\x08\x10\x18", counts, strict=True)
                     if v is not None)
    usage = odd(b"\x08\x05") + usage + odd(b"\x08\x05", b"\x20\x01")
    version = draw(st.sampled_from([None, b"", b"echo-1", b"\xc3\xa9"]))
    return (odd(b"\x22\x01v") + field(b"\x0a", candidate) + odd(field(b"\x0a", candidate))
            + (field(b"\x12", usage) if draw(st.booleans()) else b"") + odd(b"\x12\x00")
            + (field(b"\x22", version) if version is not None else b"") + odd(b"\x22\x01w", b"\x00", b"\x28\x01"))


@settings(max_examples=1500, deadline=None)
@given(near_plain_wire())
def test_response_json_from_near_plain_bytes_equals_the_dict_route(data: bytes) -> None:
    assert _json_outcome(data, jsonout.generate_response_json) == _json_outcome(
        data, lambda d: orjson.dumps(jsonout.generate_response(d)))


def test_one_text_candidate_takes_the_wire_route() -> None:
    for finish, role, usage, version in [(1, "model", (3, 4, 7), "echo-1"), (0, "", (0, 0, 0), ""),
                                         (99, "x\"y", (2**31 - 1, 0, 1), "é")]:
        r = c.GenerateContentResponse(
            candidates=[c.Candidate(content=c.Content(role=role, parts=[c.Part(text="a \u00e9\n\"")]),
                                    finish_reason=finish)],
            usage_metadata=c.UsageMetadata(prompt_token_count=usage[0], candidates_token_count=usage[1],
                                           total_token_count=usage[2]),
            model_version=version,
        )
        data = r.SerializeToString()
        assert jsonout._one_text_candidate(data) == orjson.dumps(json_format.MessageToDict(r))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32), max_size=50), st.booleans())
def test_embed_response_matches_message_to_dict(values: list[float], has_embedding: bool) -> None:
    r = c.EmbedContentResponse()
    if has_embedding:
        r.embedding.SetInParent()
        r.embedding.values.extend(values)
    assert jsonout.embed_response(r.SerializeToString()) == json_format.MessageToDict(r)


def _same_float32(json_value: object, proto_value: float) -> bool:
    if isinstance(json_value, str):  # NaN and infinities are strings in proto JSON
        return json_value == jsonout._float(proto_value)
    assert isinstance(json_value, float | int)
    return bool(np.float32(json_value) == np.float32(proto_value)) and math.copysign(1, json_value) == math.copysign(
        1, proto_value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32), max_size=50), st.booleans(), st.binary(max_size=8))
@example([1e-45, -0.0, 3.4028235e38, 1.1754944e-38, 1e-05], True, b"")
def test_embed_response_json_holds_every_float32_value(values: list[float], has_embedding: bool, junk: bytes) -> None:
    r = c.EmbedContentResponse()
    if has_embedding:
        r.embedding.SetInParent()
        r.embedding.values.extend(values)
    data = r.SerializeToString()
    expected = json_format.MessageToDict(r)
    got = orjson.loads(jsonout.embed_response_json(data))
    assert got.keys() == expected.keys()
    if expected.get("embedding", {}).get("values"):
        assert len(got["embedding"]["values"]) == len(values)
        assert all(_same_float32(g, v) for g, v in zip(got["embedding"]["values"], r.embedding.values, strict=True))
    else:
        assert got == expected
    # Damaged or extended bytes never take the fast route wrongly: the answer is the general route's, or its error.
    for damaged in (data + junk, data[: len(data) // 2]):
        try:
            general = orjson.dumps(jsonout.embed_response(damaged))
        except DecodeError:
            continue
        fast = orjson.loads(jsonout.embed_response_json(damaged))
        assert fast.keys() == orjson.loads(general).keys()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 16), texts, st.booleans())
def test_status_matches_message_to_dict(code: int, message: str, with_details: bool) -> None:
    s = status_pb2.Status(code=code, message=message)
    if with_details:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason="X", domain="longbatch.dev"))
        s.details.append(detail)
    assert jsonout.status(s.SerializeToString()) == json_format.MessageToDict(s)


def test_struct() -> None:
    s = struct_pb2.Struct()
    s.update({"a": 1, "b": [True, None, "x"], "c": {"d": 2.5}})
    assert jsonout.struct(s.SerializeToString()) == json_format.MessageToDict(s)
