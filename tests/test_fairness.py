"""Fair scheduling across tenants (docs/execution.md, "Fair scheduling").

A real longbatch server with API keys for two tenants, alice and bob, runs
their batches against tests/fakemodel.py over HTTP on 127.0.0.1: a model
with 4 requests in flight at most and 20 ms per answer. Every prompt names
its tenant and batch, and the fake records when each prompt arrived, so the
tests read the order in which requests were dispatched and count in it,
rather than timing anything: how many of the flood's requests went out
while the small batch ran, the shares of two tenants with work, the order
of one tenant's own batches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MakeServer, ServerHandle
from fakemodel import FakeModel, FaultPlan
from google.longrunning import operations_pb2

from longbatch.server.config import ApiKey, ExecutorSettings, Limits, ModelConfig, ServerConfig, TenantConfig
from longbatch.v1 import batch_pb2

from support import Stubs, gen_request, metadata_of, wait_done

MODEL = "models/remote"
CONCURRENCY = 4
LATENCY_S = 0.02
TOP = 2**63 - 1
KEYS = (ApiKey("k-alice", "alice"), ApiKey("k-bob", "bob"))
SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED


def batch(tag: str, n: int, priority: int = 0) -> batch_pb2.BatchGenerateContentRequest:
    """A create request of ``n`` prompts ``{tag}/{i}`` (tag: tenant-batch)."""
    reqs = [batch_pb2.InlinedRequest(request=gen_request(f"{tag}/{i}")) for i in range(n)]
    return batch_pb2.BatchGenerateContentRequest(batch=batch_pb2.GenerateContentBatch(
        model=MODEL, priority=priority,
        input_config=batch_pb2.InputConfig(requests=batch_pb2.InlinedRequests(requests=reqs))))


@dataclass
class Tenant:
    """One tenant's view of the server: its key on every call."""

    stubs: Stubs
    key: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return (("x-goog-api-key", self.key),)

    async def submit(self, tag: str, n: int, priority: int = 0) -> str:
        op = await self.stubs.batches.BatchGenerateContent(batch(tag, n, priority), metadata=self.md, timeout=30)
        return op.name

    async def get(self, name: str) -> operations_pb2.Operation:
        return await self.stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=self.md,
                                                 timeout=10)

    async def wait(self, name: str, within: float) -> operations_pb2.Operation:
        """WaitOperation until done, bounded by ``within`` seconds."""
        return await wait_done(self.stubs, name, within, self.md)

    async def cancel(self, names: list[str]) -> None:
        for name in names:
            await self.stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name), metadata=self.md,
                                                 timeout=10)


@dataclass
class Setup:
    fake: FakeModel
    handle: ServerHandle
    alice: Tenant
    bob: Tenant

    def order(self) -> list[str]:
        """Every prompt the fake was sent, by first arrival (its dispatch order)."""
        arrivals = self.fake.stats.arrivals
        return sorted(arrivals, key=lambda key: arrivals[key][0])

    async def until(self, predicate: Callable[[], bool], within: float, what: str) -> None:
        """Wait for a condition on the fake's counts, bounded by ``within`` seconds."""
        deadline = time.monotonic() + within
        while not predicate():
            assert time.monotonic() < deadline, f"not within {within}s: {what}"
            await asyncio.sleep(0.005)


Start = Callable[..., Awaitable[Setup]]


