"""Running work that one replica at a time may do, under a named lease.

Replicas sharing a database each run the same periodic jobs (retention,
file expiry); the store's lease (``store.LeaseStore``) picks one of them for
each round, and the fenced writes it allows refuse to commit once the lease
is lost. On SQLite there is one replica and the lease is always free.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .store import Lease, LeaseStore

log = logging.getLogger("longbatch.leases")


def lease_owner(job: str) -> str:
    """A name for one holder of leases: the job, host and process (for
    whoever reads the leases table), and random bits, so two holders in
    one process, or a restarted process, never share it."""
    return f"{job}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Held:
    """A lease being held: renewed as the work goes on."""

    def __init__(self, store: LeaseStore, lease: Lease, ttl_s: float) -> None:
        self._store = store
        self.lease = lease
        self._ttl_s = ttl_s
        self._renewed = time.monotonic()

    async def keep(self, *, every_s: float | None = None) -> bool:
        """Renew the lease for another TTL; False once it is lost (stop the
        work: its fenced writes would be refused). With ``every_s``, only if
        that long has passed since the grant or the last renewal."""
        now = time.monotonic()
        if every_s is not None and now - self._renewed < every_s:
            return True
        if not await self._store.renew_lease(self.lease, self._ttl_s):
            log.warning("lease %r lost (token %d); stopping this round", self.lease.name, self.lease.token)
            return False
        self._renewed = now
        return True


@asynccontextmanager
async def held(store: LeaseStore, name: str, owner: str, ttl_s: float) -> AsyncIterator[Held | None]:
    """The lease ``name`` for ``ttl_s`` seconds, or None while another
    holder has it; released on the way out, so the next round anywhere may
    take it at once."""
    lease = await store.acquire_lease(name, owner, ttl_s)
    if lease is None:
        log.debug("lease %r is held elsewhere; skipping this round", name)
        yield None
        return
    try:
        yield Held(store, lease, ttl_s)
    finally:
        try:
            await store.release_lease(lease)
        except Exception:
            # It expires on its own within ttl_s.
            log.exception("releasing lease %r failed", name)
