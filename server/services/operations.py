"""google.longrunning.Operations over batches."""

from __future__ import annotations

from typing import Any

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2

from ..edge import current_tenant
from ..errors import InvalidArgument, Unimplemented
from ..manager import DEFAULT_WAIT_S, MAX_WAIT_S, BatchManager
from ..validate import parse_name
from ..views import OperationViews

Context = grpc.aio.ServicerContext[Any, Any]


class OperationsService(operations_pb2_grpc.OperationsServicer):  # type: ignore[misc]
    """Get, List, Wait, Cancel and Delete batches as operations."""

    def __init__(self, manager: BatchManager, views: OperationViews) -> None:
        self._manager = manager
        self._views = views

    async def GetOperation(
        self, request: operations_pb2.GetOperationRequest, context: Context
    ) -> operations_pb2.Operation:
        """The batch as an operation, with live metadata."""
        view = await self._views.get(current_tenant(), parse_name(request.name, "batches"))
        return view.operation

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
            operations=[self._views.listed(b) for b in batches],
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
        view = await self._views.wait(current_tenant(), batch_id, timeout)
        return view.operation

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
