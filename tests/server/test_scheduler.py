"""FairScheduler without a server: DRR shares by weight, priority within a
tenant, runs that are not ready, removal during a take; and the
``[[tenants]]`` config that feeds it."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longbatch.server.config import ConfigError, TenantConfig, config_from_dict
from longbatch.server.scheduler import FairScheduler

TOP = 2**63 - 1


@dataclass(eq=False)
class Run:
    """A stand-in for the executor's run: a count of requests left."""

    name: str
    tenant: str
    priority: int
    seq: int
    left: int
    ready: bool = True
    chunk: int | None = None
    """Requests one take hands out (None: the scheduler's unit)."""


class Harness:
    """A scheduler and the take the executor would pass it."""

    def __init__(self, unit: int = 1, weights: dict[str, int] | None = None) -> None:
        self.unit = unit
        self.sched: FairScheduler[Run] = FairScheduler(unit, weights)
        self.seq = 0

    def run(self, name: str, tenant: str, left: int, priority: int = 0, **kw: object) -> Run:
        self.seq += 1
        r = Run(name, tenant, priority, self.seq, left, **kw)  # type: ignore[arg-type]
        self.sched.add(r)
        return r

    def take(self, run: Run) -> range | None:
        if not run.ready:
            return None
        n = min(run.chunk or self.unit, run.left)
        run.left -= n
        if run.left == 0:
            self.sched.remove(run)  # fully dispatched, as the executor does
        return range(n)

    def step(self) -> tuple[Run, int] | None:
        got = self.sched.next(self.take)
        return None if got is None else (got[0], len(got[1]))

    def drain(self, steps: int) -> list[tuple[str, int]]:
        out = []
        for _ in range(steps):
            got = self.step()
            if got is None:
                break
            out.append((got[0].name, got[1]))
        return out


def names(seq: list[tuple[str, int]]) -> list[str]:
    return [n for n, _ in seq]


def test_one_tenant_runs_by_priority_then_fifo() -> None:
    h = Harness()
    h.run("a", "t", 2, priority=0)
    h.run("b", "t", 2, priority=5)
    h.run("c", "t", 2, priority=0)
    h.run("d", "t", 1, priority=5)
    assert names(h.drain(100)) == ["b", "b", "d", "a", "a", "c", "c"]
    assert len(h.sched) == 0 and h.sched.tenants() == []
    assert h.step() is None


def test_reorder_after_a_priority_change() -> None:
    h = Harness()
    a = h.run("a", "t", 3)
    b = h.run("b", "t", 3)
    assert names(h.drain(1)) == ["a"]
    b.priority = 1
    h.sched.reorder(b)
    assert names(h.drain(3)) == ["b", "b", "b"]
    h.sched.reorder(b)  # not scheduled any more: a no-op
    assert names(h.drain(5)) == ["a", "a"]
    assert a.left == 0


def test_equal_weights_alternate_whatever_the_priority() -> None:
    h = Harness()
    for i in range(5):
        h.run(f"flood{i}", "alice", 100, priority=TOP)
    h.run("small", "bob", 5, priority=0)
    first = names(h.drain(10))
    # Bob's five requests go out in the first ten, one per round.
    assert first.count("small") == 5
    assert first == ["flood0", "small"] * 5
    # Then alice alone.
    assert set(names(h.drain(20))) == {"flood0"}
    assert h.sched.tenants() == ["alice"]


def test_weights_set_the_shares() -> None:
    h = Harness(unit=1, weights={"alice": 2, "carol": 3})
    h.run("a", "alice", 1000)
    h.run("b", "bob", 1000)
    h.run("c", "carol", 1000)
    sent = Counter(n for n, k in h.drain(600) for _ in range(k))
    assert sent == {"a": 200, "b": 100, "c": 300}


def test_weights_with_chunks_count_requests_not_dispatches() -> None:
    # Bulk: a take hands out up to a unit (a chunk) of requests; bob's
    # chunks are small, so he dispatches more often for the same share.
    h = Harness(unit=8, weights={"alice": 2})
    h.run("a", "alice", 10_000)
    h.run("b", "bob", 10_000, chunk=3)
    sent = Counter[str]()
    for name, n in h.drain(3000):
        sent[name] += n
        if sent["a"] + sent["b"] >= 6000:
            break
    ratio = sent["a"] / sent["b"]
    assert 1.95 <= ratio <= 2.05, sent


def test_a_tenant_that_is_not_ready_keeps_its_deficit_and_is_skipped() -> None:
    h = Harness(unit=1, weights={"alice": 3})
    a = h.run("a", "alice", 100)
    h.run("b", "bob", 100)
    assert names(h.drain(1)) == ["a"]
    assert h.sched.deficit("alice") == 2
    a.ready = False  # being read
    assert names(h.drain(3)) == ["b", "b", "b"]
    assert h.sched.deficit("alice") == 2  # not lost, not grown
    a.ready = True
    # Alice spends what she kept, bob has his turn, then alice a full one.
    assert names(h.drain(6)) == ["a", "a", "b", "a", "a", "a"]
    b_run = next(r for r in h.sched if r.name == "b")
    b_run.ready = False
    a.ready = False
    assert h.step() is None  # nobody ready: None after one visit each, not a spin
    assert h.sched.tenants() == ["bob", "alice"]


