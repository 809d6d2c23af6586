"""The storage seam: what the services and the executor need from a store.

The seam is split by concern, one narrow Protocol each (``StoreLifecycle``,
``BatchStore``, ``ItemStore`` for requests and results, ``FileStore``,
``DeliveryStore``, ``LeaseStore`` for work that one replica at a time may
do), so that a component can ask for only what it uses and a
store can be read one concern at a time; ``Store`` combines them. Every
implementation (``sqlite_store.SQLiteStore``, ``pg_store.PostgresStore``)
must pass the same contract suite in tests/server/test_store.py. All
methods are scoped by tenant where a client names the resource; executor
methods take bare ids because they act for the server itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from .domain import Batch, ItemStatus, NewBatch, NewItem, Outcome, PendingItem, ResultRow, State, StoredFile
from .filters import Expr

RawResult = tuple[int, str, bytes | None, int, bytes | None]
"""A stored request as a worker process reads it: idx, key, metadata,
ItemStatus value, result (None while PENDING)."""
ResultReader = Callable[[int, int], list[RawResult]]
Answerer = Callable[[list[bytes]], list[bytes]]
"""Serialized responses to serialized requests, one each, in order."""


class RangeRun(NamedTuple):
    """What a ``RangeRunner`` did."""

    answered: bool
    """False when the answerer failed (raised, or did not give one bytes
    answer per request):
    nothing was written, and the range is the caller's to run another way."""
    batch: Batch | None
    """The batch after the write; None when nothing was left to write or
    the batch takes no more results."""


RangeRunner = Callable[[int, int, Answerer], RangeRun]
"""Runs the PENDING requests of one batch with ``lo <= idx < hi`` from any
process: reads them, answers them all in one call, and records the answers
(SUCCEEDED) and the counters in one transaction."""


class StoreLifecycle(Protocol):
    """Opening and closing a store, and what belongs to the whole store: its secrets and a
    tenant's usage as the quotas count it."""

    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    async def close(self) -> None:
        """Flush and disconnect; safe to call twice."""

    async def secret(self, name: str, size: int = 32) -> bytes:
        """A random server secret, created on first use and kept forever."""

    async def usage(self, tenant: str) -> TenantUsage:
        """What ``tenant`` holds now, as the quotas count it."""


class BatchStore(Protocol):
    """Batches as resources and through their lifecycle: created (with their inline
    requests), read, listed, changed, closed, done, expired, deleted and purged."""

    async def create_batch(
        self, batch: NewBatch, items: Iterable[NewItem], request_id_ttl_us: int, limits: UsageLimits | None = None
    ) -> tuple[Batch, bool]:
        """Store a batch and its requests atomically.

        Returns the batch and True, or, when ``batch.request_id`` was used by
        the same tenant within ``request_id_ttl_us``, the earlier batch and
        False (nothing new stored). Raises ``OverQuota`` (nothing stored)
        when the tenant's unfinished batches or pending requests would go
        over ``limits``, checked in the same transaction as the insert; a
        file batch, whose requests are counted as they are read, needs room
        for one.
        """

    async def get_batch(self, tenant: str | None, batch_id: str) -> Batch | None:
        """The batch, or None if unknown or owned by another tenant.

        ``tenant=None`` skips the tenant check (server-internal use).
        """

    async def list_batches(self, tenant: str, where: Expr, before_seq: int | None, limit: int) -> list[Batch]:
        """Batches newest first, with ``seq < before_seq``, matching ``where``.

        ``where`` is a filter tree (``filters.compile_filter``, or built by
        hand, e.g. ``Compare("request_id", "=", ...)``) over the batch's
        domain fields, which each store renders in its own dialect;
        ``filters.TRUE`` matches every batch.
        """

    async def update_batch(
        self, tenant: str, batch_id: str, *, display_name: str | None, priority: int | None
    ) -> Batch | None:
        """Change display name and/or priority; None if the batch is unknown."""

    async def delete_batch(self, tenant: str, batch_id: str) -> list[str] | None:
        """Delete a done batch with its requests.

        Returns the ids of the generated files to remove, or None if the batch
        is unknown. Raises ``StoreConflict`` if the batch is not done.
        """

    async def unfinished_batches(self) -> list[Batch]:
        """Every batch not done yet, oldest first (for the executor's start)."""

    async def mark_running(self, batch_id: str) -> None:
        """Move a PENDING batch to RUNNING."""

    async def close_batch(self, batch_id: str, state: State, error: bytes | None, rest: ItemStatus) -> Batch | None:
        """Give a batch its terminal state; its unfinished requests count as
        ``rest`` (and read as ``rest`` from now on).

        The state goes to ``final_state``; a batch already closed keeps its
        first one (a restart re-closing a batch, a cancel racing completion).
        ``state`` and ``done`` change together in ``mark_done``. Returns None
        if unknown.
        """

    async def mark_done(self, batch_id: str, output_file: str | None) -> Batch | None:
        """Make a closed batch ``done`` with ``state = final_state``; after
        this it never changes."""

    def count_batches_by_state(self) -> dict[State, int]:
        """How many batches the store holds in each state (every state but
        UNSPECIFIED, 0 included), now. Synchronous and cheap whatever the
        number of batches (the metrics page reads it on every scrape): a
        store keeps these counts as batches change rather than counting."""

    async def expired_batches(self, created_before_us: int) -> list[str]:
        """Ids of batches not done that were created before the given time."""

    async def purge_done_batches(self, ended_before_us: int, max_batches: int, max_requests: int, *,
                                 lease: Lease | None = None) -> Purged:
        """One bounded step of retention, in one transaction: delete batches done
        before ``ended_before_us`` (oldest end first), at most ``max_batches``,
        with their requests and generated file rows, and at most
        ``max_requests`` request rows. A batch with more requests than that
        loses them ``max_requests`` at a time, last first, over several steps;
        its row goes with the last of them. Input files are left alone.

        With ``lease``, a fenced write (see ``LeaseStore``): raises
        ``LeaseLost``, nothing deleted, unless the lease is live."""


