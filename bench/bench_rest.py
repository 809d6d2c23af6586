"""The REST API under load, and big files through it, measured against references in the same run.

Usage::

    python bench/bench_rest.py                     # GET load (3 rounds of 5 s each side) and a 1 GiB file
    python bench/bench_rest.py --seconds 3 --rounds 2 --file-mib 256    # quicker
    python bench/bench_rest.py --skip-file         # only the GET load

What it does (127.0.0.1 only; every wait is bounded; every child process is ended in a ``finally``):

1. **GET load.** Starts ``longbatch serve`` (HTTP on a free port), creates a one-request batch over
   REST and waits until it is done, then saves the exact JSON the server answers for
   ``GET /v1beta/batches/{id}``. Starts a bare aiohttp.web server (uvloop, as ``serve`` uses)
   answering that same body as a static response. Then, alternately, ``wrk`` (one thread, 64
   connections: 64 requests in flight) against the bare server and against longbatch, ``--rounds``
   times each, ``--seconds`` per run after a 1 s warm-up; the servers pinned to one core and the load
   to the other when ``taskset`` is there. Without ``wrk`` on the PATH, a Python
   aiohttp load generator in its own process does the same (slower: it may cap both sides, say so).
   Prints req/s and latency per run, the median of each side, and the median of each round's ratio
   (longbatch over the bare run just before it; target ≥ 0.8).
2. **A big file through the google-genai SDK.** A fresh server; ``--file-mib`` MiB written to disk;
   ``client.files.upload`` (the resumable protocol, 8 MiB chunks), then ``client.files.download``
   to disk, compared by SHA-256. The server's RSS (the main process; VmRSS every 100 ms) before,
   and its peak during each transfer: growth target < 50 MB.

Exit status 0 when everything ran (targets met or not: the table says), 1 on a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench_e2e import HOST, BenchError, Child, Deadline, RssSampler, kill_all

SCRIPT = Path(__file__).resolve()
CONNECTIONS = 64
MiB = 1 << 20


def _start_longbatch(work: Path, name: str) -> tuple[Child, str]:
    data = work / name
    data.mkdir(parents=True, exist_ok=True)
    child = Child([*_pinned(0), sys.executable, "-m", "longbatch.server.main", "--host", HOST, "--port", "0",
                   "--http-port", "0", "--data-dir", str(data), "--log-level", "WARNING"], work / f"{name}.log")
    line = child.wait_for_line(f"longbatch http listening on http://{HOST}:", 60)
    return child, f"http://{HOST}:{int(line.rsplit(':', 1)[1])}"


def _http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return bytes(r.read())


def _done_batch(base: str) -> tuple[str, bytes]:
    """Create a one-request batch, wait until done; its name and the body GET answers."""
    op = json.loads(_http("POST", f"{base}/v1beta/models/echo:batchGenerateContent", {"batch": {"inputConfig": {
        "requests": {"requests": [{"request": {"contents": [{"parts": [{"text": "hello"}]}]}}]}}}}))
    deadline = Deadline(30, "the probe batch to finish")
    while True:
        body = _http("GET", f"{base}/v1beta/{op['name']}")
        if json.loads(body).get("done"):
            return op["name"], body
        time.sleep(min(0.05, deadline.left()))


# -- load generators -----------------------------------------------------------------------


def _pinned(cpu: int) -> list[str]:
    """``taskset -c CPU`` where it helps: servers on one core, the load on the other, so neither
    steals the other's core (a 2-core machine); nothing where taskset or a second core is missing."""
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return []
    return ["taskset", "-c", str(cpu)]


