"""A fake Gemini REST model server for fault tests: real HTTP on 127.0.0.1 only.

``POST /v1beta/models/{m}:generateContent`` echoes the prompt (the text of the
last turn); ``POST /v1beta/models/{m}:embedContent`` answers a unit vector
derived from a SHA-256 of the text. A :class:`FaultPlan` makes a share of the
calls fail (429 + Retry-After, 500, 503, 400, 403, invalid JSON) or hang until
the server stops. Whether a call fails depends only on the seed, the prompt
and the attempt number, not on arrival order, so a run is reproducible under
any concurrency. Calls are counted per prompt text so tests can assert how
often each request ran.

Two faults are about the server rather than a call: ``FaultPlan.max_in_flight``
answers 429 to a call that arrives while that many are being answered (a
rate-limited server), and :meth:`FakeModel.go_down` closes the listening
socket and the open connections, so calls are refused, then listens again
on the same port (a restarting server). ``Stats.max_in_flight`` is the most
calls seen at once.

In-process::

    fake = FakeModel(FaultPlan(rate=0.3, faults=("429", "503")))
    await fake.start()          # fake.url == "http://127.0.0.1:PORT"
    ...
    await fake.stop()

As a subprocess (for kill/restart tests)::

    python tests/fakemodel.py --port 0 --rate 0.3 --faults 429,503 --retry-after 0.05

prints ``fakemodel listening on 127.0.0.1:PORT`` and serves until SIGTERM.
Control endpoints: ``GET /_fake/stats`` (counts as JSON), ``POST /_fake/plan``
(a JSON FaultPlan replaces the current one), ``POST /_fake/reset``,
``POST /_fake/down`` (``{"seconds": 5}``: down now, back after that long).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import math
import random
import signal
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

HOST = "127.0.0.1"  # never anything else: tests must not listen beyond loopback
FAULT_KINDS = frozenset({"429", "500", "503", "400", "403", "hang", "badjson"})
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                 500: "INTERNAL", 503: "UNAVAILABLE"}


@dataclass(frozen=True)
class FaultPlan:
    """Which calls fail, and how.

    Attributes:
        rate: share of calls (0..1) that fail.
        faults: fault kinds picked from at random: ``"429"``, ``"500"``,
            ``"503"``, ``"400"``, ``"403"``, ``"hang"`` (never answers) or
            ``"badjson"`` (200 with a body that is not JSON).
        retry_after: ``Retry-After`` header value sent with 429 and 503.
        max_faults_per_key: a prompt fails at most this many times, then
            always succeeds (None: no limit).
        seed: seeds the per-(prompt, attempt) decision.
        latency_s: delay before every answer that is not a hang.
        max_in_flight: answer 429 (with ``retry_after``) to a call that
            arrives while this many are being answered (None: no limit).
    """

    rate: float = 0.0
    faults: tuple[str, ...] = ("503",)
    retry_after: str | None = None
    max_faults_per_key: int | None = None
    seed: int = 0
    latency_s: float = 0.0
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in 0..1, got {self.rate}")
        if not self.faults or set(self.faults) - FAULT_KINDS:
            raise ValueError(f"faults must be some of {sorted(FAULT_KINDS)}, got {self.faults}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FaultPlan:
        """A plan from its JSON form (the dataclass fields)."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(data) - known:
            raise ValueError(f"unknown plan fields {sorted(unknown)}")
        if "faults" in data:
            data = {**data, "faults": tuple(data["faults"])}
        return cls(**data)

    def decide(self, key: str, attempt: int, faults_so_far: int) -> str | None:
        """The fault for ``key``'s ``attempt``-th call (1-based), or None to answer."""
        if self.rate <= 0.0 or (self.max_faults_per_key is not None and faults_so_far >= self.max_faults_per_key):
            return None
        rng = random.Random(f"{self.seed}\x00{key}\x00{attempt}")
        if rng.random() >= self.rate:
            return None
        return self.faults[rng.randrange(len(self.faults))]


@dataclass
class Stats:
    """What the fake saw."""

    calls: Counter[str] = field(default_factory=Counter)
    """Calls per prompt text (generate) or content text (embed)."""
    faults: Counter[str] = field(default_factory=Counter)
    """Faulted calls per prompt text."""
    fault_kinds: Counter[str] = field(default_factory=Counter)
    """Faulted calls per fault kind."""
    arrivals: dict[str, list[float]] = field(default_factory=dict)
    """``time.monotonic()`` of each call's arrival, per prompt text."""
    models: Counter[str] = field(default_factory=Counter)
    """Calls per model path (``models/x``)."""
    task_types: Counter[str] = field(default_factory=Counter)
    """``taskType`` values of embed calls as sent."""
    hanging: int = 0
    """Calls hanging right now."""
    max_in_flight: int = 0
    """The most calls seen being answered at once (see FakeModel.reset_peak)."""
    overloaded: int = 0
    """Calls answered 429 for ``FaultPlan.max_in_flight``."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (arrivals left out)."""
        return {"calls": dict(self.calls), "faults": dict(self.faults), "fault_kinds": dict(self.fault_kinds),
                "models": dict(self.models), "total": self.total, "hanging": self.hanging,
                "max_in_flight": self.max_in_flight, "overloaded": self.overloaded}

    @property
    def total(self) -> int:
        """All calls, faulted or not."""
        return sum(self.calls.values())