def test_not_ready_runs_fall_through_to_the_tenants_next_run() -> None:
    h = Harness()
    high = h.run("high", "t", 2, priority=9, ready=False)
    h.run("low", "t", 2)
    assert names(h.drain(1)) == ["low"]
    high.ready = True
    assert names(h.drain(3)) == ["high", "high", "low"]


def test_a_take_that_removes_its_run_without_handing_out_moves_on() -> None:
    h = Harness()
    spent = h.run("spent", "t", 0)  # nothing left: the take removes it and hands out nothing
    h.run("next", "t", 1)

    def take(run: Run) -> range | None:
        if run.left == 0:
            h.sched.remove(run)
            return None
        return h.take(run)

    got = h.sched.next(take)
    assert got is not None and got[0].name == "next"
    assert spent not in h.sched and len(h.sched) == 0


def test_an_idle_tenant_is_forgotten_and_rejoins_at_the_tail() -> None:
    h = Harness(unit=1, weights={"bob": 5})
    h.run("a", "alice", 100)
    b = h.run("b", "bob", 1)
    h.run("c", "carol", 100)
    assert names(h.drain(3)) == ["a", "b", "c"]
    assert b not in h.sched and h.sched.tenants() == ["alice", "carol"]
    assert h.sched.deficit("bob") == 0
    h.run("b2", "bob", 100)
    assert h.sched.tenants() == ["alice", "carol", "bob"]
    assert names(h.drain(7)) == ["a", "c", "b2", "b2", "b2", "b2", "b2"]


def test_add_and_remove_are_idempotent() -> None:
    h = Harness()
    r = h.run("a", "t", 3)
    h.sched.add(r)
    assert len(h.sched) == 1 and list(h.sched) == [r]
    h.sched.remove(r)
    h.sched.remove(r)
    assert len(h.sched) == 0 and h.sched.tenants() == [] and h.step() is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unit"):
        FairScheduler(0)
    with pytest.raises(ValueError, match="alice"):
        FairScheduler(1, {"alice": 0})
    assert FairScheduler(1, {"alice": 4}).weight("alice") == 4
    assert FairScheduler(1, {"alice": 4}).weight("bob") == 1


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(1, 5), min_size=2, max_size=5), unit=st.integers(1, 16),
       seed=st.integers(0, 2**32 - 1))
def test_drr_bound_while_every_tenant_has_work(weights: list[int], unit: int, seed: int) -> None:
    # Each take hands out a random 1..unit requests. While every tenant has
    # work and is ready, the requests each has sent, divided by its weight,
    # never differ between two tenants by more than three units: a round's
    # difference, a turn's leftover deficit and a debt under one unit.
    rnd = random.Random(seed)
    h = Harness(unit=unit, weights={f"t{i}": w for i, w in enumerate(weights)})
    for i in range(len(weights)):
        h.run(f"t{i}", f"t{i}", 10**9, priority=rnd.randrange(3))

    def take(run: Run) -> range:
        return range(rnd.randint(1, unit))

    sent = [0] * len(weights)
    for _ in range(400):
        got = h.sched.next(take)
        assert got is not None
        i = int(got[0].tenant[1:])
        sent[i] += len(got[1])
        norm = [s / w for s, w in zip(sent, weights, strict=True)]
        assert max(norm) - min(norm) <= 3 * unit, (sent, weights, unit)


def test_tenants_config() -> None:
    config = config_from_dict({"tenants": [{"name": "alice", "weight": 2}, {"name": "bob"}]})
    assert config.tenants == (TenantConfig("alice", 2), TenantConfig("bob", 1))
    assert config_from_dict({}).tenants == ()
    bad = [
        ({"tenants": {"name": "alice"}}, "expected \\[\\[tenants\\]\\]"),
        ({"tenants": [{"weight": 2}]}, "tenants\\[0\\].name is required"),
        ({"tenants": [{"name": ""}]}, "tenants\\[0\\].name: must not be empty"),
        ({"tenants": [{"name": "a", "weight": 0}]}, "between 1 and 1000"),
        ({"tenants": [{"name": "a", "weight": 1001}]}, "between 1 and 1000"),
        ({"tenants": [{"name": "a", "weight": 1.5}]}, "expected int"),
        ({"tenants": [{"name": "a", "weight": True}]}, "expected int"),
        ({"tenants": [{"name": "a", "wieght": 2}]}, "unknown key tenants\\[0\\].wieght"),
        ({"tenants": [{"name": "a"}, {"name": "a", "weight": 2}]}, "listed twice"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(data)
