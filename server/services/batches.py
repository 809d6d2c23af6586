"""longbatch.v1.BatchService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.longrunning import operations_pb2

from longbatch.v1 import batch_pb2, batch_pb2_grpc

from .. import convert
from ..batch_requests import BatchRequests
from ..edge import current_tenant
from ..validate import parse_name

Context = grpc.aio.ServicerContext[Any, Any]


class BatchService(batch_pb2_grpc.BatchServiceServicer):
    """Creates and updates batches and streams their results."""

    def __init__(self, requests: BatchRequests) -> None:
        self._requests = requests
        self._manager = requests.manager

    async def BatchGenerateContent(
        self, request: batch_pb2.BatchGenerateContentRequest, context: Context
    ) -> operations_pb2.Operation:
        """Create a generation batch."""
        view = await self._requests.create(current_tenant(), request.batch if request.HasField("batch") else None,
                                           request.request_id)
        return convert.operation(view.batch, view.output, view.waiting_reason)

    async def AsyncBatchEmbedContent(
        self, request: batch_pb2.AsyncBatchEmbedContentRequest, context: Context
    ) -> operations_pb2.Operation:
        """Create an embedding batch."""
        view = await self._requests.create(current_tenant(), request.batch if request.HasField("batch") else None,
                                           request.request_id)
        return convert.operation(view.batch, view.output, view.waiting_reason)

    async def UpdateGenerateContentBatch(
        self, request: batch_pb2.UpdateGenerateContentBatchRequest, context: Context
    ) -> batch_pb2.GenerateContentBatch:
        """Change display_name and/or priority of a generation batch."""
        view = await self._requests.update(current_tenant(), request.batch, list(request.update_mask.paths),
                                           "generate")
        msg = convert.batch_message(view.batch, view.output, view.waiting_reason)
        assert isinstance(msg, batch_pb2.GenerateContentBatch)
        return msg

    async def UpdateEmbedContentBatch(
        self, request: batch_pb2.UpdateEmbedContentBatchRequest, context: Context
    ) -> batch_pb2.EmbedContentBatch:
        """Change display_name and/or priority of an embedding batch."""
        view = await self._requests.update(current_tenant(), request.batch, list(request.update_mask.paths),
                                           "embed")
        msg = convert.batch_message(view.batch, view.output, view.waiting_reason)
        assert isinstance(msg, batch_pb2.EmbedContentBatch)
        return msg

    async def StreamBatchResults(
        self, request: batch_pb2.StreamBatchResultsRequest, context: Context
    ) -> AsyncIterator[batch_pb2.BatchResult]:
        """Stream finished results in input order from start_index."""
        batch_id = parse_name(request.name, "batches")
        batch, rows = await self._manager.results(current_tenant(), batch_id, request.start_index)
        async for row in rows:
            yield convert.batch_result(batch.kind, row)
