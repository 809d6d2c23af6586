"""ModelGate: the AIMD in-flight limit and the outage pause, without a server."""

from __future__ import annotations

import asyncio
import logging

import pytest
from google.rpc import code_pb2

from longbatch.server.admission import Admission, ModelGate
from longbatch.server.retry import Backoff

from support import eventually

FAST = Backoff(initial_s=0.02, max_s=0.08, jitter=0.0)
EARLY = 0.001
"""How early the loop may run a timer: it runs those due within its clock's resolution."""


def gate(max_concurrency: int = 4, outage_timeout_s: float = 60.0, probes: Backoff = FAST) -> ModelGate:
    return ModelGate("models/m", max_concurrency, outage_timeout_s=outage_timeout_s, probe_backoff=probes)


def fill(g: ModelGate, n: int) -> list[int]:
    """Admit n calls on the fast path; their `seen` snapshots."""
    seen = []
    for _ in range(n):
        assert g.enter()
        seen.append(g.answered)
    return seen


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_uncontended_calls_take_the_fast_path() -> None:
    g = gate(2)
    for _ in range(100):
        assert g.enter()
        g.ok()
    assert (g.in_flight, g.limit, g.answered, g.paused) == (0, 2, 100, False)


async def test_calls_beyond_the_limit_wait_in_order() -> None:
    g = gate(2)
    fill(g, 2)
    assert not g.enter()
    order: list[int] = []

    async def waiter(i: int) -> None:
        assert await g.wait() is Admission.ADMITTED
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await settle()
    assert order == [] and g.in_flight == 2
    g.ok()
    await settle()
    assert order == [0] and g.in_flight == 2
    g.ok()
    g.ok()
    await settle()
    assert order == [0, 1, 2]
    await asyncio.gather(*tasks)
    assert g.in_flight == 2


async def test_a_burst_of_overloads_halves_the_limit_once() -> None:
    g = gate(16)
    seen = fill(g, 16)
    for s in seen:  # all admitted before the first 429 came back
        g.failed(s, overload=True)
    assert g.limit == 8
    # A call admitted after the cut may cut again.
    (s,) = fill(g, 1)
    g.failed(s, overload=True)
    assert g.limit == 4
    for _ in range(10):
        (s,) = fill(g, 1)
        g.failed(s, overload=True)
    assert g.limit == 1  # never below one


async def test_the_limit_grows_by_one_per_window_of_answers() -> None:
    g = gate(16)
    (s,) = fill(g, 1)
    g.failed(s, overload=True)
    (s,) = fill(g, 1)
    g.failed(s, overload=True)
    assert g.limit == 4
    for _ in range(3):
        fill(g, 1)
        g.ok()
    assert g.limit == 4
    fill(g, 1)
    g.ok()
    assert g.limit == 5
    for _ in range(5):
        fill(g, 1)
        g.ok()
    assert g.limit == 6
    for _ in range(200):
        fill(g, 1)
        g.ok()
    assert g.limit == 16  # capped at max_concurrency


async def test_a_grown_limit_wakes_a_waiter() -> None:
    g = gate(4)
    (s,) = fill(g, 1)
    g.failed(s, overload=True)
    assert g.limit == 2
    fill(g, 2)
    woken = asyncio.create_task(g.wait())
    await settle()
    assert not woken.done()
    g.ok()  # one answer: limit 2 -> 2 (window 1 of 2), one slot freed
    await settle()
    assert woken.result() is Admission.ADMITTED
    assert g.in_flight == 2


async def test_unreachable_while_others_answer_is_the_requests_own_trouble() -> None:
    g = gate(4)
    seen = fill(g, 2)
    g.ok()
    assert not g.unreachable(seen[1], 0.0, code_pb2.UNAVAILABLE, "refused", probe=False)
    assert not g.paused and g.in_flight == 0 and g.waiting_reason == ""


async def test_an_outage_pauses_probes_one_at_a_time_and_resumes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="longbatch.executor")
    g = gate(4)
    loop = asyncio.get_running_loop()
    seen = fill(g, 4)
    paused_at = loop.time()
    for s in seen:
        assert g.unreachable(s, loop.time(), code_pb2.UNAVAILABLE, "model server unreachable: refused", False)
    assert g.paused and g.in_flight == 0 and not g.enter()
    assert "unreachable since" in g.waiting_reason and "refused" in g.waiting_reason
    results: list[Admission] = []
    admitted_at: list[float] = []

    async def waiter() -> Admission:
        a = await g.wait()
        results.append(a)
        admitted_at.append(loop.time())
        return a

    tasks = [asyncio.create_task(waiter()) for _ in range(4)]

    async def next_admission() -> None:
        await asyncio.wait([t for t in tasks if not t.done()], timeout=5, return_when=asyncio.FIRST_COMPLETED)

    # When each probe went out, not what a look at a fixed moment saw: a
    # loaded machine only makes the wait longer, never shorter.
    await next_admission()
    assert results == [Admission.PROBE] and g.in_flight == 1
    assert admitted_at[0] >= paused_at + 0.02 - EARLY  # the first probe waited its backoff
    # The probe fails too: the next one comes after a longer wait (0.04 s),
    # and no call in between (a probe was out, then none was due).
    failed_at = loop.time()
    assert g.unreachable(g.answered, loop.time(), code_pb2.UNAVAILABLE, "still refused", probe=True)
    await next_admission()
    assert results == [Admission.PROBE, Admission.PROBE]
    assert admitted_at[1] >= failed_at + 0.04 - EARLY
    g.ok()  # the second probe got through
    await settle()
    assert not g.paused and g.waiting_reason == ""
    assert results == [Admission.PROBE, Admission.PROBE, Admission.ADMITTED, Admission.ADMITTED]
    assert g.in_flight == 2
    await asyncio.gather(*tasks)
    pauses = [r.getMessage() for r in caplog.records if "dispatch paused" in r.getMessage()]
    resumes = [r.getMessage() for r in caplog.records if "dispatch resumed" in r.getMessage()]
    assert len(pauses) == 1 and "refused" in pauses[0]
    assert len(resumes) == 1 and "1 failed probes" in resumes[0]