def _wrk(url: str, seconds: float) -> dict[str, float]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    out = subprocess.run([*_pinned(1), wrk, "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--latency", url],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if rate is None:
        raise BenchError(f"wrk printed no rate:\n{out}")
    if errors is not None:
        raise BenchError(f"{errors.group(1)} error answers from {url}:\n{out}")
    return {"rps": float(rate.group(1)), "p50_ms": _wrk_ms(out, "50%"), "p99_ms": _wrk_ms(out, "99%")}


def _wrk_ms(out: str, label: str) -> float:
    found = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if found is None:
        return float("nan")
    value, unit = float(found.group(1)), found.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def _python_load(url: str, seconds: float) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(SCRIPT), "--load-worker", url, "--seconds", str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


async def _load_worker(url: str, seconds: float) -> None:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            async with session.get(url) as r:
                await r.read()
                errors += r.status != 200
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(CONNECTIONS)))
    latencies.sort()
    print(json.dumps({"rps": len(latencies) / seconds, "p50_ms": latencies[len(latencies) // 2] * 1000,
                      "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000, "errors": errors}))


def _serve_bare(body_file: Path) -> None:
    import uvloop
    from aiohttp import web

    body = body_file.read_bytes()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1beta/batches/{id}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        print(f"bare listening on {HOST}:{runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def get_load(work: Path, seconds: float, rounds: int) -> dict[str, Any]:
    """Part 1: GET /v1beta/batches/{id} at 64 in flight, longbatch against a bare aiohttp server."""
    server, base = _start_longbatch(work, "load")
    bare = None
    try:
        name, body = _done_batch(base)
        body_file = work / "operation.json"
        body_file.write_bytes(body)
        bare = Child([*_pinned(0), sys.executable, str(SCRIPT), "--bare-server", str(body_file)], work / "bare.log")
        line = bare.wait_for_line(f"bare listening on {HOST}:", 30)
        bare_url = f"http://{HOST}:{int(line.rsplit(':', 1)[1])}/v1beta/{name}"
        ours_url = f"{base}/v1beta/{name}"
        tool = "wrk" if shutil.which("wrk") else "python-aiohttp"
        run = _wrk if tool == "wrk" else _python_load
        print(f"GET load with {tool}: {CONNECTIONS} in flight, {rounds} x {seconds:g} s each side, "
              f"body {len(body)} bytes", flush=True)
        runs: dict[str, list[dict[str, float]]] = {"bare": [], "longbatch": []}
        for i in range(rounds):
            for side, url in (("bare", bare_url), ("longbatch", ours_url)):
                run(url, 1.0)  # warm-up
                figures = run(url, seconds)
                runs[side].append(figures)
                print(f"  round {i + 1} {side:9s} {figures['rps']:9.0f} req/s  p50 {figures['p50_ms']:.2f} ms  "
                      f"p99 {figures['p99_ms']:.2f} ms", flush=True)
        medians = {side: statistics.median(r["rps"] for r in rs) for side, rs in runs.items()}
        # Each longbatch run against the bare run just before it: the machine's speed drifts
        # (a shared host), and neighbours in time see the same drift.
        ratios = [ours["rps"] / bare["rps"] for bare, ours in zip(runs["bare"], runs["longbatch"], strict=True)]
        return {"tool": tool, "body_bytes": len(body), "runs": runs, "median_rps": medians,
                "round_ratios": ratios, "ratio": statistics.median(ratios)}
    finally:
        if bare is not None:
            bare.stop()
        server.stop()


def big_file(work: Path, mib: int) -> dict[str, Any]:
    """Part 2: ``mib`` MiB up and down through the google-genai SDK, with the server's RSS."""
    from google import genai
    from google.genai import types

    source = work / "big.jsonl"
    block = (b'{"key":"k","request":{"contents":[{"parts":[{"text":"' + b"x" * 200 + b'"}]}]}}\n')
    block = block * (MiB // len(block) + 1)
    digest = hashlib.sha256()
    with source.open("wb") as f:
        for _ in range(mib):
            f.write(block[:MiB])
            digest.update(block[:MiB])
    expected = digest.hexdigest()
    server, base = _start_longbatch(work, "files")
    sampler = RssSampler(server.pid)
    try:
        client = genai.Client(api_key="bench", http_options=types.HttpOptions(base_url=base, timeout=600_000))
        client.models.list()  # one round trip first: RSS of a server that has answered
        sampler.start()
        time.sleep(0.5)
        sampler.phase = "upload"
        t0 = time.monotonic()
        uploaded = client.files.upload(file=str(source), config={"mime_type": "application/jsonl"})
        upload_s = time.monotonic() - t0
        print(f"  uploaded {mib} MiB in {upload_s:.1f} s ({mib / upload_s:.0f} MiB/s)", flush=True)
        sampler.phase = "download"
        dest = work / "big.download"
        t0 = time.monotonic()
        assert uploaded.name is not None
        client.files.download(file=uploaded.name, destination=str(dest))
        download_s = time.monotonic() - t0
        print(f"  downloaded {mib} MiB in {download_s:.1f} s ({mib / download_s:.0f} MiB/s)", flush=True)
        sampler.phase = "after"
        time.sleep(0.3)
    finally:
        sampler.stop()
        server.stop()
    got = hashlib.sha256()
    with dest.open("rb") as f:
        while chunk := f.read(MiB):
            got.update(chunk)
    if got.hexdigest() != expected or uploaded.size_bytes != mib * MiB:
        raise BenchError("the downloaded file differs from the uploaded one")
    phases = sampler.by_phase()
    before = min(mb for _, mb, phase in sampler.samples if phase == "idle")
    peak = max(phases.get("upload", 0.0), phases.get("download", 0.0))
    return {"mib": mib, "upload_s": upload_s, "download_s": download_s, "rss_before_mb": before,
            "rss_peak_upload_mb": phases.get("upload"), "rss_peak_download_mb": phases.get("download"),
            "rss_growth_mb": peak - before, "sha256_match": True, "picture": _draw(sampler.samples, mib, before)}


def _draw(samples: list[tuple[float, float, str]], mib: int, before: float) -> str:
    """bench/out/rest_file_rss.png, the server's RSS through the upload and the download, if
    matplotlib is importable (not a dependency); say what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not importable"
    out = SCRIPT.parent / "out"
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4))
    for phase, colour in (("idle", "grey"), ("upload", "tab:blue"), ("download", "tab:green"), ("after", "grey")):
        points = [(t, mb) for t, mb, p in samples if p == phase]
        if points:
            ax.plot([t for t, _ in points], [mb for _, mb in points], color=colour, label=phase)
    ax.axhline(before + 50, color="red", linestyle="--", linewidth=1, label="target: +50 MB")
    ax.set_ylim(0, max(before + 80, max(mb for _, mb, _ in samples) + 20))
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title(f"longbatch server RSS: {mib} MiB uploaded, then downloaded, through the google-genai SDK")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = out / "rest_file_rss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each load run (default 3)")
    parser.add_argument("--rounds", type=int, default=7, help="load runs per side, alternating (default 7)")
    parser.add_argument("--file-mib", type=int, default=1024, help="size of the big file (default 1024 MiB)")
    parser.add_argument("--skip-file", action="store_true", help="only the GET load")
    parser.add_argument("--skip-load", action="store_true", help="only the big file")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--bare-server", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--load-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server is not None:
        _serve_bare(args.bare_server)
        return 0
    if args.load_worker is not None:
        asyncio.run(_load_worker(args.load_worker, args.seconds))
        return 0
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        work = Path(tmp)
        try:
            if not args.skip_load:
                report["get_load"] = get_load(work, args.seconds, args.rounds)
            if not args.skip_file:
                print(f"big file: {args.file_mib} MiB through the google-genai SDK", flush=True)
                report["big_file"] = big_file(work, args.file_mib)
        except (BenchError, subprocess.SubprocessError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            kill_all()
    print()
    print("| figure | measured | target |")
    print("| --- | --- | --- |")
    if "get_load" in report:
        load = report["get_load"]
        print(f"| GET /v1beta/batches/ID, 64 in flight ({load['tool']}) | "
              f"{load['median_rps']['longbatch']:.0f} req/s vs bare aiohttp {load['median_rps']['bare']:.0f}; "
              f"median of the round ratios **{load['ratio']:.2f}** "
              f"({min(load['round_ratios']):.2f}-{max(load['round_ratios']):.2f}) | "
              f"≥ 0.8 {'met' if load['ratio'] >= 0.8 else 'MISSED'} |")
    if "big_file" in report:
        big = report["big_file"]
        print(f"| {big['mib']} MiB up + down through the SDK | RSS {big['rss_before_mb']:.0f} MB before, peak "
              f"+{big['rss_growth_mb']:.1f} MB (up {big['upload_s']:.1f} s, down {big['download_s']:.1f} s) | "
              f"< 50 MB {'met' if big['rss_growth_mb'] < 50 else 'MISSED'} |")
        print(f"RSS picture: {big['picture']}")
    print(json.dumps(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
