"""MicroBatcher: single calls made at once become calls of many."""

from __future__ import annotations

import asyncio
import time

import pytest
from google.rpc import code_pb2

from longbatch.server.backends.base import BackendError
from longbatch.server.backends.batching import MicroBatcher

from support import eventually


class Recorder:
    """A ``run_many`` that records its groups and can be held open."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int | BackendError]:
        self.groups.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.started.set()
        try:
            await asyncio.wait_for(self.release.wait(), 10)
        finally:
            self.running -= 1
        return [i * 10 for i in items]


async def gather_bounded(*aws: object, within: float = 10.0) -> list[object]:
    return await asyncio.wait_for(asyncio.gather(*aws, return_exceptions=True), within)  # type: ignore[arg-type]


async def test_full_groups_go_at_once_without_waiting() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_size=4, max_wait_s=30.0)
    started = time.monotonic()
    results = await gather_bounded(*(batcher.submit(i) for i in range(8)))
    assert results == [i * 10 for i in range(8)]
    assert run.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert time.monotonic() - started < 5  # far below max_wait: full groups never wait
    assert (batcher.calls, batcher.items) == (2, 8)


async def test_a_partial_group_goes_after_max_wait() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_size=100, max_wait_s=0.05)
    started = time.monotonic()
    results = await gather_bounded(*(batcher.submit(i) for i in range(3)))
    elapsed = time.monotonic() - started
    assert results == [0, 10, 20] and run.groups == [[0, 1, 2]]
    assert 0.04 <= elapsed < 5


async def test_zero_wait_sends_each_burst_as_it_comes() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_size=100, max_wait_s=0.0)
    assert await batcher.submit(1) == 10
    assert await batcher.submit(2) == 20
    assert run.groups == [[1], [2]]


async def test_one_group_in_flight_while_the_next_gathers() -> None:
    run = Recorder()
    run.release.clear()
    batcher = MicroBatcher(run, max_size=8, max_wait_s=0.0, max_in_flight=1)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.wait_for(run.started.wait(), 5)
    # 20 more arrive while the first group runs: they wait, then go as 8, 8, 4.
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 21)]
    # Each has been submitted and found no free slot: no group went, and no
    # timer is armed that could send one later; only the release can.
    await eventually(lambda: len(batcher._pending) == 20, within=5, what="all 20 gathering", every=0)
    assert run.groups == [[0]] and batcher._timer is None
    run.release.set()
    results = await gather_bounded(first, *rest)
    assert results == [i * 10 for i in range(21)]
    assert [len(g) for g in run.groups] == [1, 8, 8, 4]
    assert run.most_running == 1


async def test_unlimited_in_flight_runs_groups_concurrently() -> None:
    run = Recorder()
    run.release.clear()
    batcher = MicroBatcher(run, max_size=2, max_wait_s=30.0)
    waiters = [asyncio.ensure_future(batcher.submit(i)) for i in range(6)]
    await eventually(lambda: run.running == 3, within=5, what="three groups running at once", every=0)
    assert not batcher._pending  # all six are in those three groups: there is no fourth
    run.release.set()
    assert await gather_bounded(*waiters) == [0, 10, 20, 30, 40, 50]


async def test_per_item_errors_reach_their_items_only() -> None:
    async def run_many(items: list[int]) -> list[int | BackendError]:
        return [BackendError(code_pb2.INVALID_ARGUMENT, f"odd {i}") if i % 2 else i for i in items]

    batcher = MicroBatcher(run_many, max_size=10, max_wait_s=0.01)
    results = await gather_bounded(*(batcher.submit(i) for i in range(4)))
    assert results[0] == 0 and results[2] == 2
    for i in (1, 3):
        error = results[i]
        assert isinstance(error, BackendError) and error.code == code_pb2.INVALID_ARGUMENT
        assert error.message == f"odd {i}"
    assert batcher.calls == 1


@pytest.mark.parametrize("error", [BackendError(code_pb2.UNAVAILABLE, "model down"), RuntimeError("bug")])
async def test_a_raising_group_fails_every_item_of_it(error: Exception) -> None:
    calls = 0

    async def run_many(items: list[int]) -> list[int | BackendError]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        return list(items)

    batcher = MicroBatcher(run_many, max_size=3, max_wait_s=0.01, max_in_flight=1)
    results = await gather_bounded(*(batcher.submit(i) for i in range(5)))
    assert results[:3] == [error] * 3
    assert results[3:] == [3, 4]  # the next group is not affected


async def test_a_wrong_number_of_results_is_internal() -> None:
    async def run_many(items: list[int]) -> list[int | BackendError]:
        return list(items)[:-1]

    batcher = MicroBatcher(run_many, max_size=3, max_wait_s=30.0)
    results = await gather_bounded(*(batcher.submit(i) for i in range(3)))
    for r in results:
        assert isinstance(r, BackendError) and r.code == code_pb2.INTERNAL and "2 results for 3 inputs" in r.message


async def test_a_waiter_cancelled_while_gathering_takes_no_place() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_size=3, max_wait_s=0.2)
    gone = asyncio.ensure_future(batcher.submit(99))
    await asyncio.sleep(0)
    gone.cancel()
    results = await gather_bounded(*(batcher.submit(i) for i in range(3)))
    assert results == [0, 10, 20]
    assert run.groups == [[0, 1, 2]]  # a full group of live items, at once
    assert gone.cancelled()


async def test_a_waiter_cancelled_during_its_group_leaves_the_others_their_results() -> None:
    run = Recorder()
    run.release.clear()
    batcher = MicroBatcher(run, max_size=3, max_wait_s=30.0)
    waiters = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.wait_for(run.started.wait(), 5)
    waiters[1].cancel()
    run.release.set()
    results = await gather_bounded(*waiters)
    assert results[0] == 0 and results[2] == 20
    assert isinstance(results[1], asyncio.CancelledError)


async def test_a_cancelled_group_task_fails_its_waiters_and_frees_its_slot() -> None:
    run = Recorder()
    run.release.clear()
    batcher = MicroBatcher(run, max_size=2, max_wait_s=30.0, max_in_flight=1)
    waiters = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
    await asyncio.wait_for(run.started.wait(), 5)
    for task in list(batcher._tasks):  # as at loop shutdown
        task.cancel()
    results = await gather_bounded(*waiters)
    for r in results:
        assert isinstance(r, BackendError) and r.code == code_pb2.CANCELLED
    assert run.groups == [[0, 1]]
    run.release.set()
    assert await asyncio.wait_for(asyncio.gather(batcher.submit(5), batcher.submit(6)), 5) == [50, 60]
    assert run.groups == [[0, 1], [5, 6]]  # the slot came back


async def test_aclose_finishes_running_groups_and_fails_the_rest() -> None:
    run = Recorder()
    run.release.clear()
    batcher = MicroBatcher(run, max_size=2, max_wait_s=30.0, max_in_flight=1)
    running = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
    await asyncio.wait_for(run.started.wait(), 5)
    gathering = asyncio.ensure_future(batcher.submit(7))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(batcher.aclose())
    # aclose fails what gathers before it waits for the groups under way: once
    # `gathering` failed, aclose is at that wait, or would have returned.
    await asyncio.wait_for(asyncio.wait([gathering]), 5)
    assert not closing.done()  # it waits for the group under way
    run.release.set()
    await asyncio.wait_for(closing, 5)
    assert await gather_bounded(*running) == [0, 10]
    with pytest.raises(BackendError) as gathered:
        await gathering
    assert gathered.value.code == code_pb2.UNAVAILABLE
    with pytest.raises(BackendError) as later:
        await batcher.submit(8)
    assert later.value.code == code_pb2.UNAVAILABLE
    assert run.groups == [[0, 1]]


async def test_aclose_cancels_the_timer() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_size=10, max_wait_s=0.05)
    waiter = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    timer = batcher._timer
    assert timer is not None
    await batcher.aclose()
    with pytest.raises(BackendError):
        await waiter
    assert timer.cancelled()
    # Past the moment it was due: a callback of ours due then has run, and a
    # group it would have started has had a turn to reach run_many.
    loop = asyncio.get_running_loop()
    due = loop.create_future()
    loop.call_at(timer.when(), due.set_result, None)
    await asyncio.wait_for(due, 5)
    for _ in range(3):
        await asyncio.sleep(0)
    assert run.groups == []


def test_max_size_must_be_positive() -> None:
    async def run_many(items: list[int]) -> list[int | BackendError]:
        return list(items)

    with pytest.raises(ValueError):
        MicroBatcher(run_many, max_size=0, max_wait_s=0.0)