@pytest.fixture
async def start(make_server: MakeServer) -> AsyncIterator[Start]:
    fakes: list[FakeModel] = []
    channels: list[Stubs] = []
    servers: list[ServerHandle] = []

    async def start(tenants: tuple[TenantConfig, ...] = (), limits: Limits | None = None,
                    fake: FakeModel | None = None, data_dir: Path | None = None) -> Setup:
        """A server (on ``data_dir``: a restart) whose model calls ``fake`` (a new one by default)."""
        if fake is None:
            fake = FakeModel(FaultPlan(latency_s=LATENCY_S))
            await fake.start()
            fakes.append(fake)
        model = ModelConfig(name=MODEL, backend="gemini-http", max_concurrency=CONCURRENCY,
                            options={"base_url": fake.url})
        config = ServerConfig(models=(model,), api_keys=KEYS, tenants=tenants, limits=limits or Limits(),
                              executor=ExecutorSettings(request_timeout_s=10.0))
        handle = await make_server(config, data_dir)
        servers.append(handle)
        stubs = Stubs.connect(handle.target)
        channels.append(stubs)
        return Setup(fake, handle, Tenant(stubs, "k-alice"), Tenant(stubs, "k-bob"))

    yield start
    for stubs in channels:
        await stubs.channel.close(None)
    # The servers stop before the fakes they call (stopping twice is safe):
    # a fake gone first would look like an outage.
    for handle in servers:
        await handle.running.stop(grace_s=1.0)
    for fake in fakes:
        await fake.stop()


def count(keys: list[str], prefix: str) -> int:
    return sum(1 for k in keys if k.startswith(prefix))


async def test_a_small_batch_is_not_held_behind_another_tenants_flood(start: Start) -> None:
    s: Setup = await start()
    # Alice floods: 8 batches of 250 at the highest priority there is.
    flood = [await s.alice.submit(f"alice-{b}", 250, priority=TOP) for b in range(8)]
    await s.until(lambda: s.fake.stats.total >= 2 * CONCURRENCY, 30, "the flood running")
    sent_before = len(s.order())
    n = 40
    small = await s.bob.submit("bob-0", n, priority=0)
    op = await s.bob.wait(small, within=60)
    meta = metadata_of(op)
    assert meta.state == SUCCEEDED and meta.batch_stats.successful_request_count == n

    order = s.order()
    bob = [i for i, k in enumerate(order) if k.startswith("bob-")]
    assert len(bob) == n
    first, last = bob[0], bob[-1]
    # Dispatched between bob's create call and his first request: while
    # the create call ran and the run was read, not the flood.
    waited = count(order[sent_before:first], "alice-")
    # While bob ran, alice got an equal share (weights 1:1): about n, not
    # the ~2000 her priority would have put first.
    during = count(order[first:last + 1], "alice-")
    print(f"\nflood: alice sent {waited} after bob's create before his first, {during} while his {n} ran; "
          f"alice sent {count(order, 'alice-')} of 2000 by bob's end")
    assert waited <= n
    assert during <= n + 2 * CONCURRENCY
    assert count(order, "alice-") < 1000, "bob waited for much of the flood"
    await s.alice.cancel(flood)


async def test_weights_set_the_shares_of_tenants_with_work(start: Start) -> None:
    s: Setup = await start(tenants=(TenantConfig("alice", weight=2), TenantConfig("bob", weight=1)))
    # Both have work throughout the window counted below (alice at most
    # ~2/3 of 450 = 300 of her 600, bob ~150 of his 600), and bob's top
    # priority does not buy him more than his weight.
    names = [await s.alice.submit(f"alice-{b}", 200) for b in range(3)]
    names.append(await s.bob.submit("bob-0", 600, priority=TOP))

    def both_started() -> int | None:
        order = s.order()
        seen: set[str] = set()
        for i, k in enumerate(order):
            seen.add(k.split("-")[0])
            if len(seen) == 2:
                return i + 1
        return None

    await s.until(lambda: both_started() is not None, 30, "both tenants dispatched")
    begin = both_started()
    assert begin is not None
    window = 450
    await s.until(lambda: len(s.order()) >= begin + window, 60, f"{window} more requests dispatched")
    sent = s.order()[begin:begin + window]
    a, b = count(sent, "alice-"), count(sent, "bob-")
    print(f"\nweights 2:1: of {window} dispatched while both had work, alice {a}, bob {b}, ratio {a / b:.2f}")
    assert a + b == window
    assert 1.8 <= a / b <= 2.2
    await s.alice.cancel(names[:3])
    await s.bob.cancel(names[3:])


