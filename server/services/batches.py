"""longbatch.v1.BatchService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.longrunning import operations_pb2

from longbatch.v1 import batch_pb2, batch_pb2_grpc

from .. import convert
from ..config import Limits, WebhookSettings
from ..edge import current_tenant
from ..errors import InvalidArgument
from ..manager import BatchManager
from ..netguard import AllowList
from ..validate import MAX_DISPLAY_NAME, parse_name, validate_create

Context = grpc.aio.ServicerContext[Any, Any]
_UPDATABLE = ("display_name", "priority")


class BatchService(batch_pb2_grpc.BatchServiceServicer):
    """Creates and updates batches and streams their results."""

    def __init__(self, manager: BatchManager, limits: Limits, webhooks: WebhookSettings | None = None) -> None:
        self._manager = manager
        self._limits = limits
        # Literal webhook addresses the delivery guard would refuse are
        # refused here already, where the caller can still fix them.
        self._webhook_allow = AllowList.parse(webhooks.allow if webhooks else ())

    async def BatchGenerateContent(
        self, request: batch_pb2.BatchGenerateContentRequest, context: Context
    ) -> operations_pb2.Operation:
        """Create a generation batch."""
        return await self._create(request.batch if request.HasField("batch") else None, request.request_id,
                                  batch_pb2.GenerateContentBatch)

    async def AsyncBatchEmbedContent(
        self, request: batch_pb2.AsyncBatchEmbedContentRequest, context: Context
    ) -> operations_pb2.Operation:
        """Create an embedding batch."""
        return await self._create(request.batch if request.HasField("batch") else None, request.request_id,
                                  batch_pb2.EmbedContentBatch)

    async def _create(self, batch: convert.BatchMessage | None, request_id: str,
                      kind: type[convert.BatchMessage]) -> operations_pb2.Operation:
        if batch is None:
            raise InvalidArgument("batch is required", violations=[("batch", "is required")])
        valid = validate_create(batch, request_id, self._limits, self._webhook_allow)
        view = await self._manager.create(current_tenant(), valid, request_id)
        return convert.operation(view.batch, view.output, view.waiting_reason)

    async def UpdateGenerateContentBatch(
        self, request: batch_pb2.UpdateGenerateContentBatchRequest, context: Context
    ) -> batch_pb2.GenerateContentBatch:
        """Change display_name and/or priority of a generation batch."""
        msg = await self._update(request.batch, list(request.update_mask.paths), "generate")
        assert isinstance(msg, batch_pb2.GenerateContentBatch)
        return msg

    async def UpdateEmbedContentBatch(
        self, request: batch_pb2.UpdateEmbedContentBatchRequest, context: Context
    ) -> batch_pb2.EmbedContentBatch:
        """Change display_name and/or priority of an embedding batch."""
        msg = await self._update(request.batch, list(request.update_mask.paths), "embed")
        assert isinstance(msg, batch_pb2.EmbedContentBatch)
        return msg

    async def _update(self, batch: convert.BatchMessage, paths: list[str], kind: str) -> convert.BatchMessage:
        batch_id = parse_name(batch.name, "batches", "batch.name")
        if not paths:
            raise InvalidArgument("update_mask must name display_name and/or priority",
                                  violations=[("update_mask", "must not be empty")])
        bad = [p for p in paths if p not in _UPDATABLE]
        if bad:
            raise InvalidArgument(
                f"update_mask path {bad[0][:80]!r} cannot be updated; updatable: {', '.join(_UPDATABLE)}",
                reason="FIELD_NOT_UPDATABLE",
                violations=[("update_mask.paths", f"{p[:80]!r} is not updatable") for p in bad[:20]],
            )
        if "display_name" in paths and len(batch.display_name) > MAX_DISPLAY_NAME:
            raise InvalidArgument(f"batch.display_name is longer than {MAX_DISPLAY_NAME} characters",
                                  violations=[("batch.display_name", "too long")])
        view = await self._manager.update(
            current_tenant(), batch_id, kind,
            display_name=batch.display_name if "display_name" in paths else None,
            priority=batch.priority if "priority" in paths else None,
        )
        return convert.batch_message(view.batch, view.output, view.waiting_reason)

    async def StreamBatchResults(
        self, request: batch_pb2.StreamBatchResultsRequest, context: Context
    ) -> AsyncIterator[batch_pb2.BatchResult]:
        """Stream finished results in input order from start_index."""
        batch_id = parse_name(request.name, "batches")
        batch, rows = await self._manager.results(current_tenant(), batch_id, request.start_index)
        async for row in rows:
            yield convert.batch_result(batch.kind, row)
