"""``BatchOperation``: a handle on one batch's google.longrunning operation.

The handle talks to the server only through injected callables (get, wait,
cancel), so it can be driven by a fake in tests and by ``Client`` for real.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from google.longrunning import operations_pb2
from google.protobuf import any_pb2

from longbatch.client.errors import BatchFailed, DeadlineExceeded, Internal, Unavailable, Unimplemented
from longbatch.v1 import batch_pb2

Batch = batch_pb2.GenerateContentBatch | batch_pb2.EmbedContentBatch
"""The batch carried as an operation's metadata."""
BatchOutput = batch_pb2.GenerateContentBatchOutput | batch_pb2.EmbedContentBatchOutput
"""The output carried as a done operation's response."""
BatchStats = batch_pb2.BatchStats | batch_pb2.EmbedContentBatchStats
"""The live counters of a batch."""

RefreshFn = Callable[[], Awaitable[operations_pb2.Operation]]
WaitFn = Callable[[float], Awaitable[operations_pb2.Operation]]
CancelFn = Callable[[], Awaitable[None]]

MAX_WAIT_S = 60.0
"""Longest single WaitOperation call: the server's default, well under its 600 s cap."""
TRANSIENT_WINDOW_S = 30.0
"""How long UNAVAILABLE / DEADLINE_EXCEEDED are retried in a row while waiting (a server restart)."""

_METADATA_TYPES: dict[str, type[Batch]] = {
    "longbatch.v1.GenerateContentBatch": batch_pb2.GenerateContentBatch,
    "longbatch.v1.EmbedContentBatch": batch_pb2.EmbedContentBatch,
}
_OUTPUT_TYPES: dict[str, type[BatchOutput]] = {
    "longbatch.v1.GenerateContentBatchOutput": batch_pb2.GenerateContentBatchOutput,
    "longbatch.v1.EmbedContentBatchOutput": batch_pb2.EmbedContentBatchOutput,
}


def backoff(start: float = 0.2, cap: float = 2.0, factor: float = 1.5) -> Iterator[float]:
    """Yields jittered, exponentially growing delays in seconds, at most ``cap``.

    Jitter (0.5x to 1x) keeps many waiting clients from polling in lockstep.
    """
    delay = min(start, cap)
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(cap, delay * factor)


def _type_name(value: any_pb2.Any) -> str:
    return str(value.type_url).rpartition("/")[2]


