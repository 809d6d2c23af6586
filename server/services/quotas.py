"""longbatch.v1.QuotaService: the caller's quotas and what it uses of them."""

from __future__ import annotations

from typing import Any

import grpc

from longbatch.v1 import quota_pb2, quota_pb2_grpc

from ..edge import current_tenant
from ..quotas import DESCRIPTIONS, Quotas


class QuotaService(quota_pb2_grpc.QuotaServiceServicer):
    """Reports each quota of the calling tenant with its current use."""

    def __init__(self, quotas: Quotas) -> None:
        self._quotas = quotas

    async def GetUsage(self, request: quota_pb2.GetUsageRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> quota_pb2.GetUsageResponse:
        """Every quota of the caller's tenant, with its use now."""
        tenant = current_tenant()
        response = quota_pb2.GetUsageResponse(tenant=tenant)
        for use in await self._quotas.usage(tenant):
            row = response.quotas.add(name=use.name, description=DESCRIPTIONS[use.name], used=use.used,
                                      limit=use.limit or 0, unlimited=use.limit is None)
            if use.window_s is not None:
                row.window.FromNanoseconds(int(use.window_s * 1e9))
        return response
