"""Batch use cases, between the gRPC servicers and the store/executor.

Servicers parse and convert; the rules of API.md section 4 live here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from .backends import supported_kinds
from .config import Limits, ModelConfig
from .domain import Batch, BatchKind, NewBatch, ResultRow, now_us
from .errors import FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded
from .executor import Executor
from .files import FileBytes, new_id
from .filters import BATCH_FILTER_FIELDS, Compare, FilterError, compile_filter
from .notifier import Notifier
from .outputs import Outputs
from .paging import PageTokens, read_page_request
from .quotas import Quotas
from .store import OverQuota, Store, StoreConflict
from .validate import ValidBatch

MAX_WAIT_S = 600.0
DEFAULT_WAIT_S = 60.0


@dataclass(frozen=True)
class BatchView:
    """A batch with its output (set once done)."""

    batch: Batch
    output: bytes | None
    waiting_reason: str = ""
    """Why its requests are not running now; empty while they run and once done."""


class BatchManager:
    """Creates, reads, changes and ends batches for one tenant at a time."""

    def __init__(
        self,
        store: Store,
        executor: Executor,
        outputs: Outputs,
        notifier: Notifier,
        files: FileBytes,
        models: Mapping[str, ModelConfig],
        limits: Limits,
        page_tokens: PageTokens,
        quotas: Quotas | None = None,
    ) -> None:
        self._store = store
        self._executor = executor
        self._outputs = outputs
        self._notifier = notifier
        self._files = files
        self._models = models
        self._limits = limits
        self._tokens = page_tokens
        self._quotas = quotas

    async def create(self, tenant: str, valid: ValidBatch, request_id: str) -> BatchView:
        """Store a validated batch and schedule it; idempotent on ``request_id``."""
        if valid.model not in self._models:
            raise NotFound(f"model {valid.model} not found; see `longbatch models`", reason="MODEL_NOT_FOUND",
                           violations=[("batch.model", "is not a configured model")])
        if valid.kind not in supported_kinds(self._models[valid.model].backend):
            method = "batchGenerateContent" if valid.kind is BatchKind.GENERATE else "asyncBatchEmbedContent"
            raise InvalidArgument(f"model {valid.model} does not support {method}; see `longbatch models`",
                                  reason="METHOD_NOT_SUPPORTED",
                                  violations=[("batch.model", f"does not support {method}")])
        input_file = None
        if valid.file_name is not None:
            input_file = valid.file_name.removeprefix("files/")
            if await self._store.get_file(tenant, input_file) is None:
                raise NotFound(f"{valid.file_name} not found", reason="FILE_NOT_FOUND",
                               violations=[("batch.input_config.file_name", "no such file")])
        new = NewBatch(
            id=new_id(), tenant=tenant, kind=valid.kind, model=valid.model, display_name=valid.display_name,
            priority=valid.priority, input_file=input_file, webhook=valid.webhook, request_id=request_id or None,
        )
        ttl_us = int(self._limits.request_id_ttl_s * 1_000_000)
        if self._quotas is None:
            batch, created = await self._store.create_batch(new, valid.items, ttl_us)
        else:
            batch, created = await self._create_within_quotas(self._quotas, new, valid, ttl_us)
        if created:
            self._executor.submit(batch)
        elif batch.kind is not valid.kind:
            raise InvalidArgument(f"request_id was already used for {batch.name}, a {batch.kind.value} batch",
                                  reason="REQUEST_ID_REUSED", violations=[("request_id", "already used")])
        return await self.view(batch)

    async def _create_within_quotas(self, quotas: Quotas, new: NewBatch, valid: ValidBatch, ttl_us: int
                                    ) -> tuple[Batch, bool]:
        """``Store.create_batch`` within the tenant's quotas: a place in its
        create window first, then the store's counts in the insert's
        transaction. A repeated ``request_id`` answers with its batch even
        when the window is full, as it creates nothing."""
        tenant = new.tenant
        try:
            slot = quotas.take_create(tenant)
        except QuotaExceeded:
            earlier = await self._earlier(tenant, new.request_id, ttl_us)
            if earlier is None:
                raise
            return earlier, False
        try:
            batch, created = await self._store.create_batch(new, valid.items, ttl_us, quotas.store_limits(tenant))
        except OverQuota as e:
            slot.release()
            asked = ("this batch would be one more" if e.quota == "unfinished_batches"
                     else f"this batch adds {len(valid.items)}" if valid.items
                     else "a file batch needs room for at least one")
            raise quotas.exceeded(tenant, e, asked) from None
        except BaseException:
            slot.release()
            raise
        if not created:
            slot.release()  # the same request_id again: nothing new was made
        return batch, created

    async def _earlier(self, tenant: str, request_id: str | None, ttl_us: int) -> Batch | None:
        """The tenant's batch made with ``request_id`` within ``ttl_us``, if any."""
        if not request_id:
            return None
        rows = await self._store.list_batches(tenant, Compare("request_id", "=", request_id), None, 1)
        if rows and rows[0].create_time_us > now_us() - ttl_us:
            return rows[0]
        return None

    async def view(self, batch: Batch) -> BatchView:
        """``batch`` with its output once done, or why it waits while not."""
        if not batch.done:
            return BatchView(batch, None, self.waiting_reason(batch))
        return BatchView(batch, await self._outputs.output(batch))

    def waiting_reason(self, batch: Batch) -> str:
        """Why the batch's requests are not running now (its model's backend
        unreachable, say); empty while they run and once the batch is done."""
        return "" if batch.done else self._executor.waiting_reason(batch.model)

    async def get_batch(self, tenant: str, batch_id: str) -> Batch:
        """The tenant's batch with live stats, or NotFound."""
        batch = await self._store.get_batch(tenant, batch_id)
        if batch is None:
            raise NotFound(f"batches/{batch_id} not found", reason="BATCH_NOT_FOUND")
        return batch

    async def get(self, tenant: str, batch_id: str) -> BatchView:
        """The batch with live stats, and its output once done."""
        return await self.view(await self.get_batch(tenant, batch_id))

    async def list(self, tenant: str, collection: str, filter_text: str, page_size: int,
                   page_token: str) -> tuple[list[Batch], str]:
        """A page of batches, newest first, and the next page token."""
        if collection not in ("", "batches"):
            raise InvalidArgument(f"name must be 'batches' or empty, got {collection[:80]!r}",
                                  violations=[("name", "must be 'batches' or empty")])
        try:
            where = compile_filter(filter_text, BATCH_FILTER_FIELDS)
        except FilterError as e:
            raise InvalidArgument(f"invalid filter: {e}", reason="INVALID_FILTER",
                                  violations=[("filter", str(e))]) from None
        scope = f"batches\x00{tenant}\x00{filter_text}"
        size, position = read_page_request(self._tokens, page_size, page_token, scope)
        assert position is None or isinstance(position, int)
        before = position
        rows = await self._store.list_batches(tenant, where, before, size + 1)
        page = rows[:size]
        token = self._tokens.encode(scope, (page[-1].seq,)) if len(rows) > size else ""
        return page, token

    async def update(self, tenant: str, batch_id: str, kind_expected: str, display_name: str | None,
                     priority: int | None) -> BatchView:
        """Change display name (any time) and/or priority (only while not done)."""
        batch = await self.get_batch(tenant, batch_id)
        if batch.kind.value != kind_expected:
            raise InvalidArgument(f"{batch.name} is a {batch.kind.value} batch; use the matching Update method",
                                  reason="WRONG_BATCH_KIND", violations=[("batch.name", "wrong batch kind")])
        if priority is not None and batch.done:
            raise FailedPrecondition(f"{batch.name} is done; its priority can no longer change",
                                     reason="BATCH_DONE")
        updated = await self._store.update_batch(tenant, batch_id, display_name=display_name, priority=priority)
        if updated is None:
            raise NotFound(f"batches/{batch_id} not found", reason="BATCH_NOT_FOUND")
        if priority is not None:
            # Committed: reorder here at once, and have every replica do so.
            await self._executor.priority_changed(batch_id, priority)
        return await self.view(updated)

    async def cancel(self, tenant: str, batch_id: str) -> None:
        """Cancel a batch that is not done; no-op on a done one.

        Returns once the cancel is recorded (``Executor.cancel``: its work
        here stopped, every replica told to stop theirs).
        """
        batch = await self.get_batch(tenant, batch_id)
        if not batch.done:
            await self._executor.cancel(batch_id)

    async def delete(self, tenant: str, batch_id: str) -> None:
        """Delete a done batch with its results and generated files."""
        try:
            file_ids = await self._store.delete_batch(tenant, batch_id)
        except StoreConflict:
            raise FailedPrecondition(f"batches/{batch_id} is still running; cancel it first",
                                     reason="BATCH_NOT_DONE") from None
        if file_ids is None:
            raise NotFound(f"batches/{batch_id} not found", reason="BATCH_NOT_FOUND")
        self._outputs.forget(batch_id)
        await self._files.remove(file_ids)

    async def wait(self, tenant: str, batch_id: str, timeout_s: float) -> BatchView:
        """Return once the batch is done or ``timeout_s`` has passed.

        A wake-up only says "read it again": one that finds the batch not
        done (a resync after a reconnect wakes every waiter, say) goes back
        to waiting for the rest of ``timeout_s``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            # Subscribed before each read, so a completion between the read
            # and the wait is not missed (a wake-up consumes the subscription).
            waiter = self._notifier.subscribe(batch_id)
            try:
                batch = await self.get_batch(tenant, batch_id)
                left = deadline - loop.time()
                if batch.done or left <= 0:
                    break
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), left)
                except TimeoutError:
                    pass  # read once more: it may have become done just now
            finally:
                self._notifier.unsubscribe(batch_id, waiter)
        return await self.view(batch)

    async def results(self, tenant: str, batch_id: str, start_index: int) -> tuple[Batch, AsyncIterator[ResultRow]]:
        """The batch and its finished results in order from ``start_index``."""
        if start_index < 0:
            raise InvalidArgument("start_index must not be negative",
                                  violations=[("start_index", "must not be negative")])
        batch = await self.get_batch(tenant, batch_id)
        return batch, self._outputs.rows(batch, start_index)
