"""Load soak: 64 concurrent clients against one real server process (API.md sections 4 and 8).

Each client (an asyncio task with its own grpc.aio channel) loops for a bounded
time: it creates small inline batches on ``models/echo`` and
``models/echo-slow``, polls them with GetOperation, waits on them with short
WaitOperation timeouts, lists with filters, cancels some and deletes done
ones. Every RPC outcome is counted. Asserted:

* no RPC fails except with the code the contract gives for that situation:
  ``FAILED_PRECONDITION`` for deleting a batch not seen done (including one
  just cancelled: cancel is best effort, and a batch still pending or running
  cannot be deleted), ``NOT_FOUND`` for reading a batch this client deleted;
  every error carries its ``ErrorInfo``; no message mentions "database is
  locked";
* every operation seen is coherent: stats add up to the request count, done
  if and only if terminal, exactly one of ``error`` and ``response`` when done,
  SUCCEEDED outputs hold every answer in order, a done operation never
  changes afterwards, progress never goes back;
* list filters hold for every batch returned, and a client's own
  ``display_name`` filter returns exactly its batches not deleted;
* in the end every batch is done (or was deleted), a full listing holds each
  remaining batch exactly once, the server stops cleanly on SIGTERM, logged no
  traceback, and the database passes ``PRAGMA integrity_check``.

Figures (RPCs served, RPC outcome counts, GetOperation p50/p99) are printed;
``pytest -s`` shows them. The 60 s version is marked ``slow`` and runs only
when selected (``pytest -m slow tests/test_soak.py``).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.longrunning import operations_pb2

from longbatch.v1 import batch_pb2

from support import ServerProcess, Stubs, assert_db_intact, details, gen_request, metadata_of

CLIENTS = 64
MAX_OPEN_PER_CLIENT = 4
RPC_TIMEOUT_S = 15.0
SLOW_MODEL = "models/echo-slow"
FAST_MODEL = "models/echo"
OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
S = batch_pb2.BatchState
PENDING, RUNNING, SUCCEEDED, CANCELLED = (S.BATCH_STATE_PENDING, S.BATCH_STATE_RUNNING, S.BATCH_STATE_SUCCEEDED,
                                          S.BATCH_STATE_CANCELLED)



class LoggedServer(ServerProcess):
    """``ServerProcess`` with its stderr (the server's log) kept in a file."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        super().__init__(data_dir)
        self.log_path = log_path

    async def start(self, within: float = 60.0) -> str:
        args = ["-m", "longbatch.server.main", "--port", "0", "--data-dir", str(self.data_dir),
                "--log-level", "WARNING", *self.extra]
        await self.ensure_dead()
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE,
                                                             stderr=log)
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), within)).decode()
        assert line.startswith("longbatch listening on 127.0.0.1:"), line
        self.port = int(line.rsplit(":", 1)[1])
        return f"127.0.0.1:{self.port}"


@dataclass
class Tracked:
    """A batch one client created, and what that client has seen of it."""

    name: str
    n: int
    model: str
    prompts: list[str]
    display_name: str
    priority: int
    progress: int = 0
    """Finished requests last seen (never goes back)."""
    final: tuple[Any, ...] | None = None
    """The done operation's state and stats, once seen (never changes after)."""
    deleted: bool = False
    cancelled: bool = False


