"""Micro-batching: single requests made at once become one call of many.

The executor calls a backend once per request, from up to
``max_concurrency`` workers at a time and across every running batch of the
model. A backend whose server (or local model) is much faster per item when
given many at once (``/embeddings`` with a list of inputs, a
sentence-transformers ``encode`` of 64 texts) puts a :class:`MicroBatcher`
between the two: each call waits for company for at most ``max_wait_s``,
then goes out with up to ``max_size`` others. While ``max_in_flight`` calls
are running, new requests gather, so a busy model sends full groups without
waiting at all.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from google.rpc import code_pb2

from .base import BackendError

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["MicroBatcher"]


class MicroBatcher(Generic[T, R]):
    """Groups concurrent :meth:`submit` calls into calls of ``run_many``.

    ``run_many`` gets the items of one group and returns one entry per item,
    in order: a result, or a :class:`BackendError` for that item alone. If it
    raises, every item of the group gets that exception (a retryable
    BackendError is then retried by the executor item by item, and the
    retries group again).
    """

    def __init__(self, run_many: Callable[[list[T]], Awaitable[list[R | BackendError]]], *,
                 max_size: int, max_wait_s: float, max_in_flight: int | None = None) -> None:
        """Args:
            run_many: answers a group of items.
            max_size: items per group at most.
            max_wait_s: how long the first item of a group waits for others.
            max_in_flight: groups running at once at most (1 for a model
                that computes one group at a time); None for no limit.
        """
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._run_many = run_many
        self._max_size = max_size
        self._max_wait_s = max_wait_s
        self._max_in_flight = max_in_flight
        self._pending: deque[tuple[T, asyncio.Future[R], float]] = deque()
        self._in_flight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.calls = 0
        """Groups sent so far (for tests and metrics)."""
        self.items = 0
        """Items sent so far, in all groups."""

    async def submit(self, item: T) -> R:
        """The result for one item, once its group has run.

        Raises:
            BackendError: the item's own error, or its group's; UNAVAILABLE
                once :meth:`aclose` has been called.
        """
        if self._closed:
            raise BackendError(code_pb2.UNAVAILABLE, "the backend is shut down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future, loop.time()))
        self._launch()
        return await future

    async def aclose(self) -> None:
        """Wait for the groups under way; fail what is still gathering and
        every later :meth:`submit`."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            _, future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(BackendError(code_pb2.UNAVAILABLE, "the backend is shut down"))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _launch(self) -> None:
        """Start every group that is due and allowed; else arm the timer."""
        loop = asyncio.get_running_loop()
        pending = self._pending
        while pending and (self._max_in_flight is None or self._in_flight < self._max_in_flight):
            while pending and pending[0][1].done():  # cancelled while it waited (watchdog, batch cancel)
                pending.popleft()
            if not pending:
                break
            oldest = pending[0][2]
            if len(pending) < self._max_size and loop.time() - oldest < self._max_wait_s:
                if self._timer is None:
                    self._timer = loop.call_at(oldest + self._max_wait_s, self._fire)
                return
            # Take live items only: a waiter cancelled while it gathered
            # must not cost a place in the group.
            group: list[tuple[T, asyncio.Future[R], float]] = []
            while pending and len(group) < self._max_size:
                entry = pending.popleft()
                if not entry[1].done():
                    group.append(entry)
            if not group:
                continue
            self._in_flight += 1
            task = loop.create_task(self._run(group))
            self._tasks.add(task)
            # Accounting in a done callback, not in _run's finally: a task
            # cancelled before its first step never enters its body.
            task.add_done_callback(functools.partial(self._finished, group))

    def _fire(self) -> None:
        self._timer = None
        self._launch()

    async def _run(self, group: list[tuple[T, asyncio.Future[R], float]]) -> None:
        self.calls += 1
        self.items += len(group)
        try:
            results = await self._run_many([item for item, _, _ in group])
            if len(results) != len(group):
                raise BackendError(code_pb2.INTERNAL,
                                   f"backend answered {len(results)} results for {len(group)} inputs")
        except Exception as e:  # every waiter of the group must hear of it
            for _, future, _ in group:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future, _), result in zip(group, results, strict=True):
            if future.done():  # its waiter was cancelled meanwhile
                continue
            if isinstance(result, BackendError):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _finished(self, group: list[tuple[T, asyncio.Future[R], float]], task: asyncio.Task[None]) -> None:
        """A group's task ended, however: free its slot, fail any waiter it
        left (it was cancelled), and start what gathered meanwhile."""
        self._tasks.discard(task)
        self._in_flight -= 1
        for _, future, _ in group:
            if not future.done():
                future.set_exception(BackendError(code_pb2.CANCELLED, "the group's call was cancelled"))
        if self._pending and not self._closed:
            self._launch()
