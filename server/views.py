"""Operation views: batches as ``google.longrunning.Operation``s, built once
per version of a batch and shared by every surface.

Polling clients (GetOperation over gRPC, ``GET /v1beta/batches/{id}`` over
HTTP) ask for the same batch again and again while it rarely changes. A
built Operation (and each surface's rendering of it: the gRPC bytes, the REST
JSON) is kept while the batch's ``update_time`` and waiting reason are
unchanged: forever once done (bar a rename), between commits while it runs.
A poll then costs a row read, not a rebuild.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from google.longrunning import operations_pb2

from . import convert
from .domain import Batch
from .manager import BatchManager, BatchView

Render = Callable[[operations_pb2.Operation], bytes]


class OperationView:
    """One version of a batch as an Operation, with renderings made of it."""

    __slots__ = ("_rendered", "operation")

    def __init__(self, operation: operations_pb2.Operation) -> None:
        self.operation = operation
        """The Operation; never mutate it, it is shared."""
        self._rendered: dict[str, bytes] = {}

    def rendered(self, form: str, render: Render) -> bytes:
        """``render(operation)``, made once per ``form`` for this version."""
        out = self._rendered.get(form)
        if out is None:
            out = self._rendered[form] = render(self.operation)
        return out


class OperationViews:
    """Batches as Operations for one tenant at a time, from ``BatchManager``.

    Args:
        manager: the batch use cases.
        entries: versions kept, least recently used dropped first.
        max_bytes: Operations larger than this (a big inline output) are
            built per call rather than kept, so the cache stays small.
    """

    def __init__(self, manager: BatchManager, entries: int = 4096, max_bytes: int = 64 << 10) -> None:
        self._manager = manager
        self._entries = entries
        self._max_bytes = max_bytes
        self._views: OrderedDict[str, tuple[int, str, OperationView]] = OrderedDict()

    async def get(self, tenant: str, batch_id: str) -> OperationView:
        """The tenant's batch as an Operation with live metadata, or NotFound."""
        batch = await self._manager.get_batch(tenant, batch_id)
        # A hit needs no output: reading it (a file name or a cached blob)
        # would cost more than the lookup.
        hit = self._lookup(batch, self._manager.waiting_reason(batch))
        return hit or self.of(await self._manager.view(batch))

    async def wait(self, tenant: str, batch_id: str, timeout_s: float) -> OperationView:
        """The Operation once the batch is done, or after ``timeout_s``."""
        return self.of(await self._manager.wait(tenant, batch_id, timeout_s))

    def listed(self, batch: Batch) -> operations_pb2.Operation:
        """The Operation shown in a list: without the output, which lists leave out."""
        return convert.operation(batch, waiting_reason=self._manager.waiting_reason(batch))

    def of(self, view: BatchView) -> OperationView:
        """The Operation of ``view``: kept, or built (and kept if small)."""
        batch = view.batch
        hit = self._lookup(batch, view.waiting_reason)
        if hit is not None:
            return hit
        built = OperationView(convert.operation(batch, view.output, view.waiting_reason))
        if built.operation.ByteSize() <= self._max_bytes:
            self._views[batch.id] = (batch.update_time_us, view.waiting_reason, built)
            if len(self._views) > self._entries:
                self._views.popitem(last=False)
        return built

    def _lookup(self, batch: Batch, waiting_reason: str) -> OperationView | None:
        hit = self._views.get(batch.id)
        # A paused batch changes no row, so its waiting reason is part of the key.
        if hit is not None and hit[0] == batch.update_time_us and hit[1] == waiting_reason:
            self._views.move_to_end(batch.id)
            return hit[2]
        return None