class ItemStore(Protocol):
    """The requests of a batch and their results: ingest from an input file, the
    executor's reads and writes, and reading results back for output."""

    async def append_requests(self, batch_id: str, first_idx: int, flat: Sequence[int | str | bytes],
                              max_pending: int | None = None) -> None:
        """Add requests read from a batch's input file, in one transaction.

        ``flat`` holds ``(offset, key, payload)`` triples back to back; each
        request's idx is ``first_idx + offset``. Flat, because a million
        requests must not become a million objects on their way in. Raises
        ``OverQuota`` (nothing added) when the tenant's pending requests
        would go over ``max_pending``.
        """

    async def finish_ingest(self, batch_id: str, request_count: int) -> Batch | None:
        """Mark a batch's requests complete (``ingested``); it may run from now on."""

    async def reset_ingest(self, batch_id: str) -> None:
        """Drop the requests of a batch whose ingest did not complete."""

    async def pending_items(self, batch_id: str, from_idx: int, limit: int) -> list[PendingItem]:
        """Up to ``limit`` PENDING requests with ``idx >= from_idx``, by idx."""

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> dict[str, Batch]:
        """Persist results of PENDING requests and bump the counters.

        Results for requests no longer PENDING are ignored, so a request is
        never counted twice. Returns the touched batches after the write.
        """

    async def record_results(self, batch_id: str, status: ItemStatus, idxs: Sequence[int],
                             results: Sequence[bytes]) -> Batch | None:
        """record_outcomes for results of one batch with one status, given
        as columns (the executor's bulk path: no object per result). Returns
        the batch after the write, or None if it takes no more results."""

    async def results(self, batch_id: str, start_idx: int, limit: int, *, to_first_pending: bool = True
                      ) -> list[ResultRow]:
        """Requests with ``idx >= start_idx`` in idx order, stopping at the
        first unfinished one unless ``to_first_pending`` is False."""

    async def finished_count(self, batch: Batch, lo: int, hi: int) -> int:
        """How many of ``batch``'s requests with ``lo <= idx < hi`` have a
        result (are no longer PENDING)."""

    async def output_size(self, batch_id: str) -> int:
        """Bytes of all results and metadata of a batch (to size its output)."""

    def result_reader(self, batch: Batch) -> ResultReader | None:
        """A picklable function that reads ``batch``'s rows with
        ``lo <= idx < hi`` from any process, for rendering outputs in worker
        processes; None when the store cannot be read from elsewhere."""

    def range_runner(self, batch: Batch) -> RangeRunner | None:
        """A picklable function that runs ranges of ``batch``'s requests in
        a worker process (see ``RangeRunner``); None when the store cannot
        be written from elsewhere."""


