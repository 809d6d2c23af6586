"""google.longrunning.Operations over batches."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2

from .. import convert
from ..domain import Batch
from ..edge import current_tenant
from ..errors import InvalidArgument, Unimplemented
from ..manager import DEFAULT_WAIT_S, MAX_WAIT_S, BatchManager, BatchView
from ..validate import parse_name

Context = grpc.aio.ServicerContext[Any, Any]


class _OperationCache:
    """Built Operations by batch id, valid while the batch's update_time and
    waiting reason are unchanged: forever once done (bar a rename), between
    commits while it runs. Polling clients then cost a row read, not a rebuild."""

    def __init__(self, entries: int = 4096, max_bytes: int = 64 << 10) -> None:
        self._entries = entries
        self._max_bytes = max_bytes
        self._ops: OrderedDict[str, tuple[int, str, operations_pb2.Operation]] = OrderedDict()

    def lookup(self, batch: Batch, waiting_reason: str) -> operations_pb2.Operation | None:
        """The Operation built for this very version of ``batch``, if kept."""
        hit = self._ops.get(batch.id)
        # A paused batch changes no row, so its waiting reason is part of the key.
        if hit is not None and hit[0] == batch.update_time_us and hit[1] == waiting_reason:
            self._ops.move_to_end(batch.id)
            return hit[2]
        return None

    def get(self, view: BatchView) -> operations_pb2.Operation:
        """The Operation of ``view``: kept, or built (and kept if small)."""
        batch = view.batch
        op = self.lookup(batch, view.waiting_reason)
        if op is not None:
            return op
        op = convert.operation(batch, view.output, view.waiting_reason)
        if op.ByteSize() <= self._max_bytes:
            self._ops[batch.id] = (batch.update_time_us, view.waiting_reason, op)
            if len(self._ops) > self._entries:
                self._ops.popitem(last=False)
        return op


class OperationsService(operations_pb2_grpc.OperationsServicer):  # type: ignore[misc]
    """Get, List, Wait, Cancel and Delete batches as operations."""

    def __init__(self, manager: BatchManager) -> None:
        self._manager = manager
        self._cache = _OperationCache()

    async def GetOperation(
        self, request: operations_pb2.GetOperationRequest, context: Context
    ) -> operations_pb2.Operation:
        """The batch as an operation, with live metadata."""
        batch = await self._manager.get_batch(current_tenant(), parse_name(request.name, "batches"))
        # A hit needs no output: reading it (a file name or a cached blob)
        # would cost more than the lookup.
        reason = self._manager.waiting_reason(batch)
        return self._cache.lookup(batch, reason) or self._cache.get(await self._manager.view(batch))

    async def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: Context
    ) -> operations_pb2.ListOperationsResponse:
        """Batches newest first, filtered, paged; without their outputs."""
        if request.return_partial_success:
            raise Unimplemented("return_partial_success is not supported: every page is complete",
                                violations=[("return_partial_success", "not supported")])
        batches, token = await self._manager.list(
            current_tenant(), request.name, request.filter, request.page_size, request.page_token
        )
        return operations_pb2.ListOperationsResponse(
            operations=[convert.operation(b, waiting_reason=self._manager.waiting_reason(b)) for b in batches],
            next_page_token=token,
        )

    async def WaitOperation(
        self, request: operations_pb2.WaitOperationRequest, context: Context
    ) -> operations_pb2.Operation:
        """Return as soon as the batch is done, or at the timeout/deadline."""
        batch_id = parse_name(request.name, "batches")
        timeout = DEFAULT_WAIT_S
        if request.HasField("timeout"):
            timeout = request.timeout.seconds + request.timeout.nanos / 1e9
            if timeout < 0 or request.timeout.nanos < 0:
                raise InvalidArgument("timeout must not be negative", violations=[("timeout", "is negative")])
            if not 0 <= request.timeout.nanos < 1_000_000_000 or request.timeout.seconds > 315_576_000_000:
                raise InvalidArgument("timeout is not a valid duration", violations=[("timeout", "out of range")])
        timeout = min(timeout, MAX_WAIT_S)
        remaining = context.time_remaining()
        if remaining is not None:
            # Answer before the client gives up, so it sees done=false, not an error.
            timeout = min(timeout, max(0.0, remaining - 0.05))
        view = await self._manager.wait(current_tenant(), batch_id, timeout)
        return self._cache.get(view)

    async def CancelOperation(
        self, request: operations_pb2.CancelOperationRequest, context: Context
    ) -> empty_pb2.Empty:
        """Cancel a pending or running batch; no-op when done."""
        await self._manager.cancel(current_tenant(), parse_name(request.name, "batches"))
        return empty_pb2.Empty()

    async def DeleteOperation(
        self, request: operations_pb2.DeleteOperationRequest, context: Context
    ) -> empty_pb2.Empty:
        """Delete a done batch with its results."""
        await self._manager.delete(current_tenant(), parse_name(request.name, "batches"))
        return empty_pb2.Empty()