class FakeModel:
    """The fake server; see the module docstring."""

    def __init__(self, plan: FaultPlan | None = None, *, api_key: str | None = None) -> None:
        """Build a stopped fake.

        Args:
            plan: the faults; none by default.
            api_key: when set, calls must send it as ``x-goog-api-key``.
        """
        self.plan = plan or FaultPlan()
        self.api_key = api_key
        self.stats = Stats()
        self.port = 0
        self.downs = 0
        """How often the fake went down."""
        self.in_flight = 0
        """Calls being answered right now (429s of ``max_in_flight`` are not)."""
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None
        self._back: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1:``port`` (0 picks a free one)."""
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1beta/{tail:.+}", self._model_call)
        app.router.add_get("/_fake/stats", self._get_stats)
        app.router.add_post("/_fake/plan", self._set_plan)
        app.router.add_post("/_fake/reset", self._reset)
        app.router.add_post("/_fake/down", self._down)
        # A short shutdown: hanging handlers are released by stop() anyway.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, HOST, port)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Release hanging calls and stop listening; safe to call twice."""
        back, self._back = self._back, None
        if back is not None:
            back.cancel()
            await asyncio.gather(back, return_exceptions=True)
        await self._close()

    async def _close(self) -> None:
        if self._release is not None:
            self._release.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def reset_peak(self) -> None:
        """Start measuring ``stats.max_in_flight`` afresh from now."""
        self.stats.max_in_flight = self.in_flight

    @property
    def up(self) -> bool:
        """Whether the fake is listening."""
        return self._runner is not None

    async def go_down(self, seconds: float | None = None) -> None:
        """Go down like a stopped server: the listening socket closes, so new
        connections are refused; idle keep-alive connections close, and calls
        being answered get up to a second to finish.

        Args:
            seconds: listen again on the same port after this long; None
                stays down until :meth:`come_back`.
        """
        if self._runner is None:
            return
        self.downs += 1
        # The listener closes first, then idle connections; calls being
        # answered get up to a second (the runner's shutdown_timeout).
        await self._close()
        if seconds is not None:
            self._back = asyncio.create_task(self._come_back_after(seconds))

    async def come_back(self) -> None:
        """Listen again on the port the fake had; no-op while it is up."""
        if self._runner is None:
            await self.start(self.port)

    async def _come_back_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._back = None
        await self.come_back()

    def release_hangs(self) -> None:
        """Let every hanging call answer 503 now."""
        if self._release is not None:
            self._release.set()
            self._release = asyncio.Event()

    # -- handlers ------------------------------------------------------------------

    async def _model_call(self, request: web.Request) -> web.Response:
        model, _, method = request.match_info["tail"].rpartition(":")
        if method not in ("generateContent", "embedContent") or not model.startswith("models/"):
            return _error(404, f"no such method {request.match_info['tail']!r}")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "Invalid JSON payload received.")
        if not isinstance(body, dict):
            return _error(400, "Invalid JSON payload received: not an object.")
        generate = method == "generateContent"
        key = _prompt(body) if generate else _text(body.get("content"))
        stats = self.stats
        stats.calls[key] += 1
        stats.models[model] += 1
        stats.arrivals.setdefault(key, []).append(time.monotonic())
        if not generate:
            stats.task_types[str(body.get("taskType", ""))] += 1
        if self.api_key is not None and request.headers.get("x-goog-api-key") != self.api_key:
            return _error(403, "API key not valid. Please pass a valid API key.")
        plan = self.plan
        if plan.max_in_flight is not None and self.in_flight >= plan.max_in_flight:
            stats.overloaded += 1
            headers = {"Retry-After": plan.retry_after} if plan.retry_after is not None else {}
            return _error(429, "Resource has been exhausted (too many requests in flight).", headers)
        self.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, self.in_flight)
        try:
            return await self._answer(key, body, model, generate, plan)
        finally:
            self.in_flight -= 1

    async def _answer(self, key: str, body: dict[str, Any], model: str, generate: bool,
                      plan: FaultPlan) -> web.Response:
        stats = self.stats
        fault = plan.decide(key, stats.calls[key], stats.faults[key])
        if fault is not None:
            stats.faults[key] += 1
            stats.fault_kinds[fault] += 1
            return await self._fault(fault, plan)
        if plan.latency_s:
            await asyncio.sleep(plan.latency_s)
        answer = _generate_answer(key, body, model) if generate else _embed_answer(key, body)
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def _fault(self, fault: str, plan: FaultPlan) -> web.Response:
        headers = {"Retry-After": plan.retry_after} if plan.retry_after is not None else {}
        if fault == "hang":
            release = self._release
            assert release is not None
            self.stats.hanging += 1
            try:
                await release.wait()
            finally:
                self.stats.hanging -= 1
            return _error(503, "released")
        if plan.latency_s:
            await asyncio.sleep(plan.latency_s)
        if fault == "badjson":
            return web.Response(body=b"{\"candidates\": [", content_type="application/json")
        if fault == "429":
            return _error(429, "Resource has been exhausted (e.g. check quota).", headers)
        if fault == "503":
            return _error(503, "The model is overloaded. Please try again later.", headers)
        if fault == "500":
            return _error(500, "An internal error has occurred.")
        if fault == "403":
            return _error(403, "Permission denied.")
        return _error(400, "Request contains an invalid argument.")

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.to_json()), content_type="application/json")

    async def _set_plan(self, request: web.Request) -> web.Response:
        try:
            self.plan = FaultPlan.from_json(orjson.loads(await request.read()))
        except (orjson.JSONDecodeError, TypeError, ValueError) as e:
            return _error(400, str(e))
        return web.Response(body=b"{}", content_type="application/json")

    async def _reset(self, request: web.Request) -> web.Response:
        self.stats = Stats(hanging=self.stats.hanging)
        return web.Response(body=b"{}", content_type="application/json")

    async def _down(self, request: web.Request) -> web.Response:
        try:
            seconds = orjson.loads(await request.read()).get("seconds")
        except (orjson.JSONDecodeError, AttributeError) as e:
            return _error(400, str(e))
        if seconds is not None and (not isinstance(seconds, int | float) or not 0 <= seconds <= 3600):
            return _error(400, "seconds must be a number of seconds up to 3600, or null")
        # After this answer is sent: going down closes this very connection.
        asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self.go_down(seconds)))
        return web.Response(body=b"{}", content_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A Gemini-shaped error answer."""
    body = {"error": {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _text(content: Any) -> str:
    if not isinstance(content, dict):
        return ""
    parts = content.get("parts") or []
    return " ".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))


def _prompt(body: dict[str, Any]) -> str:
    contents = body.get("contents") or []
    return _text(contents[-1]) if contents else ""


def _generate_answer(prompt: str, body: dict[str, Any], model: str) -> dict[str, Any]:
    tokens = len(prompt.split())
    # Real Gemini answers carry fields the proto lacks (safetyRatings, token
    # details) and enum names without the proto's prefix: the backend must
    # cope with both.
    return {
        "candidates": [{
            "content": {"role": "model", "parts": [{"text": prompt}]},
            "finishReason": "STOP",
            "index": 0,
            "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}],
        }],
        "usageMetadata": {"promptTokenCount": tokens, "candidatesTokenCount": tokens, "totalTokenCount": 2 * tokens,
                          "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}]},
        "modelVersion": f"fake-{model.removeprefix('models/')}",
        "responseId": "fake",
    }


def embedding(text: str, dim: int) -> list[float]:
    """The vector the fake answers for ``text``: a unit vector of ``dim`` floats."""
    raw = bytearray()
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(text.encode() + counter.to_bytes(4, "big")).digest()
        counter += 1
    values = [i / 2147483647.5 - 1.0 for i in struct.unpack(f">{dim}I", bytes(raw[: dim * 4]))]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Rounded to float32 so the proto's float field carries them unchanged.
    return [struct.unpack("f", struct.pack("f", v / norm))[0] for v in values]


def _embed_answer(text: str, body: dict[str, Any]) -> dict[str, Any]:
    dim = body.get("outputDimensionality", 8)
    if not isinstance(dim, int) or not 1 <= dim <= 4096:
        dim = 8
    return {"embedding": {"values": embedding(text, dim)}}


# -- subprocess entry point ---------------------------------------------------------


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fake Gemini REST model server (127.0.0.1 only).")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks one")
    p.add_argument("--rate", type=float, default=0.0, help="share of calls that fail, 0..1")
    p.add_argument("--faults", default="503", help="comma-separated kinds: " + ",".join(sorted(FAULT_KINDS)))
    p.add_argument("--retry-after", default=None, help="Retry-After header for 429/503")
    p.add_argument("--max-faults-per-key", type=int, default=None, help="then a prompt always succeeds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--api-key", default=None, help="require this x-goog-api-key")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    plan = FaultPlan(rate=args.rate, faults=tuple(args.faults.split(",")), retry_after=args.retry_after,
                     max_faults_per_key=args.max_faults_per_key, seed=args.seed, latency_s=args.latency)
    fake = FakeModel(plan, api_key=args.api_key)
    await fake.start(args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fakemodel listening on {HOST}:{fake.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the fake until SIGTERM or SIGINT."""
    asyncio.run(_serve(_parse_args(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
