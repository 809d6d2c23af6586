"""The ``openai`` backend (API.md section 12) against tests/fakeopenai.py.

The fake speaks the real wire format on 127.0.0.1 and records every body it
got, so each row of the Gemini ↔ OpenAI mapping is asserted on the exact
JSON sent and on the message that came back. Fine-grained cases call the
backend directly; end-to-end cases run batches through a real longbatch
server whose model uses the backend.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import MakeServer, ServerHandle
from fakemodel import embedding
from fakeopenai import SHAPES, FakeOpenAI, Fault
from google.longrunning import operations_pb2
from google.rpc import code_pb2

from longbatch.server.backends import BackendError, OpenAIBackend, create_backend
from longbatch.server.backends.httpcommon import MAX_MESSAGE_BYTES, error_detail, excerpt
from longbatch.server.config import ConfigError, ExecutorSettings, ModelConfig, ServerConfig, config_from_dict
from longbatch.v1 import batch_pb2, content_pb2, model_pb2

from support import Stubs, metadata_of, wait_done

MODEL = "models/smol"
REMOTE = "smol"
MAX_ATTEMPTS = 4
SLACK_S = 0.005
F = content_pb2.FinishReason

Backends = Callable[..., OpenAIBackend]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    f = FakeOpenAI()
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def backends(fake: FakeOpenAI) -> AsyncIterator[Backends]:
    """Build backends on the fake (options as keywords); all closed at the end."""
    built: list[OpenAIBackend] = []

    def make(url: str | None = None, **options: object) -> OpenAIBackend:
        backend = create_backend(ModelConfig(name=MODEL, backend="openai",
                                             options={"base_url": url or fake.url, **options}))
        assert isinstance(backend, OpenAIBackend)
        built.append(backend)
        return backend

    yield make
    for b in built:
        await b.aclose()


def user(text: str, role: str = "user") -> content_pb2.Content:
    return content_pb2.Content(role=role, parts=[content_pb2.Part(text=text)])


def request(*contents: content_pb2.Content, system: str | None = None,
            **config: Any) -> content_pb2.GenerateContentRequest:
    r = content_pb2.GenerateContentRequest(contents=contents)
    if system is not None:
        r.system_instruction.CopyFrom(content_pb2.Content(parts=[content_pb2.Part(text=system)]))
    if config:
        r.generation_config.CopyFrom(content_pb2.GenerationConfig(**config))
    return r


async def failure(call: Awaitable[object]) -> BackendError:
    try:
        await call
    except BackendError as e:
        return e
    raise AssertionError("the call succeeded")


def texts(r: content_pb2.GenerateContentResponse) -> list[str]:
    return [c.content.parts[0].text for c in r.candidates]


# -- request mapping ----------------------------------------------------------------------


async def test_every_request_row_is_mapped(fake: FakeOpenAI, backends: Backends) -> None:
    backend = backends()
    r = request(
        user("Name "), content_pb2.Content(parts=[content_pb2.Part(text="three "), content_pb2.Part(text="colours.")]),
        user("Blue, red, green.", role="model"), user("More?"),
        system="You are terse.", temperature=0.7, top_p=0.9, top_k=40, max_output_tokens=50,
        stop_sequences=["END", "\n\n"], seed=7, response_mime_type="application/json")
    await backend.generate(r)
    assert fake.chat_bodies == [{
        "model": REMOTE,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name "},            # role "user"
            {"role": "user", "content": "three colours."},   # no role: user; text parts joined with ""
            {"role": "assistant", "content": "Blue, red, green."},  # model -> assistant
            {"role": "user", "content": "More?"},
        ],
        "temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_tokens": 50, "stop": ["END", "\n\n"], "seed": 7,
        "response_format": {"type": "json_object"},
    }]
    assert fake.headers[0]["Content-Type"] == "application/json"
    assert "Authorization" not in fake.headers[0]


async def test_max_tokens_is_always_sent(fake: FakeOpenAI, backends: Backends) -> None:
    await backends().generate(request(user("hi")))
    await backends(max_tokens_field="max_completion_tokens", default_max_tokens=77).generate(request(user("hi")))
    await backends(max_tokens_field="max_completion_tokens").generate(request(user("hi"), max_output_tokens=5))
    assert fake.chat_bodies == [
        {"model": REMOTE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1024},
        {"model": REMOTE, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 77},
        {"model": REMOTE, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5},
    ]


async def test_system_instruction_folded_without_a_system_role(fake: FakeOpenAI, backends: Backends) -> None:
    backend = backends(system_role=False)
    await backend.generate(request(user("Hi"), system="Be terse."))
    await backend.generate(request(user("Earlier answer", role="model"), user("Hi"), system="Be terse."))
    assert [b["messages"] for b in fake.chat_bodies] == [
        [{"role": "user", "content": "Be terse.\n\nHi"}],
        [{"role": "user", "content": "Be terse."}, {"role": "assistant", "content": "Earlier answer"},
         {"role": "user", "content": "Hi"}],
    ]


async def test_text_plain_is_omitted_and_other_mime_types_refused(fake: FakeOpenAI, backends: Backends) -> None:
    backend = backends()
    await backend.generate(request(user("hi"), response_mime_type="text/plain"))
    assert "response_format" not in fake.chat_bodies[0]
    e = await failure(backend.generate(request(user("hi"), response_mime_type="text/x.enum")))
    assert (e.code, e.retryable) == (code_pb2.INVALID_ARGUMENT, False)
    assert "response_mime_type 'text/x.enum'" in e.message
    assert fake.stats.chat_calls == 1  # refused before any call


@pytest.mark.parametrize(("req", "fragment"), [
    (request(content_pb2.Content(parts=[content_pb2.Part(inline_data=content_pb2.Blob(mime_type="image/png",
                                                                                      data=b"x"))])),
     "contents[0].parts[0] is inline_data"),
    (request(user("hi"), content_pb2.Content(parts=[content_pb2.Part()])), "contents[1].parts[0] is empty"),
    (request(user("hi", role="function")), "contents[0].role must be 'user' or 'model'"),
    (content_pb2.GenerateContentRequest(contents=[user("hi")], system_instruction=content_pb2.Content(
        parts=[content_pb2.Part(inline_data=content_pb2.Blob(data=b"x"))])), "system_instruction.parts[0]"),
    (request(user("hi"), candidate_count=0), "candidate_count must be from 1 to 64"),
    (request(user("hi"), max_output_tokens=0), "max_output_tokens must be positive"),
])
async def test_fields_that_cannot_be_honoured_are_invalid_argument(
        fake: FakeOpenAI, backends: Backends, req: content_pb2.GenerateContentRequest, fragment: str) -> None:
    e = await failure(backends().generate(req))
    assert (e.code, e.retryable) == (code_pb2.INVALID_ARGUMENT, False)
    assert fragment in e.message
    assert fake.stats.chat_calls == 0


async def test_a_request_field_without_a_mapping_is_refused(fake: FakeOpenAI, backends: Backends,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Every field of today's proto is mapped; one added later lands in this
    # set (computed from the descriptor) and is refused until it is mapped.
    from longbatch.server.backends import openai
    assert frozenset() == openai._UNMAPPED_REQUEST_FIELDS
    monkeypatch.setattr(openai, "_UNMAPPED_REQUEST_FIELDS", frozenset({"system_instruction"}))
    e = await failure(backends().generate(request(user("hi"), system="x")))
    assert (e.code, e.message) == (code_pb2.INVALID_ARGUMENT, "system_instruction is not supported by the openai "
                                   "backend")
    await backends().generate(request(user("hi")))
    assert fake.stats.chat_calls == 1


async def test_top_k_only_where_the_server_takes_it(fake: FakeOpenAI, backends: Backends) -> None:
    plain = backends(supports_top_k=False)
    await plain.generate(request(user("hi"), temperature=0.5))
    assert "top_k" not in fake.chat_bodies[0]
    e = await failure(plain.generate(request(user("hi"), top_k=5)))
    assert e.code == code_pb2.INVALID_ARGUMENT and "top_k" in e.message and "supports_top_k" in e.message
    assert fake.stats.chat_calls == 1


async def test_candidate_count_sends_n(fake: FakeOpenAI, backends: Backends) -> None:
    r = await backends().generate(request(user("say hi"), candidate_count=3))
    assert fake.chat_bodies[0]["n"] == 3
    assert texts(r) == ["say hi", "say hi (choice 1)", "say hi (choice 2)"]
    assert [c.index for c in r.candidates] == [0, 1, 2]
    assert r.usage_metadata.candidates_token_count == 2 + 4 + 4


async def test_n_fans_out_when_the_server_ignores_it(fake: FakeOpenAI, backends: Backends) -> None:
    fake.ignore_n = True
    backend = backends()
    r = await backend.generate(request(user("say hi"), candidate_count=3, seed=5))
    assert texts(r) == ["say hi (seed 5)", "say hi (seed 6)", "say hi (seed 7)"]
    assert [c.index for c in r.candidates] == [0, 1, 2]
    # The prompt counts once; completions add up; total is their sum.
    assert (r.usage_metadata.prompt_token_count, r.usage_metadata.candidates_token_count,
            r.usage_metadata.total_token_count) == (2, 12, 14)
    first, *singles = fake.chat_bodies
    assert first["n"] == 3 and first["seed"] == 5
    assert sorted(b["seed"] for b in singles) == [6, 7] and all("n" not in b for b in singles)
    # Learnt: the next such request fans out at once, with no wasted n call.
    fake.reset()
    r = await backend.generate(request(user("again"), candidate_count=2))
    assert texts(r) == ["again", "again"]
    assert [("n" in b) for b in fake.chat_bodies] == [False, False]


async def test_supports_n_false_fans_out_from_the_start(fake: FakeOpenAI, backends: Backends) -> None:
    r = await backends(supports_n=False).generate(request(user("x"), candidate_count=2))
    assert len(r.candidates) == 2 and fake.stats.chat_calls == 2
    assert all("n" not in b for b in fake.chat_bodies)


# -- answer mapping -----------------------------------------------------------------------


@pytest.mark.parametrize(("reason", "expected"), [
    ("stop", F.FINISH_REASON_STOP), ("length", F.FINISH_REASON_MAX_TOKENS),
    ("content_filter", F.FINISH_REASON_SAFETY), ("tool_calls", F.FINISH_REASON_STOP),
    ("function_call", F.FINISH_REASON_STOP), ("eos_token", F.FINISH_REASON_STOP),
    ("stop_sequence", F.FINISH_REASON_STOP), ("abort", F.FINISH_REASON_OTHER),
    ("repetition", F.FINISH_REASON_OTHER), ("null", F.FINISH_REASON_OTHER),
])
async def test_finish_reasons(backends: Backends, reason: str, expected: int) -> None:
    r = await backends().generate(request(user(f"finish:{reason} some text")))
    assert r.candidates[0].finish_reason == expected
    assert texts(r) == ["some text"]


async def test_answer_fields(fake: FakeOpenAI, backends: Backends) -> None:
    r = await backends(remote_model="served-name").generate(
        request(user("one two"), user("three four five six", role="model"), user("seven eight nine"),
                max_output_tokens=2))
    expected = content_pb2.GenerateContentResponse(
        candidates=[content_pb2.Candidate(content=content_pb2.Content(role="model", parts=[
            content_pb2.Part(text="seven eight")]), finish_reason=F.FINISH_REASON_MAX_TOKENS)],
        usage_metadata=content_pb2.UsageMetadata(prompt_token_count=9, candidates_token_count=2,
                                                 total_token_count=11),
        model_version="served-name")
    assert r == expected
    assert fake.chat_bodies[0]["model"] == "served-name"


async def test_raw_entry_point_is_the_same_answer(backends: Backends) -> None:
    backend = backends()
    req = request(user("hello there"), temperature=0.2)
    raw = await backend.generate_raw(req.SerializeToString())
    assert content_pb2.GenerateContentResponse.FromString(raw) == await backend.generate(req)


# -- errors ----------------------------------------------------------------------------------


SHAPE_MESSAGE = "This model's maximum context length is 2048 tokens. However, you requested 3047 tokens."


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("status", [400, 404, 413, 422])
async def test_error_bodies_of_every_server_become_permanent_item_errors(
        fake: FakeOpenAI, backends: Backends, shape: str, status: int) -> None:
    fake.fault = Fault(status=status, shape=shape, message=SHAPE_MESSAGE)
    e = await failure(backends().generate(request(user("hi"))))
    code = code_pb2.NOT_FOUND if status == 404 else code_pb2.INVALID_ARGUMENT
    assert (e.code, e.retryable, e.outage, e.overload) == (code, False, False, False)
    message = f"body.input: {SHAPE_MESSAGE}" if shape == "infinity" else SHAPE_MESSAGE
    assert e.message == f"model server answered HTTP {status}: {message}"


@pytest.mark.parametrize(("fault", "code", "retryable", "hint", "outage", "overload"), [
    (Fault(status=401), code_pb2.UNAUTHENTICATED, False, None, False, False),
    (Fault(status=403), code_pb2.PERMISSION_DENIED, False, None, False, False),
    (Fault(status=408, retry_after="2"), code_pb2.DEADLINE_EXCEEDED, True, 2.0, False, False),
    (Fault(status=429, retry_after="3"), code_pb2.RESOURCE_EXHAUSTED, True, 3.0, False, True),
    (Fault(status=429, retry_after="3", retry_after_ms="250"), code_pb2.RESOURCE_EXHAUSTED, True, 0.25, False, True),
    (Fault(status=429, shape="tgi", message="Model is overloaded", code="overloaded"),
     code_pb2.RESOURCE_EXHAUSTED, True, None, False, True),
    (Fault(status=429, code="insufficient_quota", retry_after="1"), code_pb2.RESOURCE_EXHAUSTED, False, None,
     False, False),
    (Fault(status=500), code_pb2.INTERNAL, True, None, False, False),
    (Fault(status=502), code_pb2.UNAVAILABLE, True, None, True, False),
    (Fault(status=503, shape="llamacpp", message="Loading model", code="unavailable_error", retry_after="1"),
     code_pb2.UNAVAILABLE, True, 1.0, False, True),
    (Fault(status=504), code_pb2.DEADLINE_EXCEEDED, True, None, True, False),
    (Fault(status=501), code_pb2.UNIMPLEMENTED, False, None, False, False),
    (Fault(kind="drop"), code_pb2.UNAVAILABLE, True, None, True, False),
    (Fault(status=302), code_pb2.INTERNAL, False, None, False, False),
    (Fault(status=409, should_retry="true", retry_after="1"), code_pb2.ABORTED, True, 1.0, False, False),
    (Fault(status=503, should_retry="false"), code_pb2.UNAVAILABLE, False, None, False, True),
])
async def test_status_table(fake: FakeOpenAI, backends: Backends, fault: Fault, code: int, retryable: bool,
                            hint: float | None, outage: bool, overload: bool) -> None:
    fake.fault = fault
    e = await failure(backends().generate(request(user("hi"))))
    assert (e.code, e.retryable, e.retry_after_s, e.outage, e.overload) == (code, retryable, hint, outage, overload)
    if fault.status == 302:
        assert e.message == ("model server answered HTTP 302: redirects are not followed (they could send the "
                             "API key elsewhere)")
        assert fake.stats.chat_calls == 1


async def test_wrong_api_key_is_unauthenticated_and_the_key_never_shows(backends: Backends) -> None:
    secure = FakeOpenAI(api_key="sk-right-1")
    await secure.start()
    try:
        good = await backends(secure.url, api_key="sk-right-1").generate(request(user("hi")))
        assert texts(good) == ["hi"]
        assert secure.headers[0]["Authorization"] == "Bearer sk-right-1"
        e = await failure(backends(secure.url, api_key="sk-wrong-2").generate(request(user("hi"))))
        assert (e.code, e.retryable) == (code_pb2.UNAUTHENTICATED, False)
        assert "Incorrect API key" in e.message
        # A server that echoes the key it got: the message has *** instead.
        secure.api_key, secure.fault = None, Fault(status=400, message="bad key sk-wrong-2 in request")
        secure._auth = None
        e = await failure(backends(secure.url, api_key="sk-wrong-2").generate(request(user("hi"))))
        assert e.message == "model server answered HTTP 400: bad key *** in request"
    finally:
        await secure.stop()


async def test_long_messages_are_cut_to_1_kib(fake: FakeOpenAI, backends: Backends) -> None:
    fake.fault = Fault(status=400, message="é" * 5000 + "\nsecond line")
    e = await failure(backends().generate(request(user("hi"))))
    server_part = e.message.removeprefix("model server answered HTTP 400: ")
    assert len(server_part.encode()) <= MAX_MESSAGE_BYTES and server_part.endswith("…")
    assert "\n" not in e.message


async def test_garbage_200_is_internal_with_an_excerpt(fake: FakeOpenAI, backends: Backends) -> None:
    backend = backends()
    fake.fault = Fault(kind="garbage", garbage="<html>502 Bad Gateway</html>")
    e = await failure(backend.generate(request(user("hi"))))
    assert (e.code, e.retryable) == (code_pb2.INTERNAL, False)
    assert e.message == ("model server answered HTTP 200 with a body that is not a chat completion: "
                         "<html>502 Bad Gateway</html>")
    fake.fault = Fault(kind="garbage", garbage='{"object": "chat.completion", "choices": "none"}')
    e = await failure(backend.generate(request(user("hi"))))
    assert e.code == code_pb2.INTERNAL and '"choices":"none"' in e.message


async def test_timeout_option_and_refused_connections(fake: FakeOpenAI, backends: Backends) -> None:
    fake.fault = Fault(kind="hang")
    started = time.monotonic()
    e = await asyncio.wait_for(failure(backends(timeout="200ms").generate(request(user("hi")))), 5)
    assert 0.19 <= time.monotonic() - started < 2
    assert (e.code, e.retryable, e.outage) == (code_pb2.DEADLINE_EXCEEDED, True, True)
    assert e.message == "model server did not answer within 0.2s"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = await failure(backends(f"http://127.0.0.1:{port}/v1").generate(request(user("hi"))))
    assert (e.code, e.retryable, e.outage) == (code_pb2.UNAVAILABLE, True, True)
    assert e.message.startswith("model server unreachable")


def test_error_detail_reads_every_shape() -> None:
    for shape in SHAPES:
        from fakeopenai import error_body
        message, _ = error_detail(error_body(shape, 400, "boom", "kind"))
        assert message in ("boom", "body.input: boom"), shape
    assert error_detail({"error": {"message": "x", "code": "insufficient_quota", "type": "insufficient_quota"}}) == (
        "x", "insufficient_quota insufficient_quota")
    assert error_detail({"detail": "Not Found"}) == ("Not Found", "")
    assert error_detail([1, 2]) == (None, "")
    assert excerpt("a\n b  sk-1", "sk-1") == "a b ***"


# -- embeddings -----------------------------------------------------------------------------


def embed_request(text: str, dim: int | None = None, **kw: Any) -> content_pb2.EmbedContentRequest:
    r = content_pb2.EmbedContentRequest(content=content_pb2.Content(parts=[content_pb2.Part(text=text)]), **kw)
    if dim is not None:
        r.output_dimensionality = dim
    return r


def unit(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b, strict=True))


async def test_embeddings_are_batched_and_ordered_by_index(fake: FakeOpenAI, backends: Backends) -> None:
    fake.reverse_embeddings = True
    backend = backends(embed_batch_size=8, embed_max_wait="50ms")
    answers = await asyncio.gather(*(backend.embed(embed_request(f"doc {i}")) for i in range(20)))
    for i, a in enumerate(answers):
        assert list(a.embedding.values) == embedding(f"doc {i}", 16)
    assert fake.stats.embed_calls == 3
    assert [len(b["input"]) for b in fake.embed_bodies] == [8, 8, 4]
    assert fake.embed_bodies[0] == {"model": REMOTE, "input": [f"doc {i}" for i in range(8)]}


async def test_dimensions_truncated_and_renormalised_here(fake: FakeOpenAI, backends: Backends) -> None:
    answer = await backends().embed(embed_request("doc", 4))
    assert "dimensions" not in fake.embed_bodies[0]
    values = list(answer.embedding.values)
    assert close(values, unit(embedding("doc", 16)[:4]))
    assert abs(math.sqrt(sum(v * v for v in values)) - 1) < 1e-6
    e = await failure(backends().embed(embed_request("doc", 32)))
    assert e.code == code_pb2.INVALID_ARGUMENT and "32" in e.message and "16 dimensions" in e.message


async def test_dimensions_sent_where_supported(fake: FakeOpenAI, backends: Backends) -> None:
    fake.honour_dimensions = True
    backend = backends(supports_dimensions=True, embed_max_wait="50ms")
    a, b, c = await asyncio.gather(backend.embed(embed_request("x", 4)), backend.embed(embed_request("y", 4)),
                                   backend.embed(embed_request("z")))
    assert list(a.embedding.values) == embedding("x", 4) and list(b.embedding.values) == embedding("y", 4)
    assert list(c.embedding.values) == embedding("z", 16)
    # One call per distinct dimensionality of the group.
    assert sorted((b.get("dimensions", 0), b["input"]) for b in fake.embed_bodies) == [(0, ["z"]), (4, ["x", "y"])]
    # A server that ignores `dimensions` still gets cut here.
    fake.honour_dimensions = False
    d = await backend.embed(embed_request("x", 4))
    assert close(list(d.embedding.values), unit(embedding("x", 16)[:4]))


async def test_a_bad_input_fails_alone(fake: FakeOpenAI, backends: Backends) -> None:
    fake.fault = Fault(status=400, shape="llamacpp", match="TOO LONG", endpoint="embeddings",
                       message="input (5000 tokens) is too large to process. increase the physical batch size")
    backend = backends(embed_batch_size=8, embed_max_wait="50ms")
    texts_ = [f"doc {i}" if i != 5 else "doc TOO LONG" for i in range(8)]
    results = await asyncio.gather(*(backend.embed(embed_request(t)) for t in texts_), return_exceptions=True)
    for t, r in zip(texts_, results, strict=True):
        if "TOO LONG" in t:
            assert isinstance(r, BackendError) and r.code == code_pb2.INVALID_ARGUMENT
            assert "too large to process" in r.message
        else:
            assert isinstance(r, content_pb2.EmbedContentResponse) and list(r.embedding.values) == embedding(t, 16)
    # Halves until the bad input is alone: 1 + 2 + 2 + 2 calls.
    assert fake.stats.embed_calls == 7


async def test_a_retryable_embeddings_error_fails_the_group_for_retry(fake: FakeOpenAI, backends: Backends) -> None:
    fake.fault = Fault(status=503, endpoint="embeddings", retry_after="1")
    backend = backends(embed_max_wait="50ms")
    results = await asyncio.gather(*(backend.embed(embed_request(f"d{i}")) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, BackendError) and r.retryable and r.retry_after_s == 1.0 for r in results)
    assert fake.stats.embed_calls == 1


async def test_task_types_and_titles_through_prompts(fake: FakeOpenAI, backends: Backends) -> None:
    doc = embed_request("the text", task_type=content_pb2.TaskType.TASK_TYPE_RETRIEVAL_DOCUMENT, title="A title")
    two_parts = content_pb2.EmbedContentRequest(content=content_pb2.Content(parts=[
        content_pb2.Part(text="first"), content_pb2.Part(text="second")]))
    # No templates: the text alone, as an OpenAI embeddings endpoint takes it.
    await backends(embed_max_wait=0).embed(doc)
    await backends(embed_max_wait=0).embed(two_parts)
    templated = backends(prompts={"retrieval_document": "title: {title} | text: {text}",
                                  "TASK_TYPE_RETRIEVAL_QUERY": "query: {text}", "default": "other: {text}"},
                         default_title="none", embed_max_wait=0)
    await templated.embed(doc)
    await templated.embed(embed_request("q", task_type=content_pb2.TaskType.TASK_TYPE_RETRIEVAL_QUERY))
    await templated.embed(embed_request("plain"))
    await templated.embed(embed_request("untitled", task_type=content_pb2.TaskType.TASK_TYPE_RETRIEVAL_DOCUMENT))
    assert [b["input"] for b in fake.embed_bodies] == [
        ["the text"], ["first\nsecond"], ["title: A title | text: the text"], ["query: q"], ["other: plain"],
        ["title: none | text: untitled"]]


async def test_embeddings_garbage_is_internal(fake: FakeOpenAI, backends: Backends) -> None:
    fake.fault = Fault(kind="garbage", garbage='{"data": [{"index": 0, "embedding": [0.1]}]}', endpoint="embeddings")
    backend = backends(embed_max_wait="50ms")
    results = await asyncio.gather(*(backend.embed(embed_request(f"d{i}")) for i in range(2)), return_exceptions=True)
    assert all(isinstance(r, BackendError) and r.code == code_pb2.INTERNAL for r in results)
    assert "1 embeddings for 2 inputs" in str(results[0])


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "fragment"), [
    ({}, 'base_url is required, e.g. base_url = "http://127.0.0.1:8000/v1"'),
    ({"base_url": "ftp://x"}, "base_url must start with http:// or https://"),
    ({"base_url": "http://u:p@h/v1"}, "base_url must not hold credentials"),
    ({"base_url": "http://h/v1", "api_key": ""}, "api_key must be a non-empty string"),
    ({"base_url": "http://h/v1", "remote_model": ""}, "remote_model must be a non-empty string"),
    ({"base_url": "http://h/v1", "timeout": "soon"}, "timeout: expected a duration"),
    ({"base_url": "http://h/v1", "timeout": 0}, "timeout must be positive"),
    ({"base_url": "http://h/v1", "supports_top_k": "yes"}, "supports_top_k must be true or false"),
    ({"base_url": "http://h/v1", "supports_n": 1}, "supports_n must be true or false"),
    ({"base_url": "http://h/v1", "supports_dimensions": "no"}, "supports_dimensions must be true or false"),
    ({"base_url": "http://h/v1", "system_role": None}, "system_role must be true or false"),
    ({"base_url": "http://h/v1", "max_tokens_field": "max_new_tokens"},
     "max_tokens_field must be one of 'max_tokens', 'max_completion_tokens'"),
    ({"base_url": "http://h/v1", "default_max_tokens": 0}, "default_max_tokens must be an integer from 1"),
    ({"base_url": "http://h/v1", "embed_batch_size": 5000}, "embed_batch_size must be an integer from 1 to 4096"),
    ({"base_url": "http://h/v1", "embed_max_wait": -1}, "embed_max_wait: must not be negative"),
    ({"base_url": "http://h/v1", "embed_max_wait": "1 minute"}, "embed_max_wait: expected a duration"),
    ({"base_url": "http://h/v1", "prompts": {"SEARCH": "{text}"}}, "prompts.SEARCH is not a task type (known:"),
    ({"base_url": "http://h/v1", "prompts": {"default": "q: {txt}"}}, "prompts.default has an unknown placeholder"),
    ({"base_url": "http://h/v1", "prompts": {"default": "q: {title}"}}, "prompts.default must contain {text}"),
    ({"base_url": "http://h/v1", "prompts": {"default": "q: {text"}}, "prompts.default is not a template"),
    ({"base_url": "http://h/v1", "prompts": "query: {text}"}, "prompts must be a table"),
    ({"base_url": "http://h/v1", "extra_body": {"n": 2}}, "extra_body must not set n"),
    ({"base_url": "http://h/v1", "headers": {"Authorization": "x"}}, "headers must not set Authorization"),
    ({"base_url": "http://h/v1", "top_k": 5}, "unknown options top_k (known: api_key, base_url,"),
])
def test_bad_options_are_one_line_config_errors(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_backend(ModelConfig(name=MODEL, backend="openai", options=options))
    text = str(info.value)
    assert text.startswith(f"{MODEL} (backend openai): ") and "\n" not in text
    assert fragment in text, text


def test_options_come_from_the_models_table() -> None:
    config = config_from_dict({"models": [{
        "name": MODEL, "backend": "openai", "base_url": "http://127.0.0.1:8081/v1/", "api_key": "sk-1",
        "max_concurrency": 8, "timeout": "120s", "supports_top_k": False, "max_tokens_field": "max_completion_tokens",
        "extra_body": {"repetition_penalty": 1.1}, "headers": {"OpenAI-Organization": "org-1"}}]})
    backend = create_backend(config.models[0])
    assert isinstance(backend, OpenAIBackend)
    assert (backend.base_url, backend.remote_model) == ("http://127.0.0.1:8081/v1", "smol")


async def test_extra_body_and_headers_are_sent(fake: FakeOpenAI, backends: Backends) -> None:
    backend = backends(extra_body={"chat_template_kwargs": {"enable_thinking": False}},
                       headers={"X-Team": "research"})
    await backend.generate(request(user("hi")))
    assert fake.chat_bodies[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert fake.headers[0]["X-Team"] == "research"


def test_serve_with_a_bad_option_exits_with_one_line(tmp_path: Path) -> None:
    import subprocess
    config = tmp_path / "bad.toml"
    config.write_text('[[models]]\nname = "models/smol"\nbackend = "openai"\nbase_url = "http://127.0.0.1:1/v1"\n'
                      'api_key = "sk-do-not-print"\nsupports_top_k = "sometimes"\n')
    result = subprocess.run([sys.executable, "-m", "longbatch.server.main", "--port", "0", "--data-dir",
                             str(tmp_path / "data"), "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "models/smol (backend openai): supports_top_k must be true or false" in lines[0]
    assert "sk-do-not-print" not in result.stderr + result.stdout


# -- through the server ------------------------------------------------------------------------

Remote = Callable[..., Awaitable[Stubs]]


@pytest.fixture
async def remote(make_server: MakeServer) -> AsyncIterator[Remote]:
    """Start a longbatch server whose ``models/smol`` is an openai backend."""
    handles: list[ServerHandle] = []
    channels: list[Stubs] = []

    async def start(base_url: str, max_concurrency: int = 16, **options: object) -> Stubs:
        model = ModelConfig(name=MODEL, backend="openai", max_concurrency=max_concurrency,
                            options={"base_url": base_url, **options})
        executor = ExecutorSettings(max_attempts=MAX_ATTEMPTS, backoff_initial_s=0.01, backoff_max_s=0.1,
                                    request_timeout_s=2.0, outage_timeout_s=1.0, probe_initial_s=0.1,
                                    probe_max_s=0.2)
        handle = await make_server(ServerConfig(models=(model,), executor=executor))
        handles.append(handle)
        stubs = Stubs.connect(handle.target)
        channels.append(stubs)
        return stubs

    yield start
    for stubs in channels:
        await stubs.channel.close(None)
    for handle in handles:
        await handle.running.stop(grace_s=1.0)


def generate_batch(prompts: list[str], **config: Any) -> batch_pb2.BatchGenerateContentRequest:
    reqs = []
    for i, p in enumerate(prompts):
        r = batch_pb2.InlinedRequest(request=request(user(p), **config))
        r.metadata["i"] = i
        reqs.append(r)
    batch = batch_pb2.GenerateContentBatch(
        model=MODEL, input_config=batch_pb2.InputConfig(requests=batch_pb2.InlinedRequests(requests=reqs)))
    return batch_pb2.BatchGenerateContentRequest(batch=batch)


async def run(stubs: Stubs, prompts: list[str], within: float = 30.0, **config: Any) -> list[
        batch_pb2.InlinedResponse]:
    op = await stubs.batches.BatchGenerateContent(generate_batch(prompts, **config))
    op = await wait_done(stubs, op.name, within=within)
    assert metadata_of(op).state == batch_pb2.BatchState.BATCH_STATE_SUCCEEDED
    output = batch_pb2.GenerateContentBatchOutput()
    assert op.response.Unpack(output)
    results = list(output.inlined_responses.inlined_responses)
    assert [r.metadata["i"] for r in results] == list(range(len(prompts)))
    return results


def prompts(n: int) -> list[str]:
    return [f"prompt {i}" for i in range(n)]


async def test_a_batch_through_the_server(fake: FakeOpenAI, remote: Remote) -> None:
    stubs = await remote(fake.url, api_key="sk-e2e")
    results = await run(stubs, prompts(40), temperature=0.0, max_output_tokens=64)
    for i, r in enumerate(results):
        assert r.WhichOneof("output") == "response", r.error
        assert texts(r.response) == [f"prompt {i}"]
        assert r.response.candidates[0].finish_reason == F.FINISH_REASON_STOP
        assert r.response.model_version == REMOTE
        assert r.response.usage_metadata.total_token_count == 4
    assert fake.stats.calls == dict.fromkeys(prompts(40), 1)
    assert all(b == {"model": REMOTE, "messages": [{"role": "user", "content": b["messages"][0]["content"]}],
                     "temperature": 0.0, "max_tokens": 64} for b in fake.chat_bodies)
    # ListModels shows where the model runs, never the key.
    listed = await stubs.models.ListModels(model_pb2.ListModelsRequest())
    model = next(m for m in listed.models if m.name == MODEL)
    assert (model.backend, model.base_url) == ("openai", fake.url)
    assert "sk-e2e" not in str(listed)


@pytest.mark.parametrize("header", ["retry_after", "retry_after_ms"])
async def test_retries_honour_retry_after(fake: FakeOpenAI, remote: Remote, header: str) -> None:
    hint = 0.3  # three times backoff_max: only the hint can make the gaps this long
    value = {"retry_after": str(hint)} if header == "retry_after" else {"retry_after_ms": str(int(hint * 1000))}
    fake.fault = Fault(status=429, times=2, **value)  # type: ignore[arg-type]
    stubs = await remote(fake.url)
    n = 6
    results = await run(stubs, prompts(n))
    assert all(r.WhichOneof("output") == "response" for r in results)
    assert fake.stats.calls == dict.fromkeys(prompts(n), 3)
    for p in prompts(n):
        times = fake.stats.arrivals[p]
        assert min(b - a for a, b in itertools.pairwise(times)) >= hint - SLACK_S, (p, times)


async def test_retryable_errors_end_in_the_item_error_after_max_attempts(fake: FakeOpenAI, remote: Remote) -> None:
    fake.fault = Fault(status=500, shape="vllm", message="EngineCore encountered an issue")
    stubs = await remote(fake.url)
    results = await run(stubs, prompts(5))
    for r in results:
        assert (r.error.code, r.error.message) == (
            code_pb2.INTERNAL, "model server answered HTTP 500: EngineCore encountered an issue")
    assert fake.stats.calls == dict.fromkeys(prompts(5), MAX_ATTEMPTS)


@pytest.mark.parametrize(("status", "code"), [(401, code_pb2.UNAUTHENTICATED), (404, code_pb2.NOT_FOUND),
                                              (422, code_pb2.INVALID_ARGUMENT)])
async def test_permanent_statuses_are_called_once_per_item(fake: FakeOpenAI, remote: Remote, status: int,
                                                           code: int) -> None:
    fake.fault = Fault(status=status, shape="vllm", message=f"refused with {status}")
    stubs = await remote(fake.url)
    results = await run(stubs, prompts(6))
    for r in results:
        assert (r.error.code, r.error.message) == (code, f"model server answered HTTP {status}: refused with {status}")
    assert fake.stats.calls == dict.fromkeys(prompts(6), 1)


async def test_insufficient_quota_is_not_retried(fake: FakeOpenAI, remote: Remote) -> None:
    fake.fault = Fault(status=429, code="insufficient_quota", message="You exceeded your current quota.")
    stubs = await remote(fake.url)
    results = await run(stubs, prompts(3))
    assert all(r.error.code == code_pb2.RESOURCE_EXHAUSTED for r in results)
    assert fake.stats.calls == dict.fromkeys(prompts(3), 1)


async def test_a_hanging_server_times_out_then_items_fail(fake: FakeOpenAI, remote: Remote) -> None:
    fake.fault = Fault(kind="hang")
    stubs = await remote(fake.url, timeout="200ms")
    started = time.monotonic()
    results = await run(stubs, prompts(4), within=20.0)
    assert time.monotonic() - started >= 0.2
    for r in results:
        assert r.error.code == code_pb2.DEADLINE_EXCEEDED and "did not answer within 0.2s" in r.error.message


async def test_garbage_200_through_the_server(fake: FakeOpenAI, remote: Remote) -> None:
    fake.fault = Fault(kind="garbage", garbage="not json at all")
    stubs = await remote(fake.url)
    results = await run(stubs, prompts(3))
    for r in results:
        assert r.error.code == code_pb2.INTERNAL and r.error.message.endswith(": not json at all")
    assert fake.stats.calls == dict.fromkeys(prompts(3), 1)


async def test_an_embed_batch_through_the_server(fake: FakeOpenAI, remote: Remote) -> None:
    stubs = await remote(fake.url, max_concurrency=32, embed_batch_size=16)
    n = 40
    reqs = []
    for i in range(n):
        r = batch_pb2.InlinedEmbedContentRequest(request=embed_request(f"doc {i}", 8))
        r.metadata["i"] = i
        reqs.append(r)
    batch = batch_pb2.EmbedContentBatch(model=MODEL, input_config=batch_pb2.InputEmbedContentConfig(
        requests=batch_pb2.InlinedEmbedContentRequests(requests=reqs)))
    op: operations_pb2.Operation = await stubs.batches.AsyncBatchEmbedContent(
        batch_pb2.AsyncBatchEmbedContentRequest(batch=batch))
    op = await wait_done(stubs, op.name)
    output = batch_pb2.EmbedContentBatchOutput()
    assert op.response.Unpack(output)
    results = output.inlined_responses.inlined_responses
    for i, r in enumerate(results):
        assert r.metadata["i"] == i
        assert close(list(r.response.embedding.values), unit(embedding(f"doc {i}", 16)[:8]))
    assert fake.stats.embed_calls < n
    assert all(len(b["input"]) <= 16 for b in fake.embed_bodies)


async def test_fake_runs_as_a_subprocess(backends: Backends) -> None:
    script = Path(__file__).with_name("fakeopenai.py")
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), "--port", "0", "--latency", "0.01",
                                                stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert re.fullmatch(r"fakeopenai listening on 127\.0\.0\.1:\d+\n", line), line
        url = "http://" + line.split()[-1]
        answers = await asyncio.gather(*(backends(url + "/v1").generate(request(user(f"q{i}"))) for i in range(3)))
        assert [texts(a) for a in answers] == [["q0"], ["q1"], ["q2"]]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/v1/models") as resp:
                assert (await resp.json())["data"][0]["id"] == "fake-model"
            async with session.get(f"{url}/_fake/stats") as resp:
                assert (await resp.json())["chat_calls"] == 3
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)


def test_calls_work_on_uvloop() -> None:
    # `longbatch serve` runs on uvloop when it is installed, whose transports
    # are not asyncio.Transport instances: the HTTP client must not care.
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        fake = FakeOpenAI()
        await fake.start()
        backend = create_backend(ModelConfig(name=MODEL, backend="openai", options={"base_url": fake.url}))
        try:
            answers = await asyncio.gather(*(backend.generate(request(user(f"q{i}"))) for i in range(4)))
            assert [texts(a) for a in answers] == [[f"q{i}"] for i in range(4)]
        finally:
            await backend.aclose()
            await fake.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 20))


@pytest.mark.parametrize("options", [{"api_key": "sk-…"}, {"api_key": "sk-a\tb"},
                                     {"headers": {"X-Team": "é"}}, {"headers": {"X-A:b": "1"}}])
def test_keys_and_headers_must_be_sendable_as_headers(options: dict[str, object]) -> None:
    # A key pasted with a typographic ellipsis once made every call fail to encode.
    with pytest.raises(ConfigError) as e:
        create_backend(ModelConfig(name=MODEL, backend="openai", options={"base_url": "http://127.0.0.1:9/v1",
                                                                           **options}))
    assert "\n" not in str(e.value) and "printable ASCII" in str(e.value) and "…" not in str(e.value)