async def test_priority_orders_a_tenants_own_batches(start: Start) -> None:
    s: Setup = await start()
    # Bob keeps the model busy, so alice's batches run at her share.
    flood = await s.bob.submit("bob-0", 1500)
    low = await s.alice.submit("alice-low", 300, priority=0)
    await s.until(lambda: count(s.order(), "alice-low") >= CONCURRENCY, 30, "alice's low batch running")
    high = await s.alice.submit("alice-high", 40, priority=10)
    op = await s.alice.wait(high, within=60)
    assert metadata_of(op).state == SUCCEEDED
    low_now = metadata_of(await s.alice.get(low))
    assert low_now.batch_stats.pending_request_count > 0, "alice's low-priority batch finished first"

    order = s.order()
    high_at = [i for i, k in enumerate(order) if k.startswith("alice-high/")]
    assert len(high_at) == 40
    # Once her high-priority batch started, alice's share went to it alone
    # (a request or two of the low one may have been taken just before).
    low_between = count(order[high_at[0]:high_at[-1] + 1], "alice-low/")
    bob_between = count(order[high_at[0]:high_at[-1] + 1], "bob-")
    print(f"\npriority: while alice's high batch ran, {low_between} of her low batch, {bob_between} of bob's")
    assert low_between <= CONCURRENCY
    # Bob's share did not shrink for alice's priority.
    assert bob_between >= 40 - 2 * CONCURRENCY
    await s.alice.cancel([low])
    await s.bob.cancel([flood])


async def test_a_batch_behind_another_tenants_top_priority_work_does_not_expire(
        start: Start) -> None:
    ttl = 6.0
    s: Setup = await start(limits=Limits(batch_ttl_s=ttl))
    # Alice's work, at top priority, takes ~4000 x 20 ms / 4 = 20 s, far
    # past bob's TTL; by priority alone bob's batch (created before most of
    # it and expiring before it) would never run and end EXPIRED.
    flood = [await s.alice.submit("alice-0", 1000, priority=TOP)]
    n = 40
    small = await s.bob.submit("bob-0", n)
    flood += [await s.alice.submit(f"alice-{b}", 1000, priority=TOP) for b in range(1, 4)]
    op = await s.bob.wait(small, within=ttl + 10)
    meta = metadata_of(op)
    assert meta.state == SUCCEEDED, batch_pb2.BatchState.Name(meta.state)
    stats = meta.batch_stats
    assert (stats.successful_request_count, stats.expired_request_count) == (n, 0)
    sent = s.order()
    print(f"\nexpiry: bob's {n} done with alice at {count(sent, 'alice-')} of 4000")
    assert count(sent, "alice-") < 2000
    await s.alice.cancel(flood)


async def test_shares_hold_after_a_restart(start: Start) -> None:
    s = await start()
    flood = await s.alice.submit("alice-0", 1500, priority=TOP)
    small = await s.bob.submit("bob-0", 300)
    await s.until(lambda: count(s.order(), "bob-") >= 20, 30, "bob's batch running")
    await s.handle.running.stop(grace_s=1.0)
    sent = len(s.order())
    # The same data dir and fake: both batches are resumed, and the model is
    # shared again from the first request after the restart.
    again = await start(fake=s.fake, data_dir=s.handle.data_dir)
    window = 200
    await again.until(lambda: len(again.order()) >= sent + window, 60, f"{window} dispatched after the restart")
    after = again.order()[sent:sent + window]
    a, b = count(after, "alice-"), count(after, "bob-")
    print(f"\nrestart: of the first {window} dispatched after it, alice {a}, bob {b}")
    assert a + b == window and abs(a - b) <= 2 * CONCURRENCY
    op = await again.bob.wait(small, within=60)
    meta = metadata_of(op)
    assert meta.state == SUCCEEDED and meta.batch_stats.successful_request_count == 300
    await again.alice.cancel([flood])
