"""Crash safety under repeated SIGKILLs (API.md section 8).

A real ``longbatch serve`` process runs one large FILE batch against the
gemini-http backend, which calls ``tests/fakemodel.py`` (a real HTTP server in
its own process, with a small latency per call). The server is SIGKILLed at
random moments, once while the batch is still being ingested (PENDING) and
several times while it runs, and restarted on the same data dir each time.
At the end:

* the batch SUCCEEDED with every request successful;
* the responses file has exactly one line per input line, in input order,
  each with its own key and echoing its own prompt (no loss, no duplicate);
* the fake saw every prompt at least once, and no more extra calls than the
  requests that can have been in flight at the kills (``kills *
  max_concurrency``): finished requests are never run again;
* a clean SIGTERM exits 0 and the database passes ``PRAGMA integrity_check``.

The seed of the random kill moments is printed; set ``LONGBATCH_CRASH_SEED``
to replay a run. The 20-kill version is marked ``slow`` and runs only when
selected (``pytest -m slow tests/test_crash_kills.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from google.longrunning import operations_pb2

from longbatch.v1 import batch_pb2, file_pb2, file_pb2_grpc

from support import ServerProcess, Stubs, assert_db_intact, metadata_of, wait_done

MODEL = "models/remote"
MAX_CONCURRENCY = 64
FAKE_LATENCY_S = 0.001
PENDING = batch_pb2.BatchState.BATCH_STATE_PENDING
RUNNING = batch_pb2.BatchState.BATCH_STATE_RUNNING
SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED



def prompt(i: int) -> str:
    return f"crash prompt {i:07d}"


def input_file(n: int) -> bytes:
    """``n`` JSONL lines ``{"key": "k{i}", "request": …prompt(i)…}``."""
    return b"".join(
        orjson.dumps({"key": f"k{i}", "request": {"contents": [{"parts": [{"text": prompt(i)}]}]}}) + b"\n"
        for i in range(n))


async def upload(stubs: Stubs, data: bytes) -> str:
    """CreateFile in 256 KiB chunks; the file's name."""
    def chunks() -> Iterator[file_pb2.CreateFileRequest]:
        yield file_pb2.CreateFileRequest(file=file_pb2.File(display_name="crash-input.jsonl"))
        for start in range(0, len(data), 256 << 10):
            yield file_pb2.CreateFileRequest(data=data[start:start + (256 << 10)])

    created = await file_pb2_grpc.FileServiceStub(stubs.channel).CreateFile(chunks(), timeout=120)
    return str(created.name)


async def download(stubs: Stubs, name: str) -> bytes:
    stream = file_pb2_grpc.FileServiceStub(stubs.channel).DownloadFile(file_pb2.DownloadFileRequest(name=name),
                                                                       timeout=120)
    return b"".join([chunk.data async for chunk in stream])


def file_batch(file_name: str) -> batch_pb2.BatchGenerateContentRequest:
    return batch_pb2.BatchGenerateContentRequest(batch=batch_pb2.GenerateContentBatch(
        model=MODEL, input_config=batch_pb2.InputConfig(file_name=file_name)))


@dataclass
class FakeProcess:
    """``tests/fakemodel.py`` as a child process."""

    proc: asyncio.subprocess.Process
    url: str

    async def stats(self) -> dict[str, object]:
        async with aiohttp.ClientSession() as session, session.get(
                f"{self.url}/_fake/stats", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            assert resp.status == 200
            data: dict[str, object] = orjson.loads(await resp.read())
            return data


@contextlib.asynccontextmanager
async def fake_model(latency_s: float) -> AsyncIterator[FakeProcess]:
    script = Path(__file__).with_name("fakemodel.py")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "--port", "0", "--latency", str(latency_s), stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("fakemodel listening on 127.0.0.1:"), line
        yield FakeProcess(proc, "http://" + line.split()[-1])
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)


