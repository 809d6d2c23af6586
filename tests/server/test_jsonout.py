"""The fast JSON converters produce exactly what json_format.MessageToDict does."""

from __future__ import annotations

from google.protobuf import any_pb2, json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given, settings
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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32), max_size=50), st.booleans())
def test_embed_response_matches_message_to_dict(values: list[float], has_embedding: bool) -> None:
    r = c.EmbedContentResponse()
    if has_embedding:
        r.embedding.SetInParent()
        r.embedding.values.extend(values)
    assert jsonout.embed_response(r.SerializeToString()) == json_format.MessageToDict(r)


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
