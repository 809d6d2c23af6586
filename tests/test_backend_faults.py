"""The ``gemini-http`` backend against a faulty model server (API.md section 8).

A real longbatch server runs batches against tests/fakemodel.py over HTTP on
127.0.0.1; the fake fails calls on purpose and counts how often each prompt
reached it, so retries, Retry-After, timeouts and final errors are measured,
not assumed.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
from conftest import MakeServer, ServerHandle
from fakemodel import FakeModel, FaultPlan, embedding
from google.longrunning import operations_pb2
from google.rpc import code_pb2

from longbatch.server.backends import BackendError, GeminiHttpBackend, create_backend
from longbatch.server.config import ConfigError, ExecutorSettings, ModelConfig, ServerConfig, config_from_dict
from longbatch.server.retry import parse_retry_after
from longbatch.v1 import batch_pb2, content_pb2

from support import Stubs, embed_batch, gen_request, generate_batch, metadata_of, wait_done

MODEL = "models/remote"
SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED
MAX_ATTEMPTS = 4
REQUEST_TIMEOUT_S = 0.5
# A backend that answers nothing at all is an outage: the model pauses and
# probes, and its requests give up this long after it began.
OUTAGE_TIMEOUT_S = 1.0
# Scheduling slack when comparing a measured delay with a hinted one.
SLACK_S = 0.005

Remote = Callable[..., Awaitable[Stubs]]



@pytest.fixture
async def remote(make_server: MakeServer) -> AsyncIterator[Remote]:
    """Start a longbatch server whose ``models/remote`` is a gemini-http backend."""
    handles: list[ServerHandle] = []
    channels: list[Stubs] = []

    async def start(base_url: str, **options: object) -> Stubs:
        model = ModelConfig(name=MODEL, backend="gemini-http", max_concurrency=16,
                            options={"base_url": base_url, **options})
        executor = ExecutorSettings(max_attempts=MAX_ATTEMPTS, backoff_initial_s=0.01, backoff_max_s=0.1,
                                    request_timeout_s=REQUEST_TIMEOUT_S, outage_timeout_s=OUTAGE_TIMEOUT_S,
                                    probe_initial_s=0.1, probe_max_s=0.2)
        handle = await make_server(ServerConfig(models=(model,), executor=executor))
        handles.append(handle)
        stubs = Stubs.connect(handle.target)
        channels.append(stubs)
        return stubs

    yield start
    for stubs in channels:
        await stubs.channel.close(None)
    for handle in handles:
        await handle.running.stop(grace_s=1.0)  # also closes the backends' HTTP sessions


async def run_batch(stubs: Stubs, n: int, within: float = 60.0) -> operations_pb2.Operation:
    op = await stubs.batches.BatchGenerateContent(generate_batch(n, model=MODEL))
    return await wait_done(stubs, op.name, within=within)


def entries(op: operations_pb2.Operation) -> list[batch_pb2.InlinedResponse]:
    output = batch_pb2.GenerateContentBatchOutput()
    assert op.response.Unpack(output)
    return list(output.inlined_responses.inlined_responses)


def stats_of(op: operations_pb2.Operation) -> tuple[int, int, int, int]:
    s = metadata_of(op).batch_stats
    return s.request_count, s.successful_request_count, s.failed_request_count, s.pending_request_count


def assert_all_answered(op: operations_pb2.Operation, n: int) -> None:
    """SUCCEEDED, every request answered with its own prompt, in order."""
    assert metadata_of(op).state == SUCCEEDED
    assert stats_of(op) == (n, n, 0, 0)
    results = entries(op)
    assert len(results) == n
    for i, r in enumerate(results):
        assert r.metadata["i"] == i
        assert r.WhichOneof("output") == "response", (i, r.error)
        candidate = r.response.candidates[0]
        assert candidate.content.parts[0].text == f"prompt {i}"
        # Gemini's "STOP" arrives as the proto's FINISH_REASON_STOP.
        assert candidate.finish_reason == content_pb2.FinishReason.FINISH_REASON_STOP
        assert r.response.usage_metadata.total_token_count == 4
        assert r.response.model_version == "fake-remote"


def assert_all_failed(op: operations_pb2.Operation, n: int, code: int) -> list[batch_pb2.InlinedResponse]:
    """SUCCEEDED with every request failed with ``code``, in order."""
    assert metadata_of(op).state == SUCCEEDED
    assert stats_of(op) == (n, 0, n, 0)
    results = entries(op)
    assert [r.metadata["i"] for r in results] == list(range(n))
    for r in results:
        assert r.WhichOneof("output") == "error"
        assert r.error.code == code, r.error
    return results


def prompts(n: int) -> list[str]:
    return [f"prompt {i}" for i in range(n)]


def min_gap(arrivals: list[float]) -> float:
    return min(b - a for a, b in itertools.pairwise(arrivals))


# -- through the server ------------------------------------------------------------------


async def test_thirty_percent_transient_faults_are_retried_until_all_succeed(fake: FakeModel, remote: Remote) -> None:
    # A prompt fails at most twice, fewer than max_attempts, so every request
    # must end answered; which calls fail depends only on (seed, prompt, attempt).
    fake.plan = FaultPlan(rate=0.3, faults=("429", "503", "500"), retry_after="0.02", max_faults_per_key=2, seed=7)
    stubs = await remote(fake.url)
    n = 500
    op = await run_batch(stubs, n)
    assert_all_answered(op, n)
    calls, faults = fake.stats.calls, fake.stats.faults
    assert set(calls) == set(prompts(n))
    for p in prompts(n):
        # Each fault cost exactly one more call, and nothing ran after success.
        assert calls[p] == faults[p] + 1, p
    total_faults = sum(faults.values())
    assert fake.stats.total == n + total_faults
    # 30 % of first calls, then 30 % of those again: about 195 expected.
    assert 120 < total_faults < 280, total_faults
    assert set(fake.stats.fault_kinds) == {"429", "503", "500"}
    assert fake.stats.models == {MODEL: fake.stats.total}


async def test_always_429_fails_each_item_after_max_attempts(fake: FakeModel, remote: Remote) -> None:
    fake.plan = FaultPlan(rate=1.0, faults=("429",), retry_after="0.05")
    stubs = await remote(fake.url)
    n = 20
    op = await run_batch(stubs, n)
    for r in assert_all_failed(op, n, code_pb2.RESOURCE_EXHAUSTED):
        assert "HTTP 429" in r.error.message and "exhausted" in r.error.message
    assert metadata_of(op).batch_stats.failed_request_count == n
    assert fake.stats.calls == dict.fromkeys(prompts(n), MAX_ATTEMPTS)
    for p in prompts(n):
        assert min_gap(fake.stats.arrivals[p]) >= 0.05 - SLACK_S


@pytest.mark.parametrize("fault", ["429", "503"])
async def test_retry_after_is_honoured(fake: FakeModel, remote: Remote, fault: str) -> None:
    # 0.3 s is three times backoff_max: only the hint can make retries this slow.
    hint = 0.3
    fake.plan = FaultPlan(rate=1.0, faults=(fault,), retry_after=f"{hint}", max_faults_per_key=2)
    stubs = await remote(fake.url)
    n = 8
    op = await run_batch(stubs, n)
    assert_all_answered(op, n)
    for p in prompts(n):
        arrivals = fake.stats.arrivals[p]
        assert len(arrivals) == 3
        assert min_gap(arrivals) >= hint - SLACK_S, (p, arrivals)


async def test_hanging_calls_time_out_and_are_retried(fake: FakeModel, remote: Remote) -> None:
    fake.plan = FaultPlan(rate=1.0, faults=("hang",), max_faults_per_key=1)
    stubs = await remote(fake.url)
    n = 20
    started = time.monotonic()
    op = await run_batch(stubs, n, within=15.0)
    elapsed = time.monotonic() - started
    assert_all_answered(op, n)
    assert fake.stats.calls == dict.fromkeys(prompts(n), 2)
    assert elapsed >= REQUEST_TIMEOUT_S  # the first calls really waited for the deadline
    for p in prompts(n):
        assert min_gap(fake.stats.arrivals[p]) >= REQUEST_TIMEOUT_S - SLACK_S


async def test_calls_that_always_hang_end_deadline_exceeded(fake: FakeModel, remote: Remote) -> None:
    fake.plan = FaultPlan(rate=1.0, faults=("hang",))
    stubs = await remote(fake.url)
    n = 16  # one wave at max_concurrency: 4 attempts x (0.5 s + watchdog tick) ≈ 2.6 s
    started = time.monotonic()
    op = await run_batch(stubs, n, within=20.0)
    assert time.monotonic() - started < 15.0
    for r in assert_all_failed(op, n, code_pb2.DEADLINE_EXCEEDED):
        assert "did not answer" in r.error.message and "unreachable for" in r.error.message
    # Nothing answers: an outage, so no request spent its attempts; each
    # called once, a few again as probes, until outage_timeout.
    calls = fake.stats.calls
    assert set(calls) == set(prompts(n))
    assert sum(calls.values()) <= n + 3, calls


async def test_400_is_invalid_argument_and_not_retried(fake: FakeModel, remote: Remote) -> None:
    fake.plan = FaultPlan(rate=1.0, faults=("400",))
    stubs = await remote(fake.url)
    n = 10
    op = await run_batch(stubs, n)
    for r in assert_all_failed(op, n, code_pb2.INVALID_ARGUMENT):
        assert r.error.message == "model server answered HTTP 400: Request contains an invalid argument."
    assert fake.stats.calls == dict.fromkeys(prompts(n), 1)


async def test_invalid_json_is_internal_and_not_retried(fake: FakeModel, remote: Remote) -> None:
    fake.plan = FaultPlan(rate=1.0, faults=("badjson",))
    stubs = await remote(fake.url)
    op = await run_batch(stubs, 5)
    for r in assert_all_failed(op, 5, code_pb2.INTERNAL):
        assert "invalid JSON" in r.error.message
    assert fake.stats.calls == dict.fromkeys(prompts(5), 1)


async def test_connection_refused_is_unavailable_after_retries(remote: Remote) -> None:
    # A port that was free a moment ago and has no listener: connect() is refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stubs = await remote(f"http://127.0.0.1:{port}")
    n = 10
    started = time.monotonic()
    op = await run_batch(stubs, n, within=20.0)
    elapsed = time.monotonic() - started
    for r in assert_all_failed(op, n, code_pb2.UNAVAILABLE):
        assert r.error.message.startswith("model server unreachable")
    # Three backoffs of at least 5, 10 and 20 ms each: proof the item was retried.
    assert elapsed >= 0.035


async def test_api_key_is_sent_and_a_wrong_one_is_permission_denied(fake: FakeModel, remote: Remote) -> None:
    fake.api_key = "secret-key-1"
    good = await remote(fake.url, api_key="secret-key-1")
    assert_all_answered(await run_batch(good, 3), 3)
    bad = await remote(fake.url, api_key="wrong-key-2")
    op = await run_batch(bad, 3)
    for r in assert_all_failed(op, 3, code_pb2.PERMISSION_DENIED):
        assert "HTTP 403" in r.error.message and "wrong-key-2" not in r.error.message
    assert fake.stats.calls == dict.fromkeys(prompts(3), 2)  # one good call, one refused, no retries


async def test_embed_batch_through_the_fake(fake: FakeModel, remote: Remote) -> None:
    fake.plan = FaultPlan(rate=0.5, faults=("503",), max_faults_per_key=1, seed=3)
    stubs = await remote(fake.url, remote_model="text-embedding-004")
    op = await stubs.batches.AsyncBatchEmbedContent(embed_batch(50, model=MODEL, dim=12))
    op = await wait_done(stubs, op.name)
    output = batch_pb2.EmbedContentBatchOutput()
    assert op.response.Unpack(output)
    results = output.inlined_responses.inlined_responses
    assert [r.metadata["i"] for r in results] == list(range(50))
    for i, r in enumerate(results):
        assert list(r.response.embedding.values) == embedding(f"doc {i}", 12)
    assert fake.stats.models == {"models/text-embedding-004": fake.stats.total}
    assert fake.stats.total == 50 + sum(fake.stats.faults.values()) > 50


# -- the backend alone -----------------------------------------------------------------------


def backend_for(url: str, **options: object) -> GeminiHttpBackend:
    backend = create_backend(ModelConfig(name=MODEL, backend="gemini-http", options={"base_url": url, **options}))
    assert isinstance(backend, GeminiHttpBackend)
    return backend


async def call_error(backend: GeminiHttpBackend, prompt: str = "x") -> BackendError:
    try:
        await backend.generate(gen_request(prompt))
    except BackendError as e:
        return e
    raise AssertionError("the call succeeded")


async def test_backend_maps_statuses_and_retry_after(fake: FakeModel) -> None:
    backend = backend_for(fake.url)
    try:
        expected = {"429": (code_pb2.RESOURCE_EXHAUSTED, 1.5), "503": (code_pb2.UNAVAILABLE, 1.5),
                    "500": (code_pb2.INTERNAL, None), "400": (code_pb2.INVALID_ARGUMENT, None),
                    "403": (code_pb2.PERMISSION_DENIED, None), "badjson": (code_pb2.INTERNAL, None)}
        for fault, (code, hint) in expected.items():
            fake.plan = FaultPlan(rate=1.0, faults=(fault,), retry_after="1.5")
            e = await call_error(backend)
            assert (e.code, e.retry_after_s) == (code, hint), (fault, e.message)
            assert e.retryable == (fault in ("429", "503", "500"))
        fake.plan = FaultPlan()
        assert (await backend.generate(gen_request("fine"))).candidates[0].content.parts[0].text == "fine"
    finally:
        await backend.aclose()
    assert (await call_error(backend)).code == code_pb2.UNAVAILABLE  # closed stays closed
    await backend.aclose()  # twice is fine


async def test_backend_404_for_an_unknown_method(fake: FakeModel) -> None:
    backend = backend_for(fake.url + "/nowhere")
    try:
        e = await call_error(backend)
        assert e.code == code_pb2.NOT_FOUND and not e.retryable
        assert "HTTP 404" in e.message
    finally:
        await backend.aclose()


async def test_backend_timeout_option_gives_deadline_exceeded(fake: FakeModel) -> None:
    fake.plan = FaultPlan(rate=1.0, faults=("hang",))
    backend = backend_for(fake.url, timeout="200ms")
    try:
        started = time.monotonic()
        e = await asyncio.wait_for(call_error(backend), 5)
        assert 0.19 <= time.monotonic() - started < 2
        assert e.code == code_pb2.DEADLINE_EXCEEDED and e.retryable
    finally:
        await backend.aclose()


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("0.05") == 0.05
    assert parse_retry_after(" 7 ") == 7.0
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0


@pytest.mark.parametrize(("options", "fragment"), [
    ({}, "base_url is required"),
    ({"base_url": ""}, "base_url must be a URL"),
    ({"base_url": 8080}, "base_url must be a URL"),
    ({"base_url": "ftp://127.0.0.1:21"}, "http:// or https://"),
    ({"base_url": "127.0.0.1:8080"}, "http:// or https://"),
    ({"base_url": "http://"}, "has no host"),
    ({"base_url": "http://127.0.0.1:99999"}, "not a valid URL"),
    ({"base_url": "http://127.0.0.1:8080/?x=1"}, "query or fragment"),
    ({"base_url": "http://u:p@127.0.0.1:8080"}, "credentials"),
    ({"base_url": "http://127.0.0.1:8080", "api_key": ""}, "api_key"),
    ({"base_url": "http://127.0.0.1:8080", "timeout": "soon"}, "timeout"),
    ({"base_url": "http://127.0.0.1:8080", "timeout": "0s"}, "timeout must be positive"),
    ({"base_url": "http://127.0.0.1:8080", "remote_model": "a:b"}, "remote_model"),
    ({"base_url": "http://127.0.0.1:8080", "base-url": "x"}, "unknown options base-url"),
])
def test_bad_options_are_config_errors(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
        create_backend(ModelConfig(name=MODEL, backend="gemini-http", options=options))
    assert str(info.value).startswith(f"{MODEL} (backend gemini-http): ")


def test_options_come_from_the_models_table() -> None:
    config = config_from_dict({"models": [{"name": MODEL, "backend": "gemini-http", "max_concurrency": 8,
                                           "base_url": "http://127.0.0.1:8080", "api_key": "k", "timeout": "30s"}]})
    backend = create_backend(config.models[0])
    assert isinstance(backend, GeminiHttpBackend)
    assert backend._generate_url == "http://127.0.0.1:8080/v1beta/models/remote:generateContent"


def test_good_options_build_urls() -> None:
    backend = backend_for("https://example.invalid/proxy/", remote_model="gemini-2.0-flash", timeout="30s")
    assert backend._generate_url == "https://example.invalid/proxy/v1beta/models/gemini-2.0-flash:generateContent"
    assert backend._embed_url == "https://example.invalid/proxy/v1beta/models/gemini-2.0-flash:embedContent"


async def test_fake_runs_as_a_subprocess() -> None:
    script = Path(__file__).with_name("fakemodel.py")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "--port", "0", "--rate", "1", "--faults", "429", "--retry-after", "2",
        "--max-faults-per-key", "1", stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("fakemodel listening on 127.0.0.1:"), line
        url = "http://" + line.split()[-1]
        backend = backend_for(url)
        try:
            e = await asyncio.wait_for(call_error(backend, "hi"), 10)
            assert (e.code, e.retry_after_s) == (code_pb2.RESOURCE_EXHAUSTED, 2.0)
            answer = await asyncio.wait_for(backend.generate(gen_request("hi")), 10)
            assert answer.candidates[0].content.parts[0].text == "hi"
        finally:
            await backend.aclose()
        async with aiohttp.ClientSession() as session, session.get(f"{url}/_fake/stats") as resp:
            stats = await resp.json()
        assert (stats["calls"], stats["faults"], stats["total"]) == ({"hi": 2}, {"hi": 1}, 2)
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