def group_members(pgid: int) -> set[int]:
    """Live (not zombie) processes in process group ``pgid`` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.add(int(entry.name))
    return found


class GroupedServer(ServerProcess):
    """``ServerProcess`` started in a session of its own, so that every process
    it starts (ingest workers, their resource tracker) can be found by process
    group after the server itself is SIGKILLed."""

    async def start(self, within: float = 60.0) -> str:
        args = ["-m", "longbatch.server.main", "--port", "0", "--data-dir", str(self.data_dir),
                "--log-level", "WARNING", *self.extra]
        if self.config:
            args += ["--config", str(self.config)]
        await self.ensure_dead()
        self.proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE,
                                                         start_new_session=True)
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), within)).decode()
        assert line.startswith("longbatch listening on 127.0.0.1:"), line
        self.port = int(line.rsplit(":", 1)[1])
        return f"127.0.0.1:{self.port}"

    async def kill_server(self) -> list[str]:
        """SIGKILL the server process alone (as the OOM killer would) and return
        ``pid cmdline`` of its processes still running 2 s later, which are then
        killed one by one (they would otherwise hold its stdout open for ever)."""
        proc = self.proc
        assert proc is not None
        pgid = proc.pid
        proc.send_signal(signal.SIGKILL)
        # Not proc.wait(): asyncio waits for the stdout pipe to close too, and
        # a surviving child holds it.
        for _ in range(200):
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert proc.returncode == -signal.SIGKILL, proc.returncode
        survivors = group_members(pgid)
        for _ in range(20):
            if not survivors:
                break
            await asyncio.sleep(0.1)
            survivors = group_members(pgid)
        described = []
        for pid in sorted(survivors):
            with contextlib.suppress(OSError):
                cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                described.append(f"{pid} {cmdline.strip()}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        return described

    async def ensure_dead(self) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                await self.kill_server()
            else:
                for pid in group_members(self.proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


@dataclass
class Report:
    """What a run did, printed at the end."""

    n: int
    seed: int
    kills_pending: int = 0
    kills_running: int = 0
    kill_progress: list[int] = field(default_factory=list)
    restart_s: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    extra_calls: int = 0
    reruns: list[int] = field(default_factory=list)
    """Indexes of the requests the model saw more than once."""
    orphans: list[str] = field(default_factory=list)
    """``pid cmdline`` of processes that outlived a SIGKILLed server."""

    @property
    def kills(self) -> int:
        return self.kills_pending + self.kills_running


class Harness:
    """A server process on one data dir, killed and restarted at will."""

    def __init__(self, proc: GroupedServer, report: Report) -> None:
        self.proc = proc
        self.report = report
        self.stubs: Stubs | None = None

    async def start(self) -> Stubs:
        t0 = time.monotonic()
        self.stubs = Stubs.connect(await self.proc.start(within=60))
        self.report.restart_s.append(time.monotonic() - t0)
        return self.stubs

    async def kill(self) -> None:
        assert self.stubs is not None and self.proc.proc is not None
        await self.stubs.channel.close()
        self.stubs = None
        # Whatever the server started (ingest workers) must not outlive it.
        self.report.orphans.extend(await self.proc.kill_server())

    async def get(self, name: str) -> batch_pb2.GenerateContentBatch:
        assert self.stubs is not None
        op = await self.stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=30)
        meta = metadata_of(op)
        assert isinstance(meta, batch_pb2.GenerateContentBatch)
        return meta


async def crash_run(tmp_path: Path, n: int, running_kills: int, within: float) -> Report:
    """The whole scenario; returns the figures. Every loop is bounded by ``within`` seconds."""
    seed = int(os.environ.get("LONGBATCH_CRASH_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    report = Report(n=n, seed=seed)
    print(f"\ncrash run: n={n} running_kills={running_kills} seed={seed}", flush=True)
    t_start = time.monotonic()
    deadline = t_start + within

    def left() -> float:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"scenario not over within {within}s ({report})"
        return remaining

    data_dir = tmp_path / "data"
    async with fake_model(FAKE_LATENCY_S) as fake:
        config = tmp_path / "longbatch.toml"
        config.write_text(
            f'[[models]]\nname = "{MODEL}"\nbackend = "gemini-http"\nmax_concurrency = {MAX_CONCURRENCY}\n'
            f'base_url = "{fake.url}"\n\n[server]\ngrace_period = "5s"\n')
        proc = GroupedServer(data_dir, config=config)
        h = Harness(proc, report)
        try:
            stubs = await h.start()
            body = input_file(n)
            t0 = time.monotonic()
            file_name = await upload(stubs, body)
            report.timings["upload"] = time.monotonic() - t0
            t_created = time.monotonic()
            name = (await stubs.batches.BatchGenerateContent(file_batch(file_name), timeout=30)).name

            # One kill during ingest, if the batch is still PENDING a random moment after create.
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            if (await h.get(name)).state == PENDING:
                await h.kill()
                # Nothing runs before the whole file is validated, so a fake that
                # saw no call proves the kill landed during ingest (not in the
                # few milliseconds between that Get and the kill).
                if (await fake.stats())["total"] == 0:
                    report.kills_pending += 1
                else:
                    report.kills_running += 1
                await h.start()

            # Kills while RUNNING, at random progress points plus a random delay.
            marks = sorted(int(rng.uniform(0.03, 0.9) * n) for _ in range(running_kills))
            done_before = 0
            for mark in marks:
                while True:
                    meta = await h.get(name)
                    assert meta.state in (PENDING, RUNNING), f"batch ended before kill {report.kills + 1}: {meta}"
                    if meta.state == RUNNING and "ingest" not in report.timings:
                        report.timings["ingest"] = time.monotonic() - t_created
                    if meta.state == RUNNING and meta.batch_stats.successful_request_count >= mark:
                        break
                    await asyncio.sleep(min(0.05, left()))
                await asyncio.sleep(rng.uniform(0.0, 0.2))
                meta = await h.get(name)
                assert meta.state == RUNNING, f"batch not RUNNING at kill {report.kills + 1}: {meta.state}"
                done_before = meta.batch_stats.successful_request_count
                await h.kill()
                report.kills_running += 1
                report.kill_progress.append(done_before)
                await h.start()
                # Nothing that was persisted (and counted) before the kill is lost.
                after = (await h.get(name)).batch_stats.successful_request_count
                assert after >= done_before, f"restart lost results: {after} < {done_before}"
                left()

            assert h.stubs is not None
            op = await wait_done(h.stubs, name, within=left())
            report.timings["batch"] = time.monotonic() - t_created
            meta = metadata_of(op)
            assert meta.state == SUCCEEDED, op
            stats = meta.batch_stats
            assert (stats.request_count, stats.successful_request_count, stats.failed_request_count,
                    stats.pending_request_count) == (n, n, 0, 0)
            output = batch_pb2.GenerateContentBatchOutput()
            assert op.response.Unpack(output)
            assert output.WhichOneof("output") == "responses_file"

            t0 = time.monotonic()
            lines = (await download(h.stubs, output.responses_file)).splitlines()
            assert len(lines) == n, f"{len(lines)} response lines for {n} input lines"
            for i, raw in enumerate(lines):
                row = orjson.loads(raw)
                assert row.get("key") == f"k{i}", (i, row)
                assert "error" not in row, (i, row)
                assert row["response"]["candidates"][0]["content"]["parts"][0]["text"] == prompt(i), (i, row)
            report.timings["verify"] = time.monotonic() - t0

            calls = (await fake.stats())["calls"]
            assert isinstance(calls, dict)
            missing = [i for i in range(n) if calls.get(prompt(i), 0) < 1]
            assert not missing, f"{len(missing)} prompts never reached the model, e.g. {missing[:5]}"
            assert len(calls) == n, f"the fake saw {len(calls) - n} prompts that are not in the input"
            report.extra_calls = sum(calls.values()) - n
            report.reruns = [i for i in range(n) if calls[prompt(i)] > 1]

            await h.stubs.channel.close()
            assert await proc.terminate() == 0
        finally:
            await proc.ensure_dead()
    assert_db_intact(data_dir)
    report.timings["total"] = time.monotonic() - t_start
    print(f"crash run: {report.kills} kills ({report.kills_pending} during ingest, {report.kills_running} running, "
          f"at {report.kill_progress} done); restarts "
          f"{[round(s, 2) for s in report.restart_s]} s; left running by the kills: {report.orphans}", flush=True)
    print(f"crash run: extra backend calls {report.extra_calls} over {len(report.reruns)} requests "
          f"(bound {report.kills * MAX_CONCURRENCY}), re-run index ranges {runs_of(report.reruns)}", flush=True)
    print(f"crash run: timings { {k: round(v, 1) for k, v in report.timings.items()} } s", flush=True)
    # Checked last, so that these are reported after the batch itself proved correct.
    broken = []
    if report.extra_calls > report.kills * MAX_CONCURRENCY:
        broken.append(
            f"{report.extra_calls} extra backend calls ({len(report.reruns)} requests) after {report.kills} kills: "
            f"more than could have been in flight ({MAX_CONCURRENCY} per kill), so finished requests ran again; "
            f"re-run index ranges {runs_of(report.reruns)}, progress at the kills {report.kill_progress}")
    if report.orphans:
        broken.append(f"{len(report.orphans)} processes started by a SIGKILLed server were still running 2 s after "
                      f"it died: {report.orphans}")
    assert not broken, "\n".join(broken)
    assert report.kills_running >= running_kills
    return report


def runs_of(indexes: list[int]) -> list[tuple[int, int, int]]:
    """Sorted indexes as (first, last, count) runs, allowing gaps under 100."""
    runs: list[tuple[int, int, int]] = []
    for i in indexes:
        if runs and i - runs[-1][1] < 100:
            first, _, count = runs[-1]
            runs[-1] = (first, i, count + 1)
        else:
            runs.append((i, i, 1))
    return runs


# The issue asks for 200,000 requests; on a 2-core machine that takes longer
# than the default suite can afford, so the default run uses N_DEFAULT and the
# slow run the full size.
N_DEFAULT = int(os.environ.get("LONGBATCH_CRASH_N", "200000"))
N_FULL = 200_000


DEFAULT_WITHIN_S = 60 + N_DEFAULT // 500  # 460 s for 200,000; about 100 s are needed on 2 cores


@pytest.mark.timeout(DEFAULT_WITHIN_S + 30)
async def test_random_sigkills_during_a_file_batch_lose_and_repeat_nothing(tmp_path: Path) -> None:
    await crash_run(tmp_path, N_DEFAULT, running_kills=4, within=DEFAULT_WITHIN_S)


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_twenty_sigkills_during_a_200k_file_batch(tmp_path: Path) -> None:
    await crash_run(tmp_path, N_FULL, running_kills=20, within=1150)