class BatchOperation:
    """A batch's long-running operation, as last seen from the server.

    Properties read the last fetched ``Operation``; ``refresh()``, ``result()``
    and ``watch()`` fetch newer ones.

    Args:
        operation: The operation as first returned (by create, get or list).
        refresh: Fetches the operation again (GetOperation).
        wait: Calls WaitOperation with a timeout in seconds; None when the
            server has no WaitOperation, in which case the handle polls.
        cancel: Requests cancellation (CancelOperation).
    """

    def __init__(
        self,
        operation: operations_pb2.Operation,
        *,
        refresh: RefreshFn,
        wait: WaitFn | None,
        cancel: CancelFn,
    ) -> None:
        self._refresh = refresh
        self._wait = wait
        self._cancel = cancel
        self._failing_since: float | None = None
        self._set(operation)

    def __repr__(self) -> str:
        return f"<BatchOperation {self.name} {batch_pb2.BatchState.Name(self.state)}>"

    def _set(self, operation: operations_pb2.Operation) -> None:
        self._operation = operation
        cls = _METADATA_TYPES.get(_type_name(operation.metadata))
        self._metadata: Batch | None = cls.FromString(operation.metadata.value) if cls else None

    @property
    def operation(self) -> operations_pb2.Operation:
        """The raw ``google.longrunning.Operation`` last fetched."""
        return self._operation

    @property
    def name(self) -> str:
        """The operation and batch name, ``batches/{id}``."""
        return str(self._operation.name)

    @property
    def done(self) -> bool:
        """Whether the batch reached a terminal state."""
        return bool(self._operation.done)

    @property
    def kind(self) -> str:
        """``"generate"``, ``"embed"``, or ``""`` when the metadata is of an unknown type."""
        if isinstance(self._metadata, batch_pb2.GenerateContentBatch):
            return "generate"
        if isinstance(self._metadata, batch_pb2.EmbedContentBatch):
            return "embed"
        return ""

    @property
    def metadata(self) -> Batch | None:
        """The batch (``GenerateContentBatch`` or ``EmbedContentBatch``) from the metadata."""
        return self._metadata

    @property
    def state(self) -> batch_pb2.BatchState.ValueType:
        """The batch's state, BATCH_STATE_UNSPECIFIED if no metadata was sent."""
        return self._metadata.state if self._metadata is not None else batch_pb2.BATCH_STATE_UNSPECIFIED

    @property
    def stats(self) -> BatchStats | None:
        """The batch's live request counters."""
        return self._metadata.batch_stats if self._metadata is not None else None

    async def refresh(self) -> BatchOperation:
        """Fetches the operation again; returns self for chaining."""
        self._set(await self._refresh())
        return self

    async def cancel(self) -> None:
        """Asks the server to cancel the batch (best effort; a done batch is unchanged)."""
        await self._cancel()

    # The timeout also bounds each server wait, which asyncio.timeout could not do.
    async def result(self, timeout: float | None = None) -> BatchOutput:  # noqa: ASYNC109
        """Waits for the batch to finish and returns its output.

        Waits with the server's WaitOperation (each call at most 60 s and never
        past the overall deadline), which returns as soon as the batch is done.

        Args:
            timeout: Seconds to wait in all; None waits as long as it takes.

        Returns:
            The ``GenerateContentBatchOutput`` or ``EmbedContentBatchOutput``.

        Raises:
            BatchFailed: The batch ended FAILED, CANCELLED or EXPIRED.
            TimeoutError: ``timeout`` passed before the batch was done.
            LongbatchError: A call to the server failed.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delays = backoff()
        while not self.done:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{self.name} is not done after {timeout} s")
            await self._step(MAX_WAIT_S if remaining is None else min(MAX_WAIT_S, remaining), delays)
        return self._outcome()

    async def watch(self, interval: float = 2.0) -> AsyncIterator[Batch]:
        """Yields the batch on every refresh until it is done, for progress displays.

        Refreshes start 0.2 s apart and slow down to ``interval``; where the
        server has WaitOperation the pause is spent in it, so completion is seen
        at once. The last batch yielded is the terminal one.

        Args:
            interval: The longest pause between refreshes, in seconds.
        """
        delays = backoff(cap=interval)
        await self.refresh()
        while True:
            if self._metadata is not None:
                yield self._metadata
            if self.done:
                return
            await self._step(next(delays), delays)

    async def _step(self, step_s: float, delays: Iterator[float]) -> None:
        """Fetches a newer operation, spending at most about ``step_s`` seconds."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        waited = False
        try:
            if self._wait is not None:
                waited = True
                operation = await self._wait(step_s)
            else:
                await asyncio.sleep(min(next(delays), step_s))
                operation = await self._refresh()
        except Unimplemented:
            if not waited:
                raise
            self._wait = None  # the server has no WaitOperation: poll from now on
            return
        except (Unavailable, DeadlineExceeded):
            now = loop.time()
            self._failing_since = self._failing_since if self._failing_since is not None else now
            if now - self._failing_since > TRANSIENT_WINDOW_S:
                raise
            await asyncio.sleep(min(next(delays), max(0.0, step_s - (now - started))))
            return
        self._failing_since = None
        self._set(operation)
        if waited and not self.done and loop.time() - started < step_s / 2:
            # The server answered early without the batch being done (a wait
            # cap, a shutdown): pause so a loop of such answers cannot spin.
            await asyncio.sleep(min(next(delays), step_s))

    def _outcome(self) -> BatchOutput:
        operation = self._operation
        which = operation.WhichOneof("result")
        if which == "error":
            raise BatchFailed(operation.error, self._metadata)
        if which == "response":
            cls = _OUTPUT_TYPES.get(_type_name(operation.response))
            if cls is None:
                raise Internal(f"{self.name}: unexpected response type {operation.response.type_url!r}")
            return cls.FromString(operation.response.value)
        raise Internal(f"{self.name} is done without an error or a response")
