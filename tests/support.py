"""Shared test helpers: request builders, stubs and status-detail decoding."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import sqlite3
import sys
import sysconfig
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import error_details_pb2, status_pb2

from longbatch.server.backends.echo import answer_many
from longbatch.v1 import batch_pb2, batch_pb2_grpc, content_pb2, model_pb2_grpc


def tool(name: str) -> str | None:
    """A command-line tool installed beside this interpreter (the dev extras
    put buf and grpcurl into the venv's bin/, which need not be on PATH)."""
    beside = Path(sysconfig.get_path("scripts")) / name
    return str(beside) if beside.exists() else shutil.which(name)


def assert_db_intact(data_dir: Path) -> None:
    """The server's SQLite database passes ``PRAGMA integrity_check``."""
    db = sqlite3.connect(data_dir / "longbatch.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


@dataclass
class Stubs:
    """Async stubs over one channel."""

    channel: grpc.aio.Channel
    batches: batch_pb2_grpc.BatchServiceStub
    ops: operations_pb2_grpc.OperationsStub
    models: model_pb2_grpc.ModelServiceStub

    @classmethod
    def connect(cls, target: str) -> Stubs:
        channel = grpc.aio.insecure_channel(target)
        return cls(channel, batch_pb2_grpc.BatchServiceStub(channel), operations_pb2_grpc.OperationsStub(channel),
                   model_pb2_grpc.ModelServiceStub(channel))


def gen_request(text: str) -> content_pb2.GenerateContentRequest:
    return content_pb2.GenerateContentRequest(
        contents=[content_pb2.Content(role="user", parts=[content_pb2.Part(text=text)])]
    )


def generate_batch(n: int, model: str = "models/echo", **kw: object) -> batch_pb2.BatchGenerateContentRequest:
    """A create request with ``n`` inlined prompts ``prompt {i}``, metadata ``{"i": i}``."""
    reqs = []
    for i in range(n):
        r = batch_pb2.InlinedRequest(request=gen_request(f"prompt {i}"))
        r.metadata["i"] = i
        reqs.append(r)
    request_id = str(kw.pop("request_id", ""))
    batch = batch_pb2.GenerateContentBatch(
        model=model, input_config=batch_pb2.InputConfig(requests=batch_pb2.InlinedRequests(requests=reqs)),
        **kw,  # type: ignore[arg-type]
    )
    return batch_pb2.BatchGenerateContentRequest(batch=batch, request_id=request_id)


def embed_batch(n: int, model: str = "models/echo", dim: int = 16) -> batch_pb2.AsyncBatchEmbedContentRequest:
    reqs = []
    for i in range(n):
        r = batch_pb2.InlinedEmbedContentRequest(request=content_pb2.EmbedContentRequest(
            content=content_pb2.Content(parts=[content_pb2.Part(text=f"doc {i}")]), output_dimensionality=dim))
        r.metadata["i"] = i
        reqs.append(r)
    batch = batch_pb2.EmbedContentBatch(
        model=model,
        input_config=batch_pb2.InputEmbedContentConfig(requests=batch_pb2.InlinedEmbedContentRequests(requests=reqs)),
    )
    return batch_pb2.AsyncBatchEmbedContentRequest(batch=batch)


def metadata_of(op: operations_pb2.Operation) -> batch_pb2.GenerateContentBatch | batch_pb2.EmbedContentBatch:
    msg: batch_pb2.GenerateContentBatch | batch_pb2.EmbedContentBatch
    if op.metadata.Is(batch_pb2.GenerateContentBatch.DESCRIPTOR):
        msg = batch_pb2.GenerateContentBatch()
    else:
        msg = batch_pb2.EmbedContentBatch()
    assert op.metadata.Unpack(msg)
    return msg


async def wait_done(stubs: Stubs, name: str, within: float = 30.0,
                    metadata: Sequence[tuple[str, str]] | None = None) -> operations_pb2.Operation:
    """WaitOperation until done, bounded by ``within`` seconds (``metadata``: an API key, say)."""
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"{name} not done within {within}s"
        req = operations_pb2.WaitOperationRequest(name=name)
        req.timeout.FromNanoseconds(int(min(left, 10) * 1e9))
        op = await stubs.ops.WaitOperation(req, metadata=metadata, timeout=min(left, 10) + 5)
        if op.done:
            return op


async def eventually(check: Callable[[], Any], within: float = 10.0, what: str = "", every: float = 0.02) -> Any:
    """Re-check ``check`` (plain or async) until it returns something truthy,
    and return that; fail after ``within`` seconds.

    Tests wait on a condition, never for a fixed time: a fixed sleep is too
    short on a loaded machine and, when it proves that something did not
    happen, blind to it happening a little later.
    """
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {within}s: {what or check}"
        await asyncio.sleep(every)


class Calls:
    """Counts the calls of one object's async method, wrapped on the instance.

    A way to see a server's loop go round (its expiry sweep's query, say)
    without a hook in the server: wait for ``more(2)`` and the second call
    began after the first one that could have seen the state before, so
    one whole round ran on the state after.
    """

    def __init__(self, obj: object, name: str) -> None:
        self.count = 0
        self.active = 0
        real = getattr(obj, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            self.active += 1
            try:
                return await real(*args, **kwargs)
            finally:
                self.active -= 1

        setattr(obj, name, counted)

    async def more(self, n: int, within: float = 10.0) -> None:
        """Until ``n`` more calls than now have begun."""
        target = self.count + n
        await eventually(lambda: self.count >= target, within, f"{n} more calls")


@dataclass
class Details:
    """A decoded error: code, message, ErrorInfo reason and violations."""

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    violations: list[tuple[str, str]]
    info_metadata: dict[str, str]


def details(err: grpc.aio.AioRpcError) -> Details:
    """Decode ``grpc-status-details-bin`` and check it agrees with the status."""
    trailers = err.trailing_metadata() or ()
    raw = dict(trailers).get("grpc-status-details-bin")
    assert raw is not None, f"no status details on {err.code()}: {err.details()}"
    # C-core clients refuse trailers past 8 KiB (by chance, up to 16 KiB):
    # every error must fit with room for the pseudo-headers (HPACK counts 32
    # bytes per entry on top of name and value).
    encoded_message = urllib.parse.quote(err.details() or "", safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
    size = sum(32 + len(k) + len(v) for k, v in trailers) + 32 + len("grpc-message") + len(encoded_message)
    assert size <= 7 * 1024 + 512, f"{size} bytes of trailers on {err.code()}"
    status = status_pb2.Status.FromString(raw)
    assert status.code == err.code().value[0]
    assert status.message == err.details()
    info, violations = unpack_status(status)
    assert info.reason and info.reason.upper() == info.reason, f"missing/odd ErrorInfo reason {info.reason!r}"
    assert info.domain == "longbatch.dev"
    return Details(err.code(), err.details() or "", info.reason, info.domain, violations, dict(info.metadata))


def unpack_status(status: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo, list[tuple[str, str]]]:
    """The ErrorInfo (empty if none) and the BadRequest violations of a status."""
    info = error_details_pb2.ErrorInfo()
    violations: list[tuple[str, str]] = []
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            d.Unpack(info)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
    return info, violations


class ServerProcess:
    """``longbatch serve`` as a child process, for kill/restart tests."""

    def __init__(self, data_dir: Path, config: Path | None = None, extra: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.config = config
        self.extra = list(extra)
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.http_port = 0

    async def start(self, within: float = 20.0) -> str:
        """Start (again) and return the target once it listens."""
        args = ["-m", "longbatch.server.main", "--port", "0", "--http-port", "0", "--data-dir", str(self.data_dir),
                "--log-level", "WARNING", *self.extra]
        if self.config:
            args += ["--config", str(self.config)]
        await self.ensure_dead()
        self.proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), within)).decode()
        assert line.startswith("longbatch listening on 127.0.0.1:"), line
        self.port = int(line.rsplit(":", 1)[1])
        if "--http-port" not in self.extra:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), within)).decode()
            assert line.startswith(("longbatch http listening on http://127.0.0.1:",
                                    "longbatch http listening on https://127.0.0.1:")), line
            self.http_port = int(line.rsplit(":", 1)[1])
        return f"127.0.0.1:{self.port}"

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 10)

    async def terminate(self, within: float = 20.0) -> int:
        """SIGTERM and the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), within)

    async def ensure_dead(self) -> None:
        """Kill the child if it still runs."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)


# -- answerers for worker processes (importable there, so picklable) -------------


def slow_echo(delay_s: float, payloads: list[bytes]) -> list[bytes]:
    """Echo's bulk answers after a pause: keeps a range in flight long enough to cancel."""
    time.sleep(delay_s)
    return answer_many("echo-1", payloads)


def refuse(payloads: list[bytes]) -> list[bytes]:
    """An answerer that fails every range."""
    raise RuntimeError("this answerer refuses every range")


def broken_runner(lo: int, hi: int, answer: object) -> object:
    """A range runner that fails in the worker process as the store might (full disk, say)."""
    raise sqlite3.OperationalError("disk I/O error (injected)")


async def run_process(*argv: str, env: dict[str, str] | None = None, within: float = 60.0,
                      cwd: Path | None = None) -> tuple[int, str, str]:
    """Run a command to its end (killed after ``within`` seconds): exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``longbatch ARGS`` in a subprocess: exit code, stdout, stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LONGBATCH_")}
    return await run_process(sys.executable, "-m", "longbatch.client.cli", *args, env={**clean, **(env or {})})
