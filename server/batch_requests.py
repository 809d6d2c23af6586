"""Create and update requests, as both surfaces receive them: the checks
that sit between a parsed request message and ``BatchManager``.

The gRPC BatchService and the REST handlers parse their wire format into the
same protobuf request messages and call these; the answer is the manager's
view, which each surface converts.
"""

from __future__ import annotations

from . import convert
from .config import Limits, WebhookSettings
from .errors import InvalidArgument
from .manager import BatchManager, BatchView
from .netguard import AllowList
from .validate import MAX_DISPLAY_NAME, parse_name, validate_create

UPDATABLE = ("display_name", "priority")
"""The batch fields an update_mask may name."""


class BatchRequests:
    """Validates create and update requests, then calls the manager."""

    def __init__(self, manager: BatchManager, limits: Limits, webhooks: WebhookSettings | None = None) -> None:
        self.manager = manager
        self._limits = limits
        # Literal webhook addresses the delivery guard would refuse are
        # refused here already, where the caller can still fix them.
        self._webhook_allow = AllowList.parse(webhooks.allow if webhooks else ())

    async def create(self, tenant: str, batch: convert.BatchMessage | None, request_id: str) -> BatchView:
        """Create a batch from its message (generate or embed, by its type)."""
        if batch is None:
            raise InvalidArgument("batch is required", violations=[("batch", "is required")])
        valid = validate_create(batch, request_id, self._limits, self._webhook_allow)
        return await self.manager.create(tenant, valid, request_id)

    async def update(self, tenant: str, batch: convert.BatchMessage, paths: list[str], kind: str) -> BatchView:
        """Change the fields of ``batch`` that ``paths`` name (display_name, priority)."""
        batch_id = parse_name(batch.name, "batches", "batch.name")
        if not paths:
            raise InvalidArgument("update_mask must name display_name and/or priority",
                                  violations=[("update_mask", "must not be empty")])
        bad = [p for p in paths if p not in UPDATABLE]
        if bad:
            raise InvalidArgument(
                f"update_mask path {bad[0][:80]!r} cannot be updated; updatable: {', '.join(UPDATABLE)}",
                reason="FIELD_NOT_UPDATABLE",
                violations=[("update_mask.paths", f"{p[:80]!r} is not updatable") for p in bad[:20]],
            )
        if "display_name" in paths and len(batch.display_name) > MAX_DISPLAY_NAME:
            raise InvalidArgument(f"batch.display_name is longer than {MAX_DISPLAY_NAME} characters",
                                  violations=[("batch.display_name", "too long")])
        return await self.manager.update(
            tenant, batch_id, kind,
            display_name=batch.display_name if "display_name" in paths else None,
            priority=batch.priority if "priority" in paths else None,
        )
