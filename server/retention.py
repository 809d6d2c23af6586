"""Retention: done batches and their generated files are purged after a while.

A batch done for longer than ``retention`` (counted from its end time) is
deleted with its requests, its webhook deliveries and its generated responses
file, row and bytes, as if a client had deleted it: it is NOT_FOUND
afterwards. On start, deliveries whose batch is already gone (versions before
this one kept them after a delete) are deleted too. Input files are not
touched here; uploads follow ``file_ttl`` (``file_manager.FileExpiry``).

The purge runs in small transactions (``max_batches`` batches and at most
``max_requests`` request rows each) so that it never holds the store's single
writer for long, however much has piled up.

Replicas sharing a database take turns: a sweep runs under the store's
``retention`` lease (``leases.held``), renewed before every step and passed
to each step's write, which the store refuses once the lease is lost; a
replica that finds the lease held skips that round.
"""

from __future__ import annotations

import asyncio
import logging

from .domain import now_us
from .files import FileBytes
from .leases import held, lease_owner
from .outputs import Outputs
from .store import LeaseLost, Store

log = logging.getLogger("longbatch.retention")

MAX_INTERVAL_S = 3600.0
MIN_INTERVAL_S = 0.05
LEASE = "retention"
"""The lease a sweep runs under (``store.LeaseStore``)."""
LEASE_TTL_S = 60.0
"""How long the lease lasts past each renewal: well over one bounded step."""


class RetentionPurge:
    """Periodically deletes batches done longer ago than ``retention_s``.

    Runs every ``min(1 h, retention / 20)``, at least 50 ms apart.
    """

    def __init__(
        self,
        store: Store,
        storage: FileBytes,
        outputs: Outputs,
        retention_s: float,
        max_batches: int = 500,
        max_requests: int = 20_000,
        lease_ttl_s: float = LEASE_TTL_S,
    ) -> None:
        self._store = store
        self._storage = storage
        self._outputs = outputs
        self._retention_us = int(retention_s * 1_000_000)
        self._max_batches = max_batches
        self._max_requests = max_requests
        if max_batches < 1 or max_requests < 1:
            raise ValueError("each purge step must be allowed at least one batch and one request")
        self.interval_s = max(MIN_INTERVAL_S, min(MAX_INTERVAL_S, retention_s / 20))
        self._lease_ttl_s = lease_ttl_s
        self._owner = lease_owner("retention")
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        """Start the periodic purge."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="longbatch-retention")

    async def stop(self) -> None:
        """Stop the purge once the step in progress is done; safe to call twice.

        No cancellation: a step cut off after its commit would leave the
        bytes of the files it removed behind. A step is short by design.
        """
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            await task

    async def _run(self) -> None:
        try:
            await self.delete_orphan_deliveries()
        except Exception:
            # Harmless to leave: they are retried on the next start.
            log.exception("deleting webhook deliveries of deleted batches failed")
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
                return  # stop() was called
            except TimeoutError:
                pass  # time for a sweep
            try:
                await self.sweep()
            except Exception:
                log.exception("retention purge failed; retrying in %.3g s", self.interval_s)

    async def sweep(self) -> int:
        """Purge everything past retention by now; return how many batches
        went (0 when another holder of the lease is sweeping)."""
        cutoff = now_us() - self._retention_us
        purged = 0
        async with held(self._store, LEASE, self._owner, self._lease_ttl_s) as lease:
            if lease is None:
                return 0
            while True:
                try:
                    step = await self._store.purge_done_batches(cutoff, self._max_batches, self._max_requests,
                                                                lease=lease.lease)
                except LeaseLost:
                    log.warning("retention lease lost mid-sweep; another replica goes on")
                    break
                # Bytes go only once their rows are gone: a crash in between
                # leaves an unlisted file on disk, never a listed file without bytes.
                if step.file_ids:
                    await self._storage.remove(step.file_ids)
                for batch_id in step.batch_ids:
                    self._outputs.forget(batch_id)
                purged += len(step.batch_ids)
                if not step.more or self._stopping.is_set():
                    break
                # Between steps the writer is free for others: asyncio.Lock
                # serves waiters in order, so clients' writes get in here.
                # The renewal gives the next step a whole TTL.
                if not await lease.keep():
                    break
        if purged:
            log.info("purged %d batch(es) done more than %.6g s ago", purged, self._retention_us / 1_000_000)
        return purged

    async def delete_orphan_deliveries(self) -> int:
        """Delete webhook deliveries whose batch is gone, in bounded steps,
        under the retention lease; return how many went."""
        deleted = 0
        async with held(self._store, LEASE, self._owner, self._lease_ttl_s) as lease:
            while lease is not None and not self._stopping.is_set():
                step = await self._store.delete_orphan_webhook_deliveries(self._max_batches)
                deleted += step
                if step < self._max_batches or not await lease.keep():
                    break
        if deleted:
            log.info("deleted %d webhook deliveries of batches deleted before", deleted)
        return deleted
