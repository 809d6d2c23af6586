"""End-to-end benchmark of a file batch on a real longbatch server, plus GetOperation load.

Usage::

    python bench/bench_e2e.py [--lines 1000000] [--sizes 100000,1000000] [--load-seconds 10]
                              [--json out.json] [--skip-load] [--config TOML] [--keep]

What it does (everything talks to 127.0.0.1 only; every loop is bounded in count and time):

1. Streams ``--lines`` JSONL request lines (``{"key": "k{i}", "request": {...}}``, 150-200 bytes,
   varied text) into a temp dir; each size in ``--sizes`` reads a prefix of that file.
2. For each size, starts a fresh ``longbatch.server.main`` process on a fresh data dir, then
   measures upload (MB/s), ingest (lines/s, create returned → batch leaves PENDING, GetOperation
   polled every 20 ms), execution (req/s, RUNNING → done), end to end (req/s, first uploaded byte
   → last downloaded byte of the responses file), verifies the results file (line count, keys in
   order), and reads the server's peak RSS (``VmHWM``) plus an RSS timeline sampled every 100 ms.
3. Unless ``--skip-load``: GetOperation at 64 in flight from a separate process, against
   (i) the idle server (a done batch), (iii) a bare grpc.aio server in another process that
   returns the same serialized Operation, and (ii) the server while a batch of the largest size runs.
4. Prints an aligned table with targets (pass/miss) and a JSON object with all figures; writes the
   full JSON (with the 100 ms RSS timelines) to ``--json`` and draws ``bench/out/rss.png`` when
   matplotlib is importable.

Hidden modes used by the script itself: ``--load-worker`` (the load generator process) and
``--bare-server`` (the bare grpc.aio Operations server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
from google.longrunning import operations_pb2, operations_pb2_grpc

from longbatch.v1 import batch_pb2, batch_pb2_grpc, content_pb2, file_pb2, file_pb2_grpc

HOST = "127.0.0.1"
POLL_S = 0.020
"""GetOperation polling period while waiting for state changes."""
RSS_SAMPLE_S = 0.100
UPLOAD_CHUNK = 1 << 20
CONCURRENCY = 64
LOAD_WARMUP_S = 1.0
CALL_TIMEOUT_S = 10.0
CANCEL_TIMEOUT_S = 120.0
MB = 1_000_000
CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # never route 127.0.0.1 through a proxy from the environment
    ("grpc.max_receive_message_length", 64 << 20),
]
PENDING = batch_pb2.BatchState.BATCH_STATE_PENDING
RUNNING = batch_pb2.BatchState.BATCH_STATE_RUNNING
SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED

TARGET_INGEST = 100_000
TARGET_E2E = 40_000
TARGET_RSS_MB = 150.0
TARGET_RSS_FLAT = 1.20
"""Flat: the largest size's peak RSS is at most this times the smallest size's."""
TARGET_GETOP_RATIO = 0.9
TARGET_GETOP_P99_MS = 40.0
TARGET_BUSY_RPS = 1_000
PROBE_EVERY_S = 0.25
"""While the big batch runs, a small high-priority batch is created this often (a write that
waits for the store behind the big batch's commits, and work that must jump the queue)."""
PROBE_REQUESTS = 8

SCRIPT = Path(__file__).resolve()
OUT_DIR = SCRIPT.parent / "out"


class BenchError(Exception):
    """A step failed or timed out; the message says which and where the logs are."""


# ---------------------------------------------------------------------------------------------
# Input generation
# ---------------------------------------------------------------------------------------------

WORDS = (
    "the a of to and in is for on with that as are this be by from it at or an summarize translate explain "
    "list describe compare write classify answer question paragraph sentence customer review product order "
    "invoice weather report email summary French German table JSON data model result between steps short "
    "river mountain budget quarterly meeting notes bug ticket release schedule recipe garden planet history"
).split()


def _texts(rng: random.Random, count: int) -> list[str]:
    """``count`` prompt texts of 80-125 characters, built from random words."""
    texts = []
    for _ in range(count):
        goal = rng.randint(80, 125)
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < goal:
            words.append(rng.choice(WORDS))
        texts.append((" ".join(words)).capitalize()[:goal].rstrip() + "?")
    return texts


SYSTEMS = ("You are a terse assistant.", "Answer in one sentence.", "You are a careful reviewer; list issues.",
           "Reply in JSON with keys answer and confidence.")


def _request(rng: random.Random, texts: list[str], i: int, mix: str) -> dict[str, Any]:
    """One request: plain single-turn text, or with ``mix="realistic"`` a mix of shapes users send.

    The realistic mix: 40 % single-turn, 20 % with a system instruction, 20 % multi-turn
    (user, model, user), 20 % with a generation config (temperature, topP, maxOutputTokens,
    stopSequences, seed). None of the last three takes the ingest's plain-text fast route.
    """
    text = texts[(i * 2654435761) % len(texts)]
    turn = {"parts": [{"text": text}]}
    if mix == "plain":
        return {"contents": [turn]}
    shape = i % 5
    if shape == 2:
        return {"systemInstruction": {"parts": [{"text": SYSTEMS[i % len(SYSTEMS)]}]},
                "contents": [dict(turn, role="user")]}
    if shape == 3:
        earlier = texts[(i * 40503) % len(texts)]
        return {"contents": [{"role": "user", "parts": [{"text": earlier}]},
                             {"role": "model", "parts": [{"text": "Noted. " + earlier[:40]}]},
                             {"role": "user", "parts": [{"text": text}]}]}
    if shape == 4:
        return {"contents": [turn], "generationConfig": {
            "temperature": round(rng.uniform(0, 1), 2), "topP": 0.95, "maxOutputTokens": 64 + i % 192,
            "stopSequences": ["\n\n"], "seed": i}}
    return {"contents": [turn]}


def generate_input(path: Path, lines: int, seed: int = 7, mix: str = "plain") -> int:
    """Stream ``lines`` request lines into ``path`` (written in blocks); return the byte count.

    ``mix`` is ``"plain"`` (single-turn text only) or ``"realistic"`` (see ``_request``).
    """
    rng = random.Random(seed)
    texts = _texts(rng, 4093)
    size = 0
    with path.open("wb") as f:
        block: list[bytes] = []
        for i in range(lines):
            block.append(orjson.dumps({"key": f"k{i}", "request": _request(rng, texts, i, mix)}))
            block.append(b"\n")
            if len(block) >= 20_000:
                data = b"".join(block)
                f.write(data)
                size += len(data)
                block.clear()
        data = b"".join(block)
        f.write(data)
        size += len(data)
    return size


def prefix_file(source: Path, dest: Path, lines: int) -> int:
    """Copy the first ``lines`` lines of ``source`` into ``dest``, streamed; return the byte count."""
    size = 0
    with source.open("rb") as src, dest.open("wb") as out:
        for line in itertools.islice(src, lines):
            out.write(line)
            size += len(line)
    return size


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------

_CHILDREN: list[subprocess.Popen[bytes]] = []
"""Every child process started, so the ``finally`` in ``main`` can always end them."""


class Child:
    """A child process whose stdout/stderr go to a log file; ended by ``stop`` or ``kill_all``."""

    def __init__(self, argv: Sequence[str], log_path: Path, stdout_pipe: bool = False) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log if stdout_pipe else subprocess.STDOUT, cwd=SCRIPT.parent.parent,
        )
        _CHILDREN.append(self.proc)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.proc.pid

    def wait_for_line(self, prefix: str, within: float) -> str:
        """Poll the log file until a line starting with ``prefix`` shows up; return that line."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                raise BenchError(f"process exited with {self.proc.returncode} before it listened; log: {self.log_path}")
            time.sleep(0.05)
        raise BenchError(f"no '{prefix}' line within {within:.0f} s; log: {self.log_path}")

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def kill_all() -> None:
    """SIGKILL every child still running (the last resort in ``main``'s ``finally``)."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


def start_longbatch(data_dir: Path, log_path: Path, config: Path | None) -> tuple[Child, str]:
    """Start ``longbatch.server.main`` on a free loopback port; return it and its target."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "longbatch.server.main", "--host", HOST, "--port", "0",
            "--data-dir", str(data_dir), "--log-level", "WARNING"]
    if config is not None:
        argv += ["--config", str(config)]
    child = Child(argv, log_path)
    line = child.wait_for_line(f"longbatch listening on {HOST}:", 60)
    return child, f"{HOST}:{int(line.rsplit(':', 1)[1])}"


def start_bare(op_file: Path, log_path: Path) -> tuple[Child, str]:
    """Start this script's ``--bare-server`` mode; return it and its target."""
    child = Child([sys.executable, str(SCRIPT), "--bare-server", "--op-file", str(op_file)],
                  log_path)
    line = child.wait_for_line(f"bare listening on {HOST}:", 30)
    return child, f"{HOST}:{int(line.rsplit(':', 1)[1])}"


def proc_status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of /proc/PID/status, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (from /proc/PID/stat), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat", "rb") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used over an interval, in % of one core: the server, this process, reaped children, the rest.

    ``other_pct`` is what other processes on the machine used (the machine is shared: a busy
    neighbour shows up here and explains noisy figures).
    """

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.t0 = time.perf_counter()
        self.machine0 = machine_busy_s()
        self.server0 = proc_cpu_s(server_pid) or 0.0
        self.self0 = time.process_time()
        self.children0 = self._children()

    @staticmethod
    def _children() -> float:
        """CPU seconds of the children this process has reaped (the load workers)."""
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def read(self) -> dict[str, float]:
        """The percentages since construction."""
        wall = max(time.perf_counter() - self.t0, 1e-9)
        machine = machine_busy_s() - self.machine0
        server = (proc_cpu_s(self.server_pid) or self.server0) - self.server0
        own = time.process_time() - self.self0
        children = self._children() - self.children0
        pct = {"server_cpu_pct": server, "bench_cpu_pct": own, "worker_cpu_pct": children,
               "other_cpu_pct": max(0.0, machine - server - own - children), "machine_cpu_pct": machine}
        return {k: round(100 * v / wall, 1) for k, v in pct.items()}


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every 100 ms on a thread, tagging each sample with the current phase."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name=f"rss-{pid}")
        self.pid = pid
        self.phase = "idle"
        self.samples: list[tuple[float, float, str]] = []
        """(seconds since start, RSS in MB, phase)."""
        self.t0 = time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Sample until stopped or until the process is gone (bounded by the process's life)."""
        while True:
            kb = proc_status_kb(self.pid, "VmRSS")
            if kb is None:
                return
            self.samples.append((round(time.monotonic() - self.t0, 3), round(kb * 1024 / MB, 2), self.phase))
            if self._stop_event.wait(RSS_SAMPLE_S):
                return

    def stop(self) -> None:
        """Stop sampling and join the thread."""
        self._stop_event.set()
        self.join(5)

    def by_phase(self) -> dict[str, float]:
        """The largest sampled RSS (MB) in each phase, in phase order."""
        out: dict[str, float] = {}
        for _, mb, phase in self.samples:
            out[phase] = max(out.get(phase, 0.0), mb)
        return out


# ---------------------------------------------------------------------------------------------
# One size: upload, ingest, execute, download, verify
# ---------------------------------------------------------------------------------------------


class Deadline:
    """A time budget shared by every wait of one step."""

    def __init__(self, seconds: float, what: str) -> None:
        self.end = time.monotonic() + seconds
        self.what = what

    def left(self, cap: float | None = None) -> float:
        """Seconds left (at most ``cap``); raises BenchError once the budget is spent."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise BenchError(f"timed out: {self.what}")
        return left if cap is None else min(left, cap)


def unpack_batch(op: operations_pb2.Operation) -> batch_pb2.GenerateContentBatch:
    """The batch carried as an Operation's metadata."""
    batch = batch_pb2.GenerateContentBatch()
    if not op.metadata.Unpack(batch):
        raise BenchError(f"{op.name}: metadata is {op.metadata.type_url}, not a GenerateContentBatch")
    return batch


async def poll(ops: operations_pb2_grpc.OperationsStub, name: str, until: Callable[[operations_pb2.Operation], bool],
               deadline: Deadline) -> tuple[operations_pb2.Operation, float, int]:
    """GetOperation every POLL_S until ``until(op)``; return the op, when it was seen, and the poll count."""
    request = operations_pb2.GetOperationRequest(name=name)
    next_at = time.perf_counter()
    for count in itertools.count(1):
        op = await ops.GetOperation(request, timeout=deadline.left(CALL_TIMEOUT_S))
        seen = time.perf_counter()
        if until(op) or op.done:
            return op, seen, count
        next_at += POLL_S
        await asyncio.sleep(max(0.0, min(next_at - time.perf_counter(), deadline.left())))
    raise AssertionError("unreachable")


async def upload_file(channel: grpc.aio.Channel, path: Path, deadline: Deadline) -> file_pb2.File:
    """CreateFile as a client stream: the File metadata, then 1 MiB chunks read from disk."""

    async def chunks() -> AsyncIterator[file_pb2.CreateFileRequest]:
        yield file_pb2.CreateFileRequest(file=file_pb2.File(display_name=path.name, mime_type="application/jsonl"))
        with path.open("rb") as f:
            while data := f.read(UPLOAD_CHUNK):
                yield file_pb2.CreateFileRequest(data=data)

    stub = file_pb2_grpc.FileServiceStub(channel)
    return await stub.CreateFile(chunks(), timeout=deadline.left())


async def download_file(channel: grpc.aio.Channel, name: str, dest: Path, deadline: Deadline) -> int:
    """DownloadFile streamed to ``dest``; return the byte count."""
    stub = file_pb2_grpc.FileServiceStub(channel)
    size = 0
    with dest.open("wb") as out:
        async for chunk in stub.DownloadFile(file_pb2.DownloadFileRequest(name=name), timeout=deadline.left()):
            out.write(chunk.data)
            size += len(chunk.data)
    return size


def verify_results(path: Path, expected: int) -> dict[str, Any]:
    """Read the responses file line by line: count, keys ``k0..k{N-1}`` in order, error lines."""
    lines = errors = 0
    first_bad: str | None = None
    with path.open("rb") as f:
        for i, line in enumerate(f):
            lines += 1
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                first_bad = first_bad or f"line {i + 1}: not JSON"
                continue
            if row.get("key") != f"k{i}" and first_bad is None:
                first_bad = f"line {i + 1}: key {row.get('key')!r}, expected 'k{i}'"
            if "response" not in row:
                errors += 1
    ok = lines == expected and first_bad is None and errors == 0
    return {"ok": ok, "lines": lines, "expected": expected, "error_lines": errors, "first_bad": first_bad}


def file_batch(file_name: str, display_name: str, model: str = "models/echo") -> batch_pb2.BatchGenerateContentRequest:
    """A create request for a file batch on ``model``."""
    return batch_pb2.BatchGenerateContentRequest(batch=batch_pb2.GenerateContentBatch(
        model=model, display_name=display_name, input_config=batch_pb2.InputConfig(file_name=file_name)))


def size_budget(size: int) -> float:
    """Seconds allowed for one size end to end: 15 min per million lines, at least 2 min."""
    return max(120.0, 900.0 * size / 1_000_000)


@dataclass
class SizeRun:
    """What one size leaves behind besides its figures: the server (kept for the load runs)."""

    figures: dict[str, Any]
    server: Child
    target: str
    sampler: RssSampler
    batch_name: str
    file_name: str
    data_dir: Path
    results_path: Path


async def run_size(size: int, input_path: Path, input_bytes: int, work: Path, config: Path | None) -> SizeRun:
    """Measure one size on a fresh server; the server is returned still running."""
    data_dir = work / f"data-{size}"
    log_path = work / f"server-{size}.log"
    server, target = start_longbatch(data_dir, log_path, config)
    sampler = RssSampler(server.pid)
    sampler.start()
    meter = CpuMeter(server.pid)
    deadline = Deadline(size_budget(size), f"size {size:,} (server log: {log_path})")
    results_path = work / f"results-{size}.jsonl"
    try:
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            await asyncio.wait_for(channel.channel_ready(), deadline.left(30))
            ops = operations_pb2_grpc.OperationsStub(channel)
            batches = batch_pb2_grpc.BatchServiceStub(channel)
            await asyncio.sleep(0.5)  # let the idle RSS settle
            idle_rss_kb = proc_status_kb(server.pid, "VmRSS") or 0

            sampler.phase = "upload"
            t_start = time.perf_counter()
            uploaded = await upload_file(channel, input_path, deadline)
            t_uploaded = time.perf_counter()
            if uploaded.size_bytes != input_bytes:
                raise BenchError(f"uploaded {uploaded.size_bytes} bytes, expected {input_bytes}")

            sampler.phase = "ingest"
            t_create_sent = time.perf_counter()
            created = await batches.BatchGenerateContent(file_batch(uploaded.name, f"bench-{size}"),
                                                         timeout=deadline.left(60))
            t_created = time.perf_counter()
            op, t_left_pending, ingest_polls = await poll(
                ops, created.name, lambda o: unpack_batch(o).state != PENDING, deadline)
            state_after_ingest = unpack_batch(op).state

            sampler.phase = "execute"
            op, t_done, exec_polls = await poll(ops, created.name, lambda o: o.done, deadline)
            batch = unpack_batch(op)
            if batch.state != SUCCEEDED:
                raise BenchError(f"{created.name} ended {batch_pb2.BatchState.Name(batch.state)}: "
                                 f"{op.error.message}; server log: {log_path}")
            output = batch_pb2.GenerateContentBatchOutput()
            op.response.Unpack(output)
            if output.WhichOneof("output") != "responses_file":
                raise BenchError(f"{created.name}: output is {output.WhichOneof('output')}, expected a responses file")

            sampler.phase = "download"
            t_dl_start = time.perf_counter()
            result_bytes = await download_file(channel, output.responses_file, results_path, deadline)
            t_dl_end = time.perf_counter()

            sampler.phase = "verify"
            verify = await asyncio.to_thread(verify_results, results_path, size)
            hwm_kb = proc_status_kb(server.pid, "VmHWM") or 0
            cpu = meter.read()
            sampler.phase = "after"
    except grpc.aio.AioRpcError as e:
        sampler.stop()
        server.stop()
        raise BenchError(f"size {size:,}: {e.code().name}: {e.details()}; server log: {log_path}") from e
    except BaseException:
        sampler.stop()
        server.stop()
        raise

    ingest_s = t_left_pending - t_created
    exec_s = t_done - t_left_pending
    stats = batch.batch_stats
    figures: dict[str, Any] = {
        "size": size,
        "input_bytes": input_bytes,
        "upload_s": round(t_uploaded - t_start, 4),
        "upload_mb_s": round(input_bytes / MB / (t_uploaded - t_start), 2),
        "create_rpc_s": round(t_created - t_create_sent, 4),
        "ingest_s": round(ingest_s, 4),
        "ingest_lines_s": round(size / ingest_s) if ingest_s > 0 else None,
        "ingest_polls": ingest_polls,
        "state_after_ingest": batch_pb2.BatchState.Name(state_after_ingest),
        "exec_s": round(exec_s, 4),
        "exec_req_s": round(size / exec_s) if exec_s > 0 else None,
        "exec_polls": exec_polls,
        "download_s": round(t_dl_end - t_dl_start, 4),
        "download_mb_s": round(result_bytes / MB / (t_dl_end - t_dl_start), 2),
        "result_bytes": result_bytes,
        "e2e_s": round(t_dl_end - t_start, 4),
        "e2e_req_s": round(size / (t_dl_end - t_start)),
        "succeeded": stats.successful_request_count,
        "failed": stats.failed_request_count,
        "verify": verify,
        "rss_idle_mb": round(idle_rss_kb * 1024 / MB, 2),
        "rss_peak_mb": round(hwm_kb * 1024 / MB, 2),
        "rss_by_phase_mb": sampler.by_phase(),
        "cpu": cpu,
        "server_log": str(log_path),
    }
    return SizeRun(figures, server, target, sampler, created.name, uploaded.name, data_dir, results_path)


# ---------------------------------------------------------------------------------------------
# GetOperation load
# ---------------------------------------------------------------------------------------------


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


async def load_worker(target: str, name: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` loops calling GetOperation(name) for ``seconds`` after a warm-up; latency stats."""
    if not target.startswith(f"{HOST}:"):
        raise SystemExit(f"refusing non-loopback target {target}")
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = operations_pb2_grpc.OperationsStub(channel)
        request = operations_pb2.GetOperationRequest(name=name)
        reply_bytes = (await stub.GetOperation(request, timeout=CALL_TIMEOUT_S)).ByteSize()
        start = time.perf_counter() + LOAD_WARMUP_S
        end = start + seconds
        last_finish = start

        async def one_loop() -> None:
            nonlocal last_finish
            while (t := time.perf_counter()) < end:
                try:
                    await stub.GetOperation(request, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    continue
                finally:
                    done = time.perf_counter()
                if t >= start:
                    latencies.append(done - t)
                    last_finish = max(last_finish, done)

        async def cpu_meter() -> float:
            await asyncio.sleep(max(0.0, start - time.perf_counter()))
            cpu0 = time.process_time()
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            return time.process_time() - cpu0

        *_, client_cpu = await asyncio.wait_for(
            asyncio.gather(*(one_loop() for _ in range(concurrency)), cpu_meter()),
            LOAD_WARMUP_S + seconds + CALL_TIMEOUT_S + 5)
    latencies.sort()
    window = max(last_finish - start, 1e-9)
    return {
        "calls": len(latencies),
        "errors": errors,
        "seconds": round(window, 3),
        "req_s": round(len(latencies) / window, 1),
        "p50_ms": round(_percentile(latencies, 50) * 1000, 3),
        "p90_ms": round(_percentile(latencies, 90) * 1000, 3),
        "p99_ms": round(_percentile(latencies, 99) * 1000, 3),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else None,
        "reply_bytes": reply_bytes,
        "concurrency": concurrency,
        "warmup_s": LOAD_WARMUP_S,
        "client_cpu_pct": round(100 * client_cpu / seconds, 1),
    }


async def run_load(target: str, name: str, seconds: float, log_path: Path, server_pid: int) -> dict[str, Any]:
    """Run ``load_worker`` in a separate process (this script, ``--load-worker``) and return its figures.

    Adds CPU use over the worker's whole life (warm-up included, see ``CpuMeter``): the server's,
    the worker's, other processes'.
    """
    child = Child([sys.executable, str(SCRIPT), "--load-worker", "--target", target,
                   "--name", name, "--concurrency", str(CONCURRENCY), "--load-seconds", str(seconds)],
                  log_path, stdout_pipe=True)
    meter = CpuMeter(server_pid)
    try:
        out, _ = await asyncio.to_thread(child.proc.communicate, None, LOAD_WARMUP_S + seconds + 60)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"load worker did not finish; log: {log_path}") from e
    finally:
        child.stop(5)
    cpu = meter.read()
    if child.proc.returncode != 0:
        raise BenchError(f"load worker exited {child.proc.returncode}; log: {log_path}")
    figures: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    figures.update(cpu)
    return figures


async def serve_bare(op_bytes: bytes) -> None:
    """``--bare-server``: a grpc.aio server whose GetOperation returns one static Operation."""
    op = operations_pb2.Operation.FromString(op_bytes)

    class StaticOperations(operations_pb2_grpc.OperationsServicer):
        """Answers every GetOperation with the same Operation."""

        async def GetOperation(self, request: operations_pb2.GetOperationRequest,
                               context: grpc.aio.ServicerContext[Any, Any]) -> operations_pb2.Operation:
            """The static reply."""
            return op

    server = grpc.aio.server()
    operations_pb2_grpc.add_OperationsServicer_to_server(StaticOperations(), server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    print(f"bare listening on {HOST}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


async def probe_small_batches(channel: grpc.aio.Channel, seconds: float) -> dict[str, Any]:
    """Create a small inline batch at priority 1 every PROBE_EVERY_S for ``seconds`` (a bounded
    count), each watched to done concurrently: create RPC latency, and create to done."""
    batches = batch_pb2_grpc.BatchServiceStub(channel)
    ops = operations_pb2_grpc.OperationsStub(channel)
    request = batch_pb2.BatchGenerateContentRequest(batch=batch_pb2.GenerateContentBatch(
        model="models/echo", display_name="bench-probe", priority=1,
        input_config=batch_pb2.InputConfig(requests=batch_pb2.InlinedRequests(requests=[
            batch_pb2.InlinedRequest(request=content_pb2.GenerateContentRequest(contents=[content_pb2.Content(
                role="user", parts=[content_pb2.Part(text=f"probe {i}")])])) for i in range(PROBE_REQUESTS)]))))
    create_ms: list[float] = []
    done_ms: list[float] = []
    errors: list[str] = []

    async def one() -> None:
        t0 = time.perf_counter()
        try:
            op = await batches.BatchGenerateContent(request, timeout=CALL_TIMEOUT_S)
            create_ms.append((time.perf_counter() - t0) * 1000)
            wait = operations_pb2.WaitOperationRequest(name=op.name)
            wait.timeout.FromSeconds(int(CALL_TIMEOUT_S))
            if not (await ops.WaitOperation(wait, timeout=CALL_TIMEOUT_S + 5)).done:
                raise BenchError(f"probe {op.name} not done within {CALL_TIMEOUT_S:g} s")
            done_ms.append((time.perf_counter() - t0) * 1000)
        except (grpc.aio.AioRpcError, BenchError) as e:
            errors.append(f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e))

    tasks = []
    for _ in range(max(1, int(seconds / PROBE_EVERY_S))):
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(PROBE_EVERY_S)
    await asyncio.gather(*tasks)
    create_ms.sort()
    done_ms.sort()
    return {"count": len(tasks), "requests_each": PROBE_REQUESTS, "errors": errors,
            "create_p50_ms": round(_percentile(create_ms, 50), 2) if create_ms else None,
            "create_max_ms": round(create_ms[-1], 2) if create_ms else None,
            "done_p50_ms": round(_percentile(done_ms, 50), 2) if done_ms else None,
            "done_max_ms": round(done_ms[-1], 2) if done_ms else None}


async def load_suite(largest: SizeRun, seconds: float, work: Path) -> dict[str, Any]:
    """(i) idle longbatch, (iii) bare grpc.aio with the same reply, (ii) longbatch while a big batch runs."""
    result: dict[str, Any] = {"concurrency": CONCURRENCY, "seconds": seconds}
    size = largest.figures["size"]
    async with grpc.aio.insecure_channel(largest.target, options=CHANNEL_OPTIONS) as channel:
        ops = operations_pb2_grpc.OperationsStub(channel)
        batches = batch_pb2_grpc.BatchServiceStub(channel)
        done_op = await ops.GetOperation(operations_pb2.GetOperationRequest(name=largest.batch_name),
                                         timeout=CALL_TIMEOUT_S)
        op_file = work / "static-operation.bin"
        op_file.write_bytes(done_op.SerializeToString())
        result["reply_bytes"] = done_op.ByteSize()

        largest.sampler.phase = "load-idle"
        result["longbatch_idle"] = await run_load(largest.target, largest.batch_name, seconds, work / "load-idle.log",
                                              largest.server.pid)

        bare, bare_target = start_bare(op_file, work / "bare-server.log")
        try:
            result["bare"] = await run_load(bare_target, largest.batch_name, seconds, work / "load-bare.log", bare.pid)
        finally:
            bare.stop(5)
        idle, bare_figs = result["longbatch_idle"], result["bare"]
        result["idle_over_bare"] = round(idle["req_s"] / bare_figs["req_s"], 3) if bare_figs["req_s"] else None

        # (ii): a second batch of the largest size from the same uploaded file; load once it runs.
        largest.sampler.phase = "load-busy-ingest"
        deadline = Deadline(size_budget(size), f"busy batch of {size:,} (server log: {largest.server.log_path})")
        created = await batches.BatchGenerateContent(file_batch(largest.file_name, f"bench-busy-{size}"),
                                                     timeout=deadline.left(60))
        op, _, _ = await poll(ops, created.name, lambda o: unpack_batch(o).state != PENDING, deadline)
        before = unpack_batch(op)
        largest.sampler.phase = "load-busy"
        t0 = time.perf_counter()
        probes = asyncio.create_task(probe_small_batches(channel, seconds))
        busy = await run_load(largest.target, created.name, seconds, work / "load-busy.log",
                              largest.server.pid)
        elapsed = time.perf_counter() - t0
        busy["small_batches"] = await probes
        after_op = await ops.GetOperation(operations_pb2.GetOperationRequest(name=created.name),
                                          timeout=CALL_TIMEOUT_S)
        after = unpack_batch(after_op)
        finished_before = before.batch_stats.successful_request_count + before.batch_stats.failed_request_count
        finished_after = after.batch_stats.successful_request_count + after.batch_stats.failed_request_count
        busy["batch_size"] = size
        busy["state_at_load_start"] = batch_pb2.BatchState.Name(before.state)
        busy["running_whole_window"] = before.state == RUNNING and not after_op.done
        busy["batch_progress_during_load"] = finished_after - finished_before
        busy["batch_exec_req_s_under_load"] = round((finished_after - finished_before) / elapsed)
        result["longbatch_busy"] = busy
        largest.sampler.phase = "load-busy-cancel"
        if not after_op.done:
            # Clean-up, not a target, but its latency is worth seeing: CancelOperation on a big
            # running batch, then until GetOperation shows it done.
            cancel: dict[str, Any] = {"batch": created.name}
            t0 = time.perf_counter()
            try:
                await ops.CancelOperation(operations_pb2.CancelOperationRequest(name=created.name),
                                          timeout=CANCEL_TIMEOUT_S)
                cancel["rpc_s"] = round(time.perf_counter() - t0, 3)
                op, seen, _ = await poll(ops, created.name, lambda o: o.done,
                                         Deadline(CANCEL_TIMEOUT_S, f"cancel {created.name}"))
                cancel["done_s"] = round(seen - t0, 3)
                cancel["state"] = batch_pb2.BatchState.Name(unpack_batch(op).state)
            except (grpc.aio.AioRpcError, BenchError) as e:
                cancel["error"] = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
                cancel["after_s"] = round(time.perf_counter() - t0, 3)
            busy["cancel"] = cancel
        largest.sampler.phase = "after"
    result["rss_peak_after_load_mb"] = round((proc_status_kb(largest.server.pid, "VmHWM") or 0) * 1024 / MB, 2)
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """Plain aligned text: left-aligned first column, right-aligned numbers."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = right or [i > 0 for i in range(len(headers))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                    strict=True))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in out)


def _cell(v: object) -> str:
    """One table cell: thousands separators, fewer decimals for bigger numbers, '-' for None."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"
    return str(v)


def evaluate_targets(sizes: list[dict[str, Any]], load: dict[str, Any] | None,
                     failed: bool = False) -> list[dict[str, Any]]:
    """One row per target: what, measured, pass/miss."""
    rows: list[dict[str, Any]] = []

    def add(target: str, measured: object, ok: bool | None, note: str = "") -> None:
        rows.append({"target": target, "measured": measured,
                     "result": "n/a" if ok is None else "pass" if ok else "MISS", "note": note})

    for s in sizes:
        v = s["ingest_lines_s"]
        add(f"ingest >= {TARGET_INGEST:,} lines/s @ {s['size']:,}", v, v is not None and v >= TARGET_INGEST,
            "upper bound: ingest within one poll" if s["ingest_polls"] <= 1 else "")
    biggest = max(sizes, key=lambda s: s["size"])
    add(f"upload->results >= {TARGET_E2E:,} req/s @ {biggest['size']:,}", biggest["e2e_req_s"],
        biggest["e2e_req_s"] >= TARGET_E2E, "" if biggest["size"] >= 1_000_000 else "target is for 1M requests")
    for s in sizes:
        add(f"peak server RSS <= {TARGET_RSS_MB:.0f} MB @ {s['size']:,}", s["rss_peak_mb"],
            s["rss_peak_mb"] <= TARGET_RSS_MB)
    if len(sizes) >= 2:
        smallest = min(sizes, key=lambda s: s["size"])
        ratio = biggest["rss_peak_mb"] / smallest["rss_peak_mb"]
        add(f"RSS flat {smallest['size']:,} -> {biggest['size']:,} (peak ratio <= {TARGET_RSS_FLAT})",
            round(ratio, 3), ratio <= TARGET_RSS_FLAT)
    else:
        add("RSS flat across sizes", None, None, "needs two sizes")
    if load is None:
        add("GetOperation targets", None, None, "load runs failed" if failed else "--skip-load")
        return rows
    ratio = load["idle_over_bare"]
    add(f"GetOperation idle >= {TARGET_GETOP_RATIO} x bare req/s (64 in flight)", ratio,
        ratio is not None and ratio >= TARGET_GETOP_RATIO)
    p99 = load["longbatch_idle"]["p99_ms"]
    add(f"GetOperation idle p99 <= {TARGET_GETOP_P99_MS:.0f} ms", p99, p99 <= TARGET_GETOP_P99_MS)
    busy = load["longbatch_busy"]
    add(f"GetOperation >= {TARGET_BUSY_RPS:,} req/s while {busy['batch_size']:,} batch runs", busy["req_s"],
        busy["req_s"] >= TARGET_BUSY_RPS, "" if busy["running_whole_window"] else "batch did not run the whole window")
    return rows


def render(report: dict[str, Any]) -> str:
    """The plain-text report."""
    env, sizes, load = report["env"], report["sizes"], report.get("load")
    parts = [
        f"longbatch end-to-end benchmark  ({env['cpus']} CPUs, Python {env['python']}, grpcio {env['grpcio']}, "
        f"uvloop {'yes' if env['uvloop'] else 'no'}, model {report['model']}, "
        f"load average at start {env['loadavg_at_start'][0]:.2f})",
        f"input: {report['lines']:,} generated lines ({report['mix']} mix), {report['input_bytes'] / MB:.1f} MB "
        f"({report['input_bytes'] / max(report['lines'], 1):.0f} B/line); fresh server per size",
        f"state polled with GetOperation every {POLL_S * 1000:.0f} ms: ingest and exec times carry "
        f"+{POLL_S * 1000:.0f} ms (+1 RTT) resolution; exec includes writing the responses file",
        "",
        _table(["size", "upload s", "upload MB/s", "ingest s", "ingest lines/s", "exec s", "exec req/s",
                "download s", "e2e s", "e2e req/s", "peak RSS MB", "results"],
               [[s["size"], s["upload_s"], s["upload_mb_s"], s["ingest_s"], s["ingest_lines_s"], s["exec_s"],
                 s["exec_req_s"], s["download_s"], s["e2e_s"], s["e2e_req_s"], s["rss_peak_mb"],
                 "ok" if s["verify"]["ok"] else "BAD"] for s in sizes]),
        "",
        "server RSS in MB: max sampled every 100 ms per phase ('-': phase shorter than a sample), "
        "peak = VmHWM after verify; CPU over the whole size run in % of one core",
    ]
    phases = ["idle", "upload", "ingest", "execute", "download", "verify"]
    parts.append(_table(["size", *phases, "peak", "server CPU%", "bench CPU%", "other CPU%"],
                        [[s["size"], *(s["rss_by_phase_mb"].get(p) for p in phases), s["rss_peak_mb"],
                          s["cpu"]["server_cpu_pct"], s["cpu"]["bench_cpu_pct"], s["cpu"]["other_cpu_pct"]]
                         for s in sizes]))
    if load is not None:
        parts += ["", f"GetOperation, {load['concurrency']} in flight from a separate process, "
                      f"{load['seconds']:g} s each after {LOAD_WARMUP_S:g} s warm-up, reply {load['reply_bytes']} B"]
        busy = load["longbatch_busy"]
        rows = [["longbatch idle (done batch)", load["longbatch_idle"]],
                ["bare grpc.aio, same reply", load["bare"]],
                [f"longbatch, {busy['batch_size']:,} batch running", busy]]
        parts.append(_table(["server", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "calls", "errors",
                             "server CPU%", "client CPU%", "other CPU%"],
                            [[n, f["req_s"], f["p50_ms"], f["p90_ms"], f["p99_ms"], f["max_ms"], f["calls"],
                              sum(f["errors"].values()), f["server_cpu_pct"], f["client_cpu_pct"],
                              f["other_cpu_pct"]]
                             for n, f in rows]))
        parts.append(f"ratio longbatch idle / bare: {load['idle_over_bare']}")
        parts.append(f"busy batch: {busy['state_at_load_start']} at load start, ran the whole window: "
                     f"{'yes' if busy['running_whole_window'] else 'no'}, {busy['batch_progress_during_load']:,} "
                     f"requests finished during the load ({busy['batch_exec_req_s_under_load']:,} req/s)")
        if (small := busy.get("small_batches")) is not None:
            parts.append(f"meanwhile {small['count']} small batches ({small['requests_each']} requests, priority 1): "
                         f"create RPC p50 {small['create_p50_ms']} ms, max {small['create_max_ms']} ms; "
                         f"create to done p50 {small['done_p50_ms']} ms, max {small['done_max_ms']} ms; "
                         f"{len(small['errors'])} errors")
        if (cancel := busy.get("cancel")) is not None:
            parts.append("busy batch clean-up: CancelOperation " + (
                f"failed after {cancel['after_s']} s: {cancel['error']}" if "error" in cancel else
                f"returned in {cancel['rpc_s']} s, {cancel['state']} seen after {cancel['done_s']} s"))
    elif "load_error" in report:
        parts += ["", f"GetOperation load runs FAILED: {report['load_error']}"]
    parts += ["", _table(["target", "measured", "result", "note"],
                         [[t["target"], t["measured"], t["result"], t["note"]] for t in report["targets"]],
                         right=[False, True, False, False])]
    parts.append("")
    parts.append(f"rss picture: {report['rss_png']}")
    return "\n".join(parts)


def draw_rss(sizes: list[dict[str, Any]], timelines: dict[int, list[tuple[float, float, str]]]) -> str:
    """bench/out/rss.png (RSS over time per size) if matplotlib is importable; say what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not importable (not a dependency; install it to get bench/out/rss.png)"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for s in sizes:
        samples = timelines[s["size"]]
        ax.plot([t for t, _, _ in samples], [mb for _, mb, _ in samples], label=f"{s['size']:,} requests")
    ax.axhline(TARGET_RSS_MB, color="red", linestyle="--", linewidth=1, label=f"target {TARGET_RSS_MB:.0f} MB")
    ax.set_xlabel("seconds since server start")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title("longbatch server RSS during an echo file batch (sampled every 100 ms)")
    ax.legend()
    fig.tight_layout()
    path = OUT_DIR / "rss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _downsample(samples: list[tuple[float, float, str]], points: int) -> list[tuple[float, float, str]]:
    """At most ``points`` samples, keeping each stride's largest RSS."""
    if len(samples) <= points:
        return samples
    stride = -(-len(samples) // points)
    return [max(samples[i:i + stride], key=lambda s: s[1]) for i in range(0, len(samples), stride)]


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _env() -> dict[str, Any]:
    """The machine and library versions the figures come from."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        has_uvloop = False
    else:
        has_uvloop = True
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc.__version__,
            "uvloop": has_uvloop, "platform": platform.platform(), "loadavg_at_start": os.getloadavg()}


async def bench(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], bool]:
    """Run everything; return the full report and whether every step succeeded."""
    sizes: list[int] = args.sizes
    master = work / f"input-{args.lines}.jsonl"
    t = time.perf_counter()
    master_bytes = await asyncio.to_thread(generate_input, master, args.lines, 7, args.mix)
    print(f"generated {args.lines:,} lines ({master_bytes / MB:.1f} MB) in {time.perf_counter() - t:.1f} s: "
          f"{master}", file=sys.stderr)
    report: dict[str, Any] = {"env": _env(), "model": "models/echo", "mix": args.mix, "lines": args.lines,
                              "input_bytes": master_bytes, "poll_ms": POLL_S * 1000,
                              "rss_sample_ms": RSS_SAMPLE_S * 1000, "work_dir": str(work), "sizes": []}
    timelines: dict[int, list[tuple[float, float, str]]] = {}
    largest: SizeRun | None = None
    ok = True
    try:
        for size in sorted(sizes):
            path = master if size == args.lines else work / f"input-{size}.jsonl"
            size_bytes = master_bytes if path == master else await asyncio.to_thread(prefix_file, master, path, size)
            print(f"size {size:,}: running ...", file=sys.stderr)
            run = await run_size(size, path, size_bytes, work, args.config)
            f = run.figures
            print(f"size {size:,}: e2e {f['e2e_req_s']:,} req/s, ingest {f['ingest_lines_s']} lines/s, "
                  f"exec {f['exec_req_s']} req/s, peak RSS {f['rss_peak_mb']} MB, verify "
                  f"{'ok' if f['verify']['ok'] else f['verify']}", file=sys.stderr)
            ok = ok and f["verify"]["ok"]
            report["sizes"].append(f)
            if size == max(sizes) and not args.skip_load:
                largest = run  # keep this server for the load runs
            else:
                run.sampler.stop()
                run.server.stop()
                timelines[size] = run.sampler.samples
                if not args.keep:
                    shutil.rmtree(run.data_dir, ignore_errors=True)
                    run.results_path.unlink(missing_ok=True)
        if largest is not None:
            print(f"GetOperation load: 3 runs of {args.load_seconds:g} s ...", file=sys.stderr)
            try:
                report["load"] = await load_suite(largest, args.load_seconds, work)
            except (BenchError, grpc.aio.AioRpcError) as e:
                # Keep the size figures: report the load failure and go on to the report.
                what = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
                report["load_error"] = f"{what} (server log: {largest.server.log_path})"
                print(f"GetOperation load failed: {report['load_error']}", file=sys.stderr)
                ok = False
            finally:
                largest.sampler.stop()
                largest.server.stop()
                timelines[largest.figures["size"]] = largest.sampler.samples
    finally:
        if largest is not None:
            largest.sampler.stop()
            largest.server.stop()
    for s in report["sizes"]:
        s["rss_timeline"] = timelines.get(s["size"], [])
    report["targets"] = evaluate_targets(report["sizes"], report.get("load"), "load_error" in report)
    report["rss_png"] = draw_rss(report["sizes"], timelines)
    return report, ok


def _parse_sizes(text: str) -> list[int]:
    """``100000,1_000_000`` → sorted distinct ints."""
    return sorted({int(x.replace("_", "")) for x in text.split(",") if x.strip()})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags, including the hidden worker modes."""
    p = argparse.ArgumentParser(description="End-to-end file-batch benchmark of a real longbatch server "
                                            "(127.0.0.1 only), plus GetOperation load at 64 in flight.")
    p.add_argument("--lines", type=int, default=1_000_000, help="request lines to generate (default 1,000,000)")
    p.add_argument("--sizes", type=_parse_sizes, default=None,
                   help="comma-separated batch sizes, each <= --lines (default 100000,1000000 capped at --lines)")
    p.add_argument("--load-seconds", type=float, default=10.0, help="seconds per GetOperation load run (default 10)")
    p.add_argument("--json", type=Path, default=None, help="also write the full JSON report here")
    p.add_argument("--skip-load", action="store_true", help="skip the GetOperation load runs")
    p.add_argument("--mix", choices=("plain", "realistic"), default="plain",
                   help="request shapes: plain single-turn text (default), or a realistic mix of single-turn, "
                        "system instruction, multi-turn and generation config")
    p.add_argument("--config", type=Path, default=None, help="server TOML config (default: built-in, models/echo)")
    p.add_argument("--tmp-dir", type=Path, default=None, help="where to make the temp dir (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (inputs, data dirs, logs, results)")
    p.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--op-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=CONCURRENCY, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.load_worker or args.bare_server:
        return args
    if args.lines < 1:
        p.error("--lines must be positive")
    if args.sizes is None:
        args.sizes = [s for s in (100_000, 1_000_000) if s <= args.lines] or [args.lines]
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes must be positive")
    if max(args.sizes) > args.lines:
        p.error(f"--sizes {max(args.sizes):,} is larger than --lines {args.lines:,}")
    if args.load_seconds <= 0 or args.load_seconds > 600:
        p.error("--load-seconds must be in (0, 600]")
    return args


def _run(coro: Any) -> Any:
    """Run a coroutine on uvloop when importable (as the server does), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _raise_on_signal(signum: int, frame: object) -> None:
    """SIGTERM → KeyboardInterrupt, so the ``finally`` clauses end every child process."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 when every step ran and every result file verified (targets may still miss)."""
    args = parse_args(argv)
    if args.load_worker:
        print(json.dumps(_run(load_worker(args.target, args.name, args.concurrency, args.load_seconds))), flush=True)
        return 0
    if args.bare_server:
        _run(serve_bare(args.op_file.read_bytes()))
        return 0

    signal.signal(signal.SIGTERM, _raise_on_signal)
    work = Path(tempfile.mkdtemp(prefix="longbatch-bench-", dir=args.tmp_dir))
    keep = args.keep
    ok = False
    try:
        report, ok = _run(bench(args, work))
    except BenchError as e:
        keep = True
        print(f"\nbench failed: {e}\nwork dir kept: {work}", file=sys.stderr)
        return 1
    except BaseException:
        keep = True
        print(f"\nbench interrupted; work dir kept: {work}", file=sys.stderr)
        raise
    finally:
        kill_all()
        if not keep and ok:
            shutil.rmtree(work, ignore_errors=True)
    if not ok:
        print(f"a results file did not verify or the load runs failed; see the report. work dir kept: {work}",
              file=sys.stderr)

    print(render(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    printed = dict(report, sizes=[dict(s, rss_timeline=_downsample(s["rss_timeline"], 60)) for s in report["sizes"]])
    print()
    print(json.dumps(printed, separators=(",", ":")))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
