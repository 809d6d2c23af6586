"""Per-tenant quotas: what each tenant may store and create (issue 12, item 3).

Five limits per tenant (``config.TenantQuota``, ``[quotas]`` in the config):

    max_stored_bytes        bytes of the tenant's files, uploaded and generated
    max_files               the tenant's files, uploaded and generated
    max_unfinished_batches  its batches not done
    max_pending_requests    requests of those batches without a result yet
    max_creates             batch creates and uploads in any ``create_window``

Going over one is RESOURCE_EXHAUSTED (``errors.QuotaExceeded``: ErrorInfo
reason ``QUOTA_EXCEEDED`` plus a ``google.rpc.QuotaFailure``). Where each is
checked, and why no two concurrent creates can overshoot:

* Files, batches and pending requests are counted and checked inside the
  store's write transaction that would add to them (``create_batch``,
  ``add_file``, ``append_requests``): the store runs its transactions one at
  a time on one writer thread, so the check and the insert cannot be split.
* An upload's bytes are checked as they arrive, against what the tenant
  stores plus what its other uploads in flight have received, so an upload
  over the quota stops being read at the message that crosses it and its
  temp file goes; ``add_file`` checks again, exactly, at the end.
* A file batch's requests are unknown until its input is read: its create
  needs room for one, and each range of requests read is checked as it is
  stored, so a batch whose requests do not fit fails (FAILED, with the same
  error) and its requests are dropped. One uploaded file fed to many batches
  therefore counts one copy per batch.
* ``max_creates`` is a sliding window kept in memory: a restart forgets it.
  A create that stores nothing (refused, a repeated ``request_id``, an upload
  cut off) gives its place back.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from longbatch.client.units import format_bytes

from .config import QuotaSettings, TenantQuota
from .domain import Batch, StoredFile
from .errors import QuotaExceeded
from .ingest import IngestFailed
from .store import OverQuota, Store, TenantUsage, UsageLimits

QUOTA_NAMES = ("max_stored_bytes", "max_files", "max_unfinished_batches", "max_pending_requests", "max_creates")
"""Every quota, in the order GetUsage lists them."""

DESCRIPTIONS = {
    "max_stored_bytes": "bytes of stored files, uploaded and generated",
    "max_files": "stored files, uploaded and generated",
    "max_unfinished_batches": "batches not done",
    "max_pending_requests": "requests of batches not done that have not run",
    "max_creates": "batch creates and file uploads",
}
"""What each quota counts, in words (GetUsage and the error descriptions)."""

clock: Callable[[], float] = time.monotonic
"""Seconds for the create windows, read at each use: tests replace it to
move time without waiting (and without touching the event loop's clock)."""

# OverQuota names the store's UsageLimits field; clients see the config key.
_KEY = {"stored_bytes": "max_stored_bytes", "files": "max_files", "unfinished_batches": "max_unfinished_batches",
        "pending_requests": "max_pending_requests"}


@dataclass(frozen=True)
class QuotaUse:
    """One quota of a tenant with its current use (a GetUsage row)."""

    name: str
    """The config key, e.g. ``max_files``."""
    used: int
    limit: int | None
    """None: no limit."""
    window_s: float | None = None
    """The sliding window, for ``max_creates`` only."""


def _size(n: int) -> str:
    return f"{n} bytes ({format_bytes(n, fixed=False)})" if n >= 1024 else f"{n} bytes"


def quota_error(tenant: str, quota: str, used: int, limit: int, asked: str,
                retry_after_s: float | None = None, window_s: float | None = None) -> QuotaExceeded:
    """The error for ``tenant`` going over ``quota`` (a config key):
    ``used`` of ``limit`` in use, and ``asked`` saying what the call wanted."""
    show = _size if quota == "max_stored_bytes" else str
    within = f" in the last {window_s:g} s" if window_s is not None else ""
    description = (f"{quota} ({DESCRIPTIONS[quota]}{within}): {show(used)} used of a limit of {show(limit)}; "
                   f"{asked}")
    message = f"quota exceeded: {description}"
    if retry_after_s is not None:
        message += f"; retry in {retry_after_s:.3g} s"
    else:
        message += "; delete what is no longer needed, or ask the server's operator for more"
    metadata = {"quota": quota, "tenant": tenant, "used": str(used), "limit": str(limit)}
    return QuotaExceeded(message, subject=f"tenants/{tenant}/quotas/{quota}", description=description,
                         metadata=metadata, retry_after_s=retry_after_s)


@dataclass
class _Ledger:
    """A tenant's quota state kept in memory (one per tenant seen)."""

    creates: deque[float] = field(default_factory=deque)
    """Monotonic times of the creates within the window, oldest first."""
    upload_bytes: int = 0
    """Bytes received so far by the tenant's uploads in flight."""
    uploads: int = 0
    """The tenant's uploads in flight."""
    committed_bytes: int = 0
    """Bytes of the uploads stored since the server started (only grows): an
    upload in flight adds what others stored since it began to its snapshot."""


class CreateSlot:
    """A place taken in a tenant's create window; ``release`` gives it back
    when the create stored nothing."""

    def __init__(self, ledger: _Ledger | None, at: float) -> None:
        self._ledger = ledger
        self._at = at

    def release(self) -> None:
        """Give the place back; safe to call twice."""
        ledger, self._ledger = self._ledger, None
        if ledger is not None:
            try:
                ledger.creates.remove(self._at)
            except ValueError:
                pass  # it left the window meanwhile


class Upload:
    """An upload in flight, counted against its tenant's file quotas."""

    def __init__(self, quotas: Quotas, tenant: str, quota: TenantQuota, ledger: _Ledger, slot: CreateSlot,
                 usage: TenantUsage) -> None:
        self._quotas = quotas
        self._tenant = tenant
        self._quota = quota
        self._ledger = ledger
        self._slot = slot
        self._stored = usage.stored_bytes
        self._committed_at = ledger.committed_bytes
        self.received = 0
        """Bytes of this upload so far."""
        self._open = True

    def _in_use(self) -> int:
        # What is stored (snapshot, plus what other uploads stored since)
        # and what every upload in flight has received, this one included.
        return self._stored + self._ledger.committed_bytes - self._committed_at + self._ledger.upload_bytes

    async def receive(self, size: int) -> None:
        """Count ``size`` more bytes; raise QuotaExceeded (and count none)
        when they would take the tenant over ``max_stored_bytes``."""
        limit = self._quota.max_stored_bytes
        if limit is not None and self._in_use() + size > limit:
            # The snapshot misses deletes made since the upload began: look
            # again before refusing.
            fresh = await self._quotas.store_usage(self._tenant)
            self._stored, self._committed_at = fresh.stored_bytes, self._ledger.committed_bytes
            if self._in_use() + size > limit:
                in_flight = self._ledger.upload_bytes - self.received
                used = self._stored + self._ledger.committed_bytes - self._committed_at
                asked = (f"this upload has sent {_size(self.received)} and its next message adds {size}"
                         + (f", with {_size(in_flight)} of other uploads in flight" if in_flight else ""))
                raise quota_error(self._tenant, "max_stored_bytes", used, limit, asked)
        self.received += size
        self._ledger.upload_bytes += size

    async def add_file(self, stored: StoredFile) -> None:
        """Record the finished file within the quotas (the exact check);
        raise QuotaExceeded when it no longer fits."""
        await self._quotas.add_file(stored)
        self._ledger.committed_bytes += stored.size_bytes
        self._close(kept=True)

    def close(self) -> None:
        """End the upload without a file: its bytes and its create go back."""
        self._close(kept=False)

    def _close(self, kept: bool) -> None:
        if not self._open:
            return
        self._open = False
        self._ledger.upload_bytes -= self.received
        self._ledger.uploads -= 1
        if not kept:
            self._slot.release()


class Quotas:
    """Checks and reports the quotas of every tenant."""

    def __init__(self, settings: QuotaSettings, store: Store, open_server: bool) -> None:
        self._settings = settings
        self._store = store
        self._open = open_server
        self._ledgers: dict[str, _Ledger] = {}

    def quota(self, tenant: str) -> TenantQuota:
        """The quotas of ``tenant``."""
        return self._settings.for_tenant(tenant, self._open)

    def _ledger(self, tenant: str) -> _Ledger:
        ledger = self._ledgers.get(tenant)
        if ledger is None:
            ledger = self._ledgers[tenant] = _Ledger()
        return ledger

    def store_limits(self, tenant: str) -> UsageLimits | None:
        """What the store checks for ``tenant``; None when nothing is limited."""
        q = self.quota(tenant)
        limits = UsageLimits(stored_bytes=q.max_stored_bytes, files=q.max_files,
                             unfinished_batches=q.max_unfinished_batches, pending_requests=q.max_pending_requests)
        return None if all(v is None for v in limits) else limits

    def exceeded(self, tenant: str, e: OverQuota, asked: str) -> QuotaExceeded:
        """The client's error for the store's OverQuota."""
        return quota_error(tenant, _KEY[e.quota], e.used, e.limit, asked)

    def take_create(self, tenant: str) -> CreateSlot:
        """Take a place in the tenant's create window, or raise QuotaExceeded
        with the time until the oldest create leaves it."""
        q = self.quota(tenant)
        if q.max_creates is None:
            return CreateSlot(None, 0.0)
        ledger = self._ledger(tenant)
        now = clock()
        window = ledger.creates
        while window and window[0] <= now - q.create_window_s:
            window.popleft()
        if len(window) >= q.max_creates:
            retry = window[0] + q.create_window_s - now if window else q.create_window_s
            raise quota_error(tenant, "max_creates", len(window), q.max_creates,
                              "this create would be one more", retry_after_s=max(retry, 0.001),
                              window_s=q.create_window_s)
        window.append(now)
        return CreateSlot(ledger, now)

    def creates_in_window(self, tenant: str) -> int:
        """Creates of ``tenant`` within its current window."""
        q = self.quota(tenant)
        ledger = self._ledgers.get(tenant)
        if ledger is None:
            return 0
        now = clock()
        return sum(1 for t in ledger.creates if t > now - q.create_window_s)

    async def store_usage(self, tenant: str) -> TenantUsage:
        """What ``tenant`` holds in the store now."""
        return await self._store.usage(tenant)

    async def begin_upload(self, tenant: str) -> Upload:
        """Start counting an upload: takes a create, and refuses (before any
        byte is read) when the tenant has no file or byte left."""
        q = self.quota(tenant)
        slot = self.take_create(tenant)
        try:
            # Unlimited files spare the store its two scans (an open server).
            limited = q.max_files is not None or q.max_stored_bytes is not None
            usage = await self._store.usage(tenant) if limited else TenantUsage(0, 0, 0, 0)
            ledger = self._ledger(tenant)
            if q.max_files is not None and usage.files + ledger.uploads + 1 > q.max_files:
                asked = "this upload would be one more" + (
                    f", with {ledger.uploads} other upload(s) in flight" if ledger.uploads else "")
                raise quota_error(tenant, "max_files", usage.files, q.max_files, asked)
            if q.max_stored_bytes is not None and usage.stored_bytes + ledger.upload_bytes + 1 > q.max_stored_bytes:
                raise quota_error(tenant, "max_stored_bytes", usage.stored_bytes, q.max_stored_bytes,
                                  "no byte is left for this upload")
        except BaseException:
            slot.release()
            raise
        ledger.uploads += 1
        return Upload(self, tenant, q, ledger, slot, usage)

    async def add_file(self, stored: StoredFile) -> None:
        """``Store.add_file`` within the tenant's quotas."""
        try:
            await self._store.add_file(stored, self.store_limits(stored.tenant))
        except OverQuota as e:
            asked = "this upload would be one more" if e.quota == "files" else \
                f"this upload is {_size(stored.size_bytes)}"
            raise self.exceeded(stored.tenant, e, asked) from None

    def ingest_append(self, batch: Batch, append: Callable[..., Awaitable[None]]
                      ) -> Callable[[int, list[int | str | bytes]], Awaitable[None]]:
        """``append`` (``Store.append_requests`` for ``batch``) checking
        ``max_pending_requests`` as the input is read: over it, the ingest
        fails and the batch ends FAILED with the quota's error."""
        limit = self.quota(batch.tenant).max_pending_requests

        async def checked(first_idx: int, flat: list[int | str | bytes]) -> None:
            try:
                await append(first_idx, flat, max_pending=limit)
            except OverQuota as e:
                asked = (f"files/{batch.input_file} has more requests than fit: {first_idx} read so far, "
                         f"{e.adding} more in the next range")
                raise IngestFailed(self.exceeded(batch.tenant, e, asked).to_status()) from None

        return checked

    async def usage(self, tenant: str) -> Sequence[QuotaUse]:
        """Every quota of ``tenant`` with its current use, in QUOTA_NAMES order."""
        q = self.quota(tenant)
        held = await self._store.usage(tenant)
        return (
            QuotaUse("max_stored_bytes", held.stored_bytes, q.max_stored_bytes),
            QuotaUse("max_files", held.files, q.max_files),
            QuotaUse("max_unfinished_batches", held.unfinished_batches, q.max_unfinished_batches),
            QuotaUse("max_pending_requests", held.pending_requests, q.max_pending_requests),
            QuotaUse("max_creates", self.creates_in_window(tenant), q.max_creates, q.create_window_s),
        )
