"""The echo test model: deterministic, and its wire fast path equals its message path."""

from __future__ import annotations

import math
from collections.abc import Callable

from google.protobuf.message import DecodeError
from hypothesis import example, given, settings
from hypothesis import strategies as st

from longbatch.server.backends import BackendError
from longbatch.server.backends.echo import EchoBackend
from longbatch.v1 import content_pb2 as c


def _request(texts: list[str | None], role: str) -> c.GenerateContentRequest:
    # None stands for a part without text (inline data).
    parts = [c.Part(text=t) if t is not None else c.Part(inline_data=c.Blob(mime_type="image/png", data=b"\x89"))
             for t in texts]
    return c.GenerateContentRequest(contents=[c.Content(role=role, parts=parts)])


# Sizes around 127/128 bytes cross the one-byte length boundary of the wire format.
_TEXTS = st.one_of(st.none(), st.text(max_size=30), st.text(min_size=100, max_size=300),
                   st.text(alphabet=[chr(i) for i in range(128)], max_size=30))


@settings(max_examples=300, deadline=None)
@given(st.lists(_TEXTS, min_size=1, max_size=4), st.sampled_from(["", "user"]))
@example(["a " * 5000], "")  # past the tables of prompt lengths and token counts
async def test_raw_path_is_byte_identical(texts: list[str | None], role: str) -> None:
    echo = EchoBackend()
    req = _request(texts, role)
    expected = (await echo.generate(req)).SerializeToString()
    assert await echo.generate_raw(req.SerializeToString()) == expected
    assert await echo.generate_raw_many([req.SerializeToString()] * 2) == [expected, expected]


_PART = st.one_of(
    st.builds(lambda t: c.Part(text=t), st.text(max_size=30) | st.sampled_from(["a b", "\u3000x\u00a0y", "é " * 70])),
    st.just(c.Part(inline_data=c.Blob(mime_type="image/png", data=b"\x89"))),
    st.just(c.Part()),
)
_CONTENT = st.builds(lambda parts, role: c.Content(parts=parts, role=role),
                     st.lists(_PART, max_size=3), st.sampled_from(["", "user", "model", "rôle"]))
_REQUEST = st.builds(
    lambda contents, model, config: c.GenerateContentRequest(
        contents=contents, model=model, generation_config=c.GenerationConfig(max_output_tokens=2) if config else None),
    st.lists(_CONTENT, max_size=3), st.sampled_from(["", "models/echo"]), st.integers(0, 5).map(lambda n: n == 0),
)


def _outcome(answer: Callable[[bytes], bytes], data: bytes) -> bytes | str:
    try:
        return answer(data)
    except (DecodeError, BackendError) as e:
        return type(e).__name__


@settings(max_examples=500, deadline=None)
@given(_REQUEST, st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3), st.integers(0, 400))
def test_raw_path_matches_the_message_path_on_any_bytes(
    request: c.GenerateContentRequest, flips: list[tuple[int, int]], cut: int
) -> None:
    # Valid requests of every shape, then the same bytes damaged: the wire
    # reader must answer exactly as upb and _answer do, or refuse alike.
    echo = EchoBackend()
    payload = bytearray(request.SerializeToString())
    for at, value in flips:
        if at < len(payload):
            payload[at] = value
    damaged = bytes(payload[: len(payload) - cut % (len(payload) + 1)] if flips else payload)
    for data in (request.SerializeToString(), damaged):
        assert _outcome(echo._answer_raw, data) == _outcome(
            lambda d: echo._answer(c.GenerateContentRequest.FromString(d)).SerializeToString(), data)


async def test_generate_echoes_the_last_turn_and_counts_tokens() -> None:
    echo = EchoBackend()
    req = c.GenerateContentRequest(contents=[
        c.Content(role="user", parts=[c.Part(text="one two")]),
        c.Content(role="model", parts=[c.Part(text="three")]),
        c.Content(role="user", parts=[c.Part(text="four five six")]),
    ], generation_config=c.GenerationConfig(max_output_tokens=2, candidate_count=2))
    r = await echo.generate(req)
    assert [cand.content.parts[0].text for cand in r.candidates] == ["four five", "four five"]
    assert r.candidates[0].finish_reason == c.FinishReason.FINISH_REASON_MAX_TOKENS
    assert r.usage_metadata.prompt_token_count == 6 and r.usage_metadata.candidates_token_count == 4
    # The raw path falls back to the message path for such requests.
    assert await echo.generate_raw(req.SerializeToString()) == r.SerializeToString()


async def test_embed_is_a_stable_unit_vector() -> None:
    echo = EchoBackend()
    req = c.EmbedContentRequest(content=c.Content(parts=[c.Part(text="hello")]), output_dimensionality=64)
    a, b = await echo.embed(req), await echo.embed(req)
    assert a == b and len(a.embedding.values) == 64
    assert math.isclose(math.sqrt(sum(v * v for v in a.embedding.values)), 1.0, rel_tol=1e-5)
    other = await echo.embed(c.EmbedContentRequest(content=c.Content(parts=[c.Part(text="world")]),
                                                   output_dimensionality=64))
    assert other.embedding.values != a.embedding.values


async def test_raw_path_splits_words_at_every_ascii_separator_as_str_split_does() -> None:
    echo = EchoBackend()
    for code in range(128):
        req = _request([f"a{chr(code)}b c"], "")
        assert await echo.generate_raw(req.SerializeToString()) == (await echo.generate(req)).SerializeToString(), code