@dataclass
class Tally:
    """Every RPC outcome and every broken promise, over all clients."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """The first 1000 broken promises (``problem_count`` has them all)."""
    problem_count: int = 0
    locked: list[str] = field(default_factory=list)
    get_latency_s: list[float] = field(default_factory=list)
    created: int = 0
    requests: int = 0
    cancel_then_delete_refused: int = 0

    @property
    def rpcs(self) -> int:
        return sum(self.outcomes.values())

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < 1000:
            self.problems.append(text)


def stats_tuple(meta: batch_pb2.GenerateContentBatch) -> tuple[int, ...]:
    s = meta.batch_stats
    return (s.request_count, s.successful_request_count, s.failed_request_count, s.cancelled_request_count,
            s.expired_request_count, s.pending_request_count)


def observe(tally: Tally, b: Tracked, op: operations_pb2.Operation, where: str, with_output: bool) -> None:
    """Check one view of ``b`` against the contract and what was seen before."""
    meta = metadata_of(op)
    assert isinstance(meta, batch_pb2.GenerateContentBatch)
    say = f"{where} {b.name}"
    if op.name != b.name or meta.name != b.name or meta.model != b.model:
        tally.problem(f"{say}: names {op.name!r}/{meta.name!r}, model {meta.model!r}")
    count, ok, failed, cancelled, expired, pending = stats_tuple(meta)
    if count != b.n or ok + failed + cancelled + expired + pending != b.n:
        tally.problem(f"{say}: stats {stats_tuple(meta)} do not add up to {b.n}")
    finished = ok + failed
    if finished < b.progress:
        tally.problem(f"{say}: progress went back from {b.progress} to {finished}")
    b.progress = max(b.progress, finished)
    result = op.WhichOneof("result")
    if not op.done:
        if meta.state not in (PENDING, RUNNING) or result is not None:
            tally.problem(f"{say}: not done but state {S.Name(meta.state)}, result {result}")
        if b.final is not None:
            tally.problem(f"{say}: done operation became not done again")
        return
    snapshot = (meta.state, stats_tuple(meta), meta.end_time.ToNanoseconds(), result,
                op.error.code if result == "error" else None)
    if b.final is None:
        b.final = snapshot
    elif snapshot != b.final:
        tally.problem(f"{say}: done operation changed from {b.final} to {snapshot}")
    if meta.state == SUCCEEDED:
        if result != "response" or pending or cancelled or expired or ok + failed != b.n:
            tally.problem(f"{say}: SUCCEEDED with result {result} and stats {stats_tuple(meta)}")
        elif with_output:
            output = batch_pb2.GenerateContentBatchOutput()
            op.response.Unpack(output)
            entries = output.inlined_responses.inlined_responses
            texts = [e.response.candidates[0].content.parts[0].text if e.HasField("response") else None
                     for e in entries]
            if texts != b.prompts or [e.metadata["i"] for e in entries] != list(range(b.n)):
                tally.problem(f"{say}: SUCCEEDED output {texts[:3]}… is not the {b.n} prompts in order")
    elif meta.state == CANCELLED:
        if result != "error" or op.error.code != 1 or pending:
            tally.problem(f"{say}: CANCELLED with result {result}, error code {op.error.code}, pending {pending}")
        if not b.cancelled:
            tally.problem(f"{say}: CANCELLED though nobody cancelled it")
    else:
        tally.problem(f"{say}: done with state {S.Name(meta.state)}")


FILTERS: list[tuple[str, Any]] = [
    ("done = false", lambda op, m: not op.done),
    ("done = true", lambda op, m: op.done),
    (f'model = "{SLOW_MODEL}"', lambda op, m: m.model == SLOW_MODEL),
    ("model = echo", lambda op, m: m.model == FAST_MODEL),
    ("state = BATCH_STATE_CANCELLED", lambda op, m: m.state == CANCELLED),
    ("state = BATCH_STATE_RUNNING OR state = BATCH_STATE_PENDING", lambda op, m: m.state in (PENDING, RUNNING)),
    ("state = SUCCEEDED AND priority >= 2", lambda op, m: m.state == SUCCEEDED and m.priority >= 2),
    ("NOT done = true AND model = echo-slow", lambda op, m: not op.done and m.model == SLOW_MODEL),
]


class Client:
    """One simulated user with its own channel."""

    def __init__(self, cid: int, target: str, tally: Tally, seed: int) -> None:
        self.cid = cid
        self.stubs = Stubs.connect(target)
        self.tally = tally
        self.rng = random.Random(seed * 1000 + cid)
        self.mine: list[Tracked] = []
        self.display_name = f"soak-{cid:02d}"
        self.serial = 0

    async def call(self, rpc: str, fn: Any, request: Any,
                   allowed: tuple[grpc.StatusCode, ...] = ()) -> tuple[Any, grpc.StatusCode]:
        """One RPC: count its outcome, flag codes not in ``allowed``."""
        t0 = time.perf_counter()
        try:
            result = await fn(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            code, message = e.code(), e.details() or ""
            if "database is locked" in message.lower():
                self.tally.locked.append(f"{rpc}: {code.name}: {message}")
            if code not in allowed:
                self.tally.unexpected.append(f"{rpc}: {code.name}: {message}")
            else:
                try:
                    details(e)  # status details with an ErrorInfo in domain longbatch.dev
                except AssertionError as bad:
                    self.tally.problem(f"{rpc}: {code.name} without proper details: {bad}")
            self.tally.outcomes[(rpc, code.name)] += 1
            return e, code
        if rpc == "GetOperation":
            self.tally.get_latency_s.append(time.perf_counter() - t0)
        self.tally.outcomes[(rpc, "OK")] += 1
        return result, OK

    # -- actions -------------------------------------------------------------------

    async def create(self) -> None:
        slow = self.rng.random() < 0.25
        model = SLOW_MODEL if slow else FAST_MODEL
        n = self.rng.randint(1, 4) if slow else self.rng.randint(1, 20)
        self.serial += 1
        prompts = [f"soak {self.cid} {self.serial} {i}" for i in range(n)]
        requests = []
        for i, text in enumerate(prompts):
            item = batch_pb2.InlinedRequest(request=gen_request(text))
            item.metadata["i"] = i
            requests.append(item)
        priority = self.rng.randint(0, 3)
        request = batch_pb2.BatchGenerateContentRequest(batch=batch_pb2.GenerateContentBatch(
            model=model, display_name=self.display_name, priority=priority,
            input_config=batch_pb2.InputConfig(requests=batch_pb2.InlinedRequests(requests=requests))))
        op, code = await self.call("BatchGenerateContent", self.stubs.batches.BatchGenerateContent, request)
        if code is not OK:
            return
        b = Tracked(op.name, n, model, prompts, self.display_name, priority)
        self.mine.append(b)
        self.tally.created += 1
        self.tally.requests += n
        meta = metadata_of(op)
        if op.done or meta.state != PENDING:
            self.tally.problem(f"create {op.name}: done={op.done} state={S.Name(meta.state)}, not PENDING")
        observe(self.tally, b, op, "create", with_output=False)

    async def get(self, b: Tracked) -> None:
        op, code = await self.call("GetOperation", self.stubs.ops.GetOperation,
                                   operations_pb2.GetOperationRequest(name=b.name), (NOT_FOUND,) if b.deleted else ())
        if code is OK:
            if b.deleted:
                self.tally.problem(f"get {b.name}: a deleted batch is still there")
            else:
                observe(self.tally, b, op, "get", with_output=True)

    async def wait(self, b: Tracked) -> None:
        timeout_s = self.rng.choice((0.0, 0.05, 0.2, 0.5))
        request = operations_pb2.WaitOperationRequest(name=b.name)
        request.timeout.FromNanoseconds(int(timeout_s * 1e9))
        t0 = time.monotonic()
        op, code = await self.call("WaitOperation", self.stubs.ops.WaitOperation, request)
        if code is OK:
            took = time.monotonic() - t0
            if not op.done and took < timeout_s * 0.9:
                self.tally.problem(f"wait {b.name}: not done after {took:.3f}s of a {timeout_s}s timeout")
            observe(self.tally, b, op, "wait", with_output=True)

    async def list(self) -> None:
        own = self.rng.random() < 0.3
        if own:
            text, keep = f'display_name = "{self.display_name}"', None
        else:
            text, keep = self.rng.choice(FILTERS)
        size = self.rng.choice((5, 20, 100))
        token, seen, ops = "", [], []
        for _ in range(100 if own else 2):
            page, code = await self.call("ListOperations", self.stubs.ops.ListOperations,
                                         operations_pb2.ListOperationsRequest(name="batches", filter=text,
                                                                              page_size=size, page_token=token))
            if code is not OK:
                return
            for op in page.operations:
                meta = metadata_of(op)
                if keep is not None and not keep(op, meta):
                    self.tally.problem(f"list {text!r} returned {op.name} (done={op.done}, "
                                       f"state={S.Name(meta.state)}, model={meta.model}, priority={meta.priority})")
                if meta.HasField("output") and meta.output.ByteSize():
                    self.tally.problem(f"list returned {op.name} with its output")
                seen.append(op.name)
                ops.append(op)
            token = page.next_page_token
            if not token:
                break
        if own:
            if not token:
                expected = [b.name for b in reversed(self.mine) if not b.deleted]  # newest first
                if seen != expected:
                    self.tally.problem(f"list {text!r}: {len(seen)} batches, expected this client's "
                                       f"{len(expected)} not deleted, newest first")
            by_name = {b.name: b for b in self.mine}
            for op in ops:
                if op.name in by_name:
                    observe(self.tally, by_name[op.name], op, "list", with_output=False)

    async def cancel(self, b: Tracked) -> None:
        was_done = b.final is not None
        _, code = await self.call("CancelOperation", self.stubs.ops.CancelOperation,
                                  operations_pb2.CancelOperationRequest(name=b.name))
        if code is not OK:
            return
        if not was_done:
            b.cancelled = True
        if self.rng.random() < 0.5:
            # Cancel is best effort: a batch still pending or running cannot be deleted yet.
            refused = await self.delete(b, allowed=(FAILED_PRECONDITION,))
            self.tally.cancel_then_delete_refused += refused

    async def delete(self, b: Tracked, allowed: tuple[grpc.StatusCode, ...] = ()) -> bool:
        _, code = await self.call("DeleteOperation", self.stubs.ops.DeleteOperation,
                                  operations_pb2.DeleteOperationRequest(name=b.name), allowed)
        if code is OK:
            b.deleted = True
            # Deleting twice is NOT_FOUND, and so is reading it.
            await self.call("DeleteOperation", self.stubs.ops.DeleteOperation,
                            operations_pb2.DeleteOperationRequest(name=b.name), (NOT_FOUND,))
            await self.get(b)
        elif code is FAILED_PRECONDITION and b.final is not None:
            self.tally.problem(f"delete {b.name}: FAILED_PRECONDITION on a batch seen done")
        return code is FAILED_PRECONDITION

    async def run(self, deadline: float, max_steps: int) -> None:
        rng = self.rng
        try:
            for _ in range(max_steps):
                if time.monotonic() >= deadline:
                    break
                live = [b for b in self.mine if not b.deleted]
                open_ = [b for b in live if b.final is None]
                done = [b for b in live if b.final is not None]
                roll = rng.random()
                if roll < 0.2 and len(open_) < MAX_OPEN_PER_CLIENT:
                    await self.create()
                elif roll < 0.5 and live:
                    await self.get(rng.choice(live))
                elif roll < 0.65 and live:
                    await self.wait(rng.choice(open_ or live))
                elif roll < 0.8:
                    await self.list()
                elif roll < 0.88 and live:
                    await self.cancel(rng.choice(open_ or live))
                elif done:
                    await self.delete(rng.choice(done))
                elif open_:
                    # Not seen done: refused unless it finished meanwhile.
                    await self.delete(rng.choice(open_), allowed=(FAILED_PRECONDITION,))
        finally:
            await self.stubs.channel.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def soak(tmp_path: Path, duration_s: float) -> Tally:
    seed = int(os.environ.get("LONGBATCH_SOAK_SEED") or random.randrange(1 << 32))
    print(f"\nsoak: {CLIENTS} clients for {duration_s:g}s, seed {seed}", flush=True)
    tally = Tally()
    data_dir, log_path = tmp_path / "data", tmp_path / "server.log"
    proc = LoggedServer(data_dir, log_path)
    try:
        target = await proc.start()
        clients = [Client(cid, target, tally, seed) for cid in range(CLIENTS)]
        t0 = time.monotonic()
        # Steps are bounded too: a client never loops more than 200 times a second.
        async with asyncio.timeout(duration_s + 60):
            await asyncio.gather(*(c.run(t0 + duration_s, int(duration_s * 200)) for c in clients))
        elapsed = time.monotonic() - t0
        load_rpcs = tally.rpcs

        # Every batch ends (echo-slow runs 16 at a time, 50 ms each) or was deleted.
        final = Client(CLIENTS, target, tally, seed)
        try:
            drain_deadline = time.monotonic() + 60
            for c in clients:
                for b in c.mine:
                    if b.deleted:
                        continue
                    while b.final is None:
                        left = drain_deadline - time.monotonic()
                        assert left > 0, f"{b.name} not done 60 s after the load stopped"
                        request = operations_pb2.WaitOperationRequest(name=b.name)
                        request.timeout.FromNanoseconds(int(min(left, 10) * 1e9))
                        op, code = await final.call("WaitOperation", final.stubs.ops.WaitOperation, request)
                        assert code is OK, op
                        observe(tally, b, op, "final wait", with_output=True)
            # The load's cancels mostly reach batches that just finished (echo
            # answers in milliseconds): one batch long enough to be running
            # when cancelled makes sure a cancel takes effect on this server.
            long_batch = batch_pb2.BatchGenerateContentRequest(batch=batch_pb2.GenerateContentBatch(
                model=SLOW_MODEL, display_name="soak-cancel", input_config=batch_pb2.InputConfig(
                    requests=batch_pb2.InlinedRequests(requests=[
                        batch_pb2.InlinedRequest(request=gen_request(f"long {i}")) for i in range(400)]))))
            long_op, code = await final.call("BatchGenerateContent", final.stubs.batches.BatchGenerateContent,
                                             long_batch)
            assert code is OK, long_op
            _, code = await final.call("CancelOperation", final.stubs.ops.CancelOperation,
                                       operations_pb2.CancelOperationRequest(name=long_op.name))
            assert code is OK
            request = operations_pb2.WaitOperationRequest(name=long_op.name)
            request.timeout.FromSeconds(30)
            long_op, code = await final.call("WaitOperation", final.stubs.ops.WaitOperation, request)
            assert code is OK and long_op.done and metadata_of(long_op).state == CANCELLED, long_op
            remaining = {b.name for c in clients for b in c.mine if not b.deleted} | {long_op.name}
            listed: list[str] = []
            token = ""
            for _ in range(1000):
                page, code = await final.call("ListOperations", final.stubs.ops.ListOperations,
                                              operations_pb2.ListOperationsRequest(name="batches", page_size=1000,
                                                                                   page_token=token))
                assert code is OK, page
                listed += [op.name for op in page.operations]
                token = page.next_page_token
                if not token:
                    break
            assert len(listed) == len(set(listed)), "a full listing returned some batch twice"
            assert set(listed) == remaining, (
                f"listing: {len(set(listed) - remaining)} unknown or deleted, {len(remaining - set(listed))} missing")
        finally:
            await final.stubs.channel.close()
        assert await proc.terminate() == 0
    finally:
        await proc.ensure_dead()

    assert_db_intact(data_dir)
    log = log_path.read_text(errors="replace")

    by_rpc: dict[str, dict[str, int]] = {}
    for (rpc, code), count in sorted(tally.outcomes.items()):
        by_rpc.setdefault(rpc, {})[code] = count
    lat = tally.get_latency_s
    deleted = sum(b.deleted for c in clients for b in c.mine)
    cancelled = sum(b.final is not None and b.final[0] == CANCELLED for c in clients for b in c.mine)
    print(f"soak: {load_rpcs} RPCs in {elapsed:.1f}s under load ({load_rpcs / elapsed:.0f}/s), {tally.rpcs} in all; "
          f"GetOperation p50 {percentile(lat, 0.5) * 1e3:.1f} ms, p99 {percentile(lat, 0.99) * 1e3:.1f} ms "
          f"over {len(lat)} calls", flush=True)
    print(f"soak: {tally.created} batches ({tally.requests} requests) created, {cancelled} ended CANCELLED, "
          f"{deleted} deleted; deletes right after a cancel refused {tally.cancel_then_delete_refused} times",
          flush=True)
    print(f"soak: outcomes {by_rpc}", flush=True)

    assert not tally.locked, f"'database is locked' reached clients: {tally.locked[:5]}"
    assert "database is locked" not in log, log[-3000:]
    assert not tally.unexpected, f"{len(tally.unexpected)} unexpected RPC errors: {tally.unexpected[:10]}"
    kinds = Counter(re.sub(r"batches/\w+", "batches/ID", re.sub(r"\d+", "N", p)) for p in tally.problems)
    assert not tally.problems, f"{tally.problem_count} contract violations, by kind (first 1000) {dict(kinds)}; " \
                               f"e.g. {tally.problems[:5]}"
    assert "Traceback" not in log, log[-3000:]
    assert tally.created >= CLIENTS, f"only {tally.created} batches created"
    assert by_rpc.get("DeleteOperation", {}).get("OK", 0) > 0
    assert by_rpc.get("CancelOperation", {}).get("OK", 0) > 1  # the load's and the long batch's
    return tally


@pytest.mark.timeout(110)
async def test_soak_64_clients(tmp_path: Path) -> None:
    await soak(tmp_path, duration_s=float(os.environ.get("LONGBATCH_SOAK_S", "6")))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_soak_64_clients_for_a_minute(tmp_path: Path) -> None:
    await soak(tmp_path, duration_s=60.0)