class FileStore(Protocol):
    """File records (their bytes live elsewhere: the data dir, for SQLite)."""

    async def add_file(self, file: StoredFile, limits: UsageLimits | None = None) -> None:
        """Record a file whose bytes are already in place. Raises
        ``OverQuota`` (nothing recorded) when the tenant's files or their
        bytes would go over ``limits``, checked in the insert's transaction."""

    async def get_file(self, tenant: str | None, file_id: str) -> StoredFile | None:
        """The file, or None if unknown or owned by another tenant."""

    async def list_files(self, tenant: str, before_seq: int | None, limit: int) -> list[StoredFile]:
        """Files newest first with ``seq < before_seq``."""

    async def delete_file(self, tenant: str, file_id: str, *, lease: Lease | None = None) -> bool:
        """Forget a file; False if unknown. Raises ``StoreConflict`` while a
        batch that is not done reads it. With ``lease``, a fenced write (see
        ``LeaseStore``): raises ``LeaseLost``, nothing deleted, unless the
        lease is live."""

    async def expired_files(self, now_us: int, limit: int = 1000) -> list[StoredFile]:
        """Up to ``limit`` files whose expire time is at or before ``now_us``,
        oldest first, leaving out those a batch that is not done reads."""


class DeliveryStore(Protocol):
    """Durable webhook deliveries (server/webhooks.py), one per (batch, uri), with retry state."""

    async def add_webhook_deliveries(self, deliveries: Sequence[WebhookDelivery]) -> int:
        """Store new PENDING deliveries; one already stored for the same
        (batch, uri) is kept as it is, and none is stored for a batch that
        is gone. Returns how many were added.

        A batch's deliveries, pending or not, are deleted with it by
        ``delete_batch`` and ``purge_done_batches``."""

    async def delete_orphan_webhook_deliveries(self, limit: int) -> int:
        """Delete up to ``limit`` deliveries whose batch no longer exists
        (left by versions that kept them); returns how many went."""

    async def batches_missing_webhooks(self) -> list[Batch]:
        """Done batches with a webhook config but no delivery stored (the
        process died between ``mark_done`` and enqueueing them)."""

    async def due_webhook_deliveries(self, now_us: int, limit: int) -> list[WebhookDelivery]:
        """Up to ``limit`` PENDING deliveries due at ``now_us``, earliest first
        (claimed or not: a read, for inspection)."""

    async def claim_webhook_deliveries(self, now_us: int, limit: int, claim_s: float) -> list[WebhookDelivery]:
        """Claim up to ``limit`` PENDING deliveries due at ``now_us`` that no
        live claim holds, earliest first, for ``claim_s`` seconds on the
        store's clock (see ``LeaseStore``), in one write: dispatchers sharing
        the store never get the same delivery while its claim lasts. Each
        comes with its ``claim`` token, greater than that of any earlier
        claim of it, for ``record_webhook_attempt``."""

    async def next_webhook_time(self, after_us: int) -> int | None:
        """The earliest time after ``after_us`` at which a PENDING delivery
        comes due: its attempt time, or, while a claim holds it, the claim's
        end (when a dispatcher that died holding it leaves it to others)."""

    async def record_webhook_attempt(
        self, delivery_id: str, attempts: int, status: DeliveryStatus, next_attempt_us: int, error: str | None,
        *, claim: int | None = None,
    ) -> bool:
        """Store the outcome of an attempt: its count, status and next time,
        and end its claim. With ``claim``, only while that is the delivery's
        latest claim (a dispatcher whose claim ran out and was taken over
        writes nothing). Whether it was stored."""