async def test_an_error_answer_ends_the_pause() -> None:
    g = gate(2)
    loop = asyncio.get_running_loop()
    (s,) = fill(g, 1)
    assert g.unreachable(s, loop.time(), code_pb2.UNAVAILABLE, "reset", False)
    probe = await asyncio.wait_for(g.wait(), 1)
    assert probe is Admission.PROBE
    g.failed(g.answered, overload=False)  # a 400: the server is up
    assert not g.paused and g.enter()


async def test_waiting_calls_give_up_after_outage_timeout_and_probing_goes_on() -> None:
    # Probes at 0.05 s and 0.10 s, the timeout at 0.5 s from the outage's
    # start: the second probe is out when it passes, unless the loop stalls
    # for 0.4 s.
    g = gate(2, outage_timeout_s=0.5, probes=Backoff(initial_s=0.05, max_s=0.05, jitter=0.0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    for s in fill(g, 2):
        assert g.unreachable(s, started, code_pb2.DEADLINE_EXCEEDED, "did not answer", False)
    waiters = [asyncio.create_task(g.wait()) for _ in range(4)]
    assert await asyncio.wait_for(waiters[0], 1) is Admission.PROBE
    assert g.unreachable(g.answered, loop.time(), code_pb2.DEADLINE_EXCEEDED, "did not answer", True)
    assert await asyncio.wait_for(waiters[1], 1) is Admission.PROBE
    await eventually(lambda: "outlasted outage_timeout" in g.waiting_reason, within=5, what="the outage timeout",
                     every=0.01)
    assert loop.time() >= started + 0.5 - EARLY
    # Past the timeout, but a probe is out: the others wait for its verdict.
    assert not waiters[2].done() and not waiters[3].done()
    assert g.unreachable(g.answered, loop.time(), code_pb2.DEADLINE_EXCEEDED, "did not answer", True)
    # Between probes a newcomer gives up at once (no await came between that
    # verdict and this call, so the next probe cannot be due yet)...
    assert await g.wait() is Admission.GAVE_UP
    assert await asyncio.wait_for(asyncio.gather(*waiters[2:]), 1) == [Admission.GAVE_UP, Admission.GAVE_UP]
    code, message = g.outage_error()
    assert code == code_pb2.DEADLINE_EXCEEDED
    assert message.startswith("did not answer (the model's backend has been unreachable for")
    assert "outage_timeout 0.5s" in message
    # ... the next probe goes out with the next newcomer once it is due (on
    # the loop's clock a sleep past 0.05 s ends after that timer has run),
    # and whoever comes meanwhile waits for it.
    await asyncio.sleep(0.06)
    assert await g.wait() is Admission.PROBE
    after = asyncio.create_task(g.wait())
    await settle()
    assert not after.done()
    g.ok()
    assert await asyncio.wait_for(after, 1) is Admission.ADMITTED
    assert not g.paused and g.waiting_reason == "" and g.in_flight == 1


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    g = gate(1)
    fill(g, 1)
    doomed = asyncio.create_task(g.wait())
    kept = asyncio.create_task(g.wait())
    await settle()
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    g.ok()
    assert await asyncio.wait_for(kept, 1) is Admission.ADMITTED
    assert g.in_flight == 1
    g.ok()
    assert g.enter()  # no stale waiter blocks the fast path


async def test_a_waiter_cancelled_after_its_wake_up_frees_its_slot() -> None:
    g = gate(1)
    fill(g, 1)
    woken = asyncio.create_task(g.wait())
    await settle()
    g.ok()  # hands the slot to `woken`, which has not run yet
    woken.cancel()
    await asyncio.gather(woken, return_exceptions=True)
    assert g.in_flight == 0 and g.enter()


async def test_close_cancels_waiters() -> None:
    g = gate(1)
    fill(g, 1)
    w = asyncio.create_task(g.wait())
    await settle()
    g.close()
    with pytest.raises(asyncio.CancelledError):
        await w
    with pytest.raises(asyncio.CancelledError):
        await g.wait()
    g.close()


def test_max_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError):
        gate(0)
