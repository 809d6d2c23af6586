"""A fake OpenAI-compatible model server for tests: the real wire format, 127.0.0.1 only.

Endpoints (under ``/v1``):

- ``POST /v1/chat/completions`` answers deterministically from the last
  message: its text (``" (seed S)"`` appended when the body has a seed,
  ``" (choice i)"`` for the i-th of ``n``), cut to ``max_tokens`` /
  ``max_completion_tokens`` words with finish ``length``, else ``stop``. A
  prompt starting ``finish:REASON `` answers that finish reason (``null``
  for JSON null). ``n`` is honoured unless ``ignore_n``. Usage counts words,
  with the reasoning and cached token details real servers add.
- ``POST /v1/embeddings`` answers :func:`fakemodel.embedding` vectors (unit
  length, from a SHA-256 of the input) of ``embed_dim`` floats, or of
  ``dimensions`` when ``honour_dimensions``; in reverse order (with correct
  ``index``) when ``reverse_embeddings``.
- ``GET /v1/models`` lists ``served_models``.

A :class:`Fault` makes calls fail: an error status with the error body of
vLLM (new or old shape), llama.cpp, Ollama, OpenAI, TGI or Infinity, with
``Retry-After`` / ``retry-after-ms``; a hang (until :meth:`FakeOpenAI.stop`
or :meth:`FakeOpenAI.release_hangs`); a 200 with garbage; a dropped
connection. A fault may apply only to calls whose prompt or inputs contain
``match``, and only ``times`` times per key (then the call succeeds).

Every chat and embeddings body is recorded (``chat_bodies``,
``embed_bodies``) so tests can assert the exact mapping, and calls are
counted per prompt / per input text.

As a subprocess (benchmarks): ``python tests/fakeopenai.py --port 0 --latency 0.05``
prints ``fakeopenai listening on 127.0.0.1:PORT`` and serves until SIGTERM;
it then records nothing (``--record`` turns recording on) so a call costs
little more than its JSON. ``GET /_fake/stats`` returns counts,
``POST /_fake/fault`` sets a fault (JSON of :class:`Fault`, ``{}`` clears),
``POST /_fake/reset`` clears counts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from fakemodel import embedding

HOST = "127.0.0.1"  # never anything else: tests must not listen beyond loopback
SHAPES = ("vllm", "vllm-old", "llamacpp", "ollama", "openai", "tgi", "infinity")
KINDS = ("status", "hang", "garbage", "drop")
_JSON = "application/json"


@dataclass(frozen=True)
class Fault:
    """How calls fail.

    Attributes:
        kind: ``status`` (an error answer), ``hang`` (no answer until
            released), ``garbage`` (200 with ``garbage`` as the body) or
            ``drop`` (the connection is closed without an answer).
        status: the HTTP status of a ``status`` fault.
        shape: whose error body: one of :data:`SHAPES`.
        message: the error message in the body.
        code: OpenAI's ``error.code`` (``"insufficient_quota"``,
            ``"context_length_exceeded"``); also the type where a shape has one.
        retry_after: ``Retry-After`` header value.
        retry_after_ms: ``retry-after-ms`` header value.
        times: each key (prompt, or embeddings input) fails this many calls,
            then succeeds; None: always.
        match: only calls whose prompt (or any input) contains this fail.
        endpoint: ``chat``, ``embeddings`` or ``""`` for both.
        garbage: the body of a ``garbage`` fault.
        should_retry: an ``x-should-retry`` header value (OpenAI's).
    """

    kind: str = "status"
    status: int = 500
    shape: str = "openai"
    message: str = "fake failure"
    code: str | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    times: int | None = None
    match: str | None = None
    endpoint: str = ""
    garbage: str = "<html>502 Bad Gateway</html>"
    should_retry: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.shape not in SHAPES or self.endpoint not in ("", "chat", "embeddings"):
            raise ValueError(f"bad fault {self}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        """A fault from its JSON form (the dataclass fields)."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(data) - known:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        return cls(**data)


def error_body(shape: str, status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """The error body ``shape``'s server sends (see research notes in docs/backends.md)."""
    if shape == "vllm":
        return {"error": {"message": message, "type": code or "BadRequestError", "param": None, "code": status}}
    if shape == "vllm-old":
        return {"object": "error", "message": message, "type": code or "BadRequestError", "param": None,
                "code": status}
    if shape == "llamacpp":
        return {"error": {"code": status, "message": message, "type": code or "invalid_request_error"}}
    if shape == "ollama":
        return {"error": message}
    if shape == "tgi":
        return {"error": message, "error_type": code or "validation"}
    if shape == "infinity":
        return {"detail": [{"loc": ["body", "input"], "msg": message, "type": code or "value_error"}]}
    return {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": None, "code": code}}


@dataclass
class Stats:
    """What the fake saw."""

    calls: Counter[str] = field(default_factory=Counter)
    """Chat calls per prompt (last message's text)."""
    inputs: Counter[str] = field(default_factory=Counter)
    """Embeddings inputs seen, per text (a call with 3 inputs counts 3)."""
    faults: Counter[str] = field(default_factory=Counter)
    """Faulted calls per key."""
    arrivals: dict[str, list[float]] = field(default_factory=dict)
    """``time.monotonic()`` of each chat call's arrival, per prompt (when recording)."""
    chat_calls: int = 0
    embed_calls: int = 0
    hanging: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"calls": dict(self.calls), "inputs": dict(self.inputs), "faults": dict(self.faults),
                "chat_calls": self.chat_calls, "embed_calls": self.embed_calls, "hanging": self.hanging}


class FakeOpenAI:
    """The fake server; see the module docstring."""

    def __init__(self, *, api_key: str | None = None, latency_s: float = 0.0, ignore_n: bool = False,
                 honour_dimensions: bool = False, embed_dim: int = 16, reverse_embeddings: bool = False,
                 record: bool = True, served_models: tuple[str, ...] = ("fake-model",)) -> None:
        """Build a stopped fake.

        Args:
            api_key: when set, calls need ``Authorization: Bearer {api_key}``
                (else 401 in OpenAI's shape).
            latency_s: delay before every answer that is not a hang.
            ignore_n: answer one choice whatever ``n`` says (llama-cpp-python, Ollama).
            honour_dimensions: answer ``dimensions`` floats when asked.
            embed_dim: the model's embedding size.
            reverse_embeddings: list embeddings last input first.
            record: keep every body (tests); off for benchmarks.
            served_models: what ``/v1/models`` lists.
        """
        self.api_key = api_key
        self.latency_s = latency_s
        self.ignore_n = ignore_n
        self.honour_dimensions = honour_dimensions
        self.embed_dim = embed_dim
        self.reverse_embeddings = reverse_embeddings
        self.record = record
        self.served_models = served_models
        self.fault: Fault | None = None
        self.stats = Stats()
        self.chat_bodies: list[dict[str, Any]] = []
        self.embed_bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.port = 0
        self._auth = f"Bearer {api_key}" if api_key else None
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        """The base URL up to and including ``/v1``."""
        return f"http://{HOST}:{self.port}/v1"

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1:``port`` (0 picks a free one)."""
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_fake/stats", self._get_stats)
        app.router.add_post("/_fake/fault", self._set_fault)
        app.router.add_post("/_fake/reset", self._reset)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, HOST, port, backlog=1024).start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Release hanging calls and stop listening; safe to call twice."""
        self._release.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def release_hangs(self) -> None:
        """Let every hanging call answer 503 now."""
        self._release.set()
        self._release = asyncio.Event()

    def reset(self) -> None:
        """Forget what was seen (counts and bodies)."""
        self.stats = Stats(hanging=self.stats.hanging)
        self.chat_bodies.clear()
        self.embed_bodies.clear()
        self.headers.clear()

    # -- handlers ------------------------------------------------------------------

    async def _read(self, request: web.Request) -> dict[str, Any] | web.Response:
        if self._auth is not None and request.headers.get("Authorization") != self._auth:
            return _json(401, error_body("openai", 401, "Incorrect API key provided: sk-***. You can find your "
                                         "API key at https://platform.openai.com/account/api-keys.",
                                         "invalid_api_key"))
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json(400, error_body("openai", 400, "We could not parse the JSON body of your request."))
        if not isinstance(body, dict):
            return _json(400, error_body("openai", 400, "The body must be a JSON object."))
        if self.record:
            self.headers.append(dict(request.headers))
        return body

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        stats = self.stats
        stats.chat_calls += 1
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            return _json(400, error_body("openai", 400, "messages must be a non-empty list of messages"))
        prompt = messages[-1]["content"]
        stats.calls[prompt] += 1
        if self.record:
            self.chat_bodies.append(body)
            stats.arrivals.setdefault(prompt, []).append(time.monotonic())
        fault = self._fault_for("chat", [prompt])
        if fault is not None:
            return await self._fail(fault, request)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return web.Response(body=orjson.dumps(self._completion(body, messages, prompt)), content_type=_JSON)

    def _completion(self, body: dict[str, Any], messages: list[dict[str, str]], prompt: str) -> dict[str, Any]:
        finish: str | None = "stop"
        if prompt.startswith("finish:"):
            head, _, prompt = prompt.partition(" ")
            reason = head.removeprefix("finish:")
            finish = None if reason == "null" else reason
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        n = body.get("n", 1)
        n = 1 if self.ignore_n or not isinstance(n, int) or n < 1 else n
        seed = body.get("seed")
        choices = []
        completion = 0
        for i in range(n):
            text = prompt if seed is None else f"{prompt} (seed {seed})"
            if i:
                text += f" (choice {i})"
            words = text.split(" ")
            reason = finish
            if isinstance(limit, int) and len(words) > limit:
                text, reason = " ".join(words[:limit]), "length"
            completion += len(text.split())
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": None, "finish_reason": reason})
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        digest = hashlib.blake2b(prompt.encode(), digest_size=6).hexdigest()
        return {
            "id": f"chatcmpl-{digest}", "object": "chat.completion", "created": 1_700_000_000,
            "model": body.get("model", ""), "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion,
                      "prompt_tokens_details": {"cached_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0}},
            "system_fingerprint": "fp_fake",
        }

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        stats = self.stats
        stats.embed_calls += 1
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return _json(422, error_body("infinity", 422, "input must be a string or a non-empty list of strings"))
        for text in inputs:
            stats.inputs[text] += 1
        if self.record:
            self.embed_bodies.append(body)
        fault = self._fault_for("embeddings", inputs)
        if fault is not None:
            return await self._fail(fault, request)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        dim = self.embed_dim
        asked = body.get("dimensions")
        if self.honour_dimensions and isinstance(asked, int) and 0 < asked:
            dim = asked
        data = [{"object": "embedding", "index": i, "embedding": embedding(t, dim)} for i, t in enumerate(inputs)]
        if self.reverse_embeddings:
            data.reverse()
        tokens = sum(len(t.split()) for t in inputs)
        answer = {"object": "list", "data": data, "model": body.get("model", ""),
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.Response(body=orjson.dumps(answer), content_type=_JSON)

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake"} for m in self.served_models]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=_JSON)

    def _fault_for(self, where: str, keys: list[str]) -> Fault | None:
        fault = self.fault
        if fault is None or (fault.endpoint and fault.endpoint != where):
            return None
        hit = [k for k in keys if fault.match is None or fault.match in k]
        if not hit:
            return None
        faults = self.stats.faults
        if fault.times is not None and all(faults[k] >= fault.times for k in hit):
            return None
        for k in hit:
            faults[k] += 1
        return fault

    async def _fail(self, fault: Fault, request: web.Request) -> web.StreamResponse:
        if fault.kind == "hang":
            release = self._release
            self.stats.hanging += 1
            try:
                await release.wait()
            finally:
                self.stats.hanging -= 1
            return _json(503, error_body(fault.shape, 503, "released"))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault.kind == "garbage":
            return web.Response(body=fault.garbage.encode(), content_type=_JSON)
        if fault.kind == "drop":
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise asyncio.CancelledError  # aiohttp drops the handler of a closed connection
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = fault.retry_after
        if fault.retry_after_ms is not None:
            headers["retry-after-ms"] = fault.retry_after_ms
        if fault.should_retry is not None:
            headers["x-should-retry"] = fault.should_retry
        if 300 <= fault.status < 400:
            headers["Location"] = "http://127.0.0.2/elsewhere"
        return _json(fault.status, error_body(fault.shape, fault.status, fault.message, fault.code), headers)

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.to_json()), content_type=_JSON)

    async def _set_fault(self, request: web.Request) -> web.Response:
        try:
            data = orjson.loads(await request.read())
            self.fault = Fault.from_json(data) if data else None
        except (orjson.JSONDecodeError, TypeError, ValueError) as e:
            return _json(400, error_body("openai", 400, str(e)))
        return web.Response(body=b"{}", content_type=_JSON)

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=b"{}", content_type=_JSON)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON, headers=headers)


# -- subprocess entry point ---------------------------------------------------------


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fake OpenAI-compatible model server (127.0.0.1 only).")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks one")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    p.add_argument("--ignore-n", action="store_true", help="answer one choice whatever n says")
    p.add_argument("--honour-dimensions", action="store_true", help="answer `dimensions` floats")
    p.add_argument("--embed-dim", type=int, default=16)
    p.add_argument("--record", action="store_true", help="keep every body (memory grows)")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeOpenAI(api_key=args.api_key, latency_s=args.latency, ignore_n=args.ignore_n,
                      honour_dimensions=args.honour_dimensions, embed_dim=args.embed_dim, record=args.record)
    await fake.start(args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fakeopenai listening on {HOST}:{fake.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the fake until SIGTERM or SIGINT."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args))
    else:
        uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