class LeaseStore(Protocol):
    """Named leases with fencing tokens: what one replica at a time may do
    (a retention step, a file expiry sweep) is done under one.

    A lease ``name`` is held by at most one owner at a time, until its TTL
    runs out on the store's clock (PostgreSQL: the database's ``now()``, the
    same for every replica; SQLite: this process's clock, as every other
    time it stores). Every grant of a name carries a token greater than any
    earlier grant's, whoever the owners: a token identifies one grant.

    A lease is *live* while its grant is the name's latest and its TTL has
    not run out. The holder must not count on having it beyond that: it can
    expire while the holder is busy or paused, and another owner take it.

    Fenced writes: a write that must not commit under a lost lease takes a
    ``lease=`` argument (``purge_done_batches``, ``delete_file``; a later
    writer such as the executor adds the same argument to its writes). The
    store checks the lease inside that write's own transaction, before
    anything else, and raises ``LeaseLost`` with nothing written unless it
    is live; the check also keeps the lease from being granted to anyone
    else until that transaction ends (PostgreSQL: a share lock on the
    lease's row, which a grant must update; SQLite: the one writer), so the
    write commits either under the live lease or not at all. ``holds_lease``
    is the same check on its own, for a holder deciding whether to go on;
    acting on its answer later is not fenced.
    """

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> Lease | None:
        """Grant ``name`` to ``owner`` for ``ttl_s`` seconds if no live lease
        holds it (never held, released, or expired), with a new, greater
        token; None while it is held, by this owner too (use
        ``renew_lease``)."""

    async def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        """Extend a live lease to ``ttl_s`` seconds from now; False (nothing
        changed) once it is not live: expired, released, or granted again."""

    async def release_lease(self, lease: Lease) -> None:
        """End the lease now, so another owner may take it at once; nothing
        happens unless it is the name's latest grant. Tokens are kept: the
        next grant's is still greater."""

    async def holds_lease(self, lease: Lease) -> bool:
        """Whether the lease is live now."""


class Store(StoreLifecycle, BatchStore, ItemStore, FileStore, DeliveryStore, LeaseStore, Protocol):
    """Persistent state of batches, their requests and results, files, webhook
    deliveries and leases: every concern's Protocol in one, what the server is
    composed with."""


@dataclass(frozen=True, slots=True)
class Lease:
    """One grant of a named lease (see ``LeaseStore``)."""

    name: str
    owner: str
    """Who asked for it: unique per process and task, e.g. a random id."""
    token: int
    """The fencing token: greater than that of every earlier grant of ``name``."""


class LeaseLost(Exception):
    """A fenced write found its lease no longer live; nothing was written."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(f"lease {lease.name!r} (token {lease.token}) is no longer held by {lease.owner!r}")
        self.lease = lease


@dataclass(frozen=True, slots=True)
class Purged:
    """What one step of ``purge_done_batches`` removed."""

    batch_ids: list[str]
    """Batches deleted entirely."""
    file_ids: list[str]
    """Generated files whose rows went with them: their bytes are the caller's to delete."""
    more: bool
    """True when work may remain before the cutoff: call again."""


class StoreConflict(Exception):
    """The change is not allowed in the resource's current state."""


class DeliveryStatus(enum.StrEnum):
    """Where a webhook delivery stands; DELIVERED and FAILED are final."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class UsageLimits(NamedTuple):
    """The quotas a store checks inside its write transactions; None lifts one."""

    stored_bytes: int | None = None
    files: int | None = None
    unfinished_batches: int | None = None
    pending_requests: int | None = None


class TenantUsage(NamedTuple):
    """What one tenant holds, as the quotas count it."""

    stored_bytes: int
    """Bytes of its files, uploaded and generated."""
    files: int
    """Its files, uploaded and generated."""
    unfinished_batches: int
    """Its batches not done."""
    pending_requests: int
    """Requests of its batches not done that have no result yet (a file
    batch's as far as its input has been read)."""


class OverQuota(Exception):
    """A write would take a tenant over one of its ``UsageLimits``; nothing was written."""

    def __init__(self, quota: str, used: int, limit: int, adding: int) -> None:
        super().__init__(f"{quota}: {used} used, {adding} more asked, limit {limit}")
        self.quota = quota
        """The ``UsageLimits`` field, e.g. ``stored_bytes``."""
        self.used = used
        """The use before this write."""
        self.limit = limit
        self.adding = adding
        """What this write would have added."""


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One notification of one batch to one URI, with its retry state."""

    id: str
    """Random id, sent as ``X-Longbatch-Delivery`` so receivers can drop repeats."""
    batch_id: str
    uri: str
    body: bytes
    """The JSON body, fixed at enqueue time: every attempt sends (and signs) the same bytes."""
    attempts: int
    """Attempts made so far."""
    next_attempt_us: int
    """When the next attempt is due, microseconds since the epoch."""
    claim: int = 0
    """The token of the claim it was read under (``claim_webhook_deliveries``); 0 unclaimed."""
