"""Fair scheduling of one model's batches across tenants.

Within a tenant, its batches are served by priority, highest first, FIFO
(by ``seq``) among equals: priority is the tenant's own ordering and says
nothing about other tenants. Between tenants with work, the model's capacity
is shared by deficit round robin (DRR) counted in requests dispatched: the
tenants with runs form a ring; the one at its head takes requests while its
*deficit* lasts, then the turn passes on. A tenant's deficit grows by its
quantum, ``weight * unit``, when a turn of its starts with nothing left, and
shrinks by each request it takes, so while tenants have work each
dispatches in proportion to its weight, however many batches it queues and
at whatever priority. ``unit`` is what one dispatch takes at most (a
worker's chunk): a dispatch takes a whole chunk while the deficit is
positive, so the deficit may go below zero by less than one chunk, a debt
repaid the next turn; a quantum of at least one chunk makes every turn take
something.

A tenant that is visited but has nothing ready (its next requests are being
read) keeps its deficit and the turn passes on: its share is not lost to a
read, nor banked beyond one quantum. A tenant whose last run leaves the ring
is forgotten, deficit and all (as in DRR: an idle queue earns no credit) and
joins at the ring's tail when it has work again.

The scheduler only orders runs; what a run can hand out now (buffered
requests, a range of them) is the caller's ``take``. With one tenant (an open
server, say) ``next`` is a walk of that tenant's runs with no accounting, so
the single-tenant hot path costs what the old single queue did.

Cost per dispatch: one ``take`` call per run visited until one gives
requests, plus a few attribute updates and at most one ``deque.rotate``;
``add``, ``reorder`` and ``remove`` are O(runs of that tenant).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Generic, Protocol, TypeVar

__all__ = ["DEFAULT_WEIGHT", "FairScheduler", "Schedulable"]

DEFAULT_WEIGHT = 1
"""The weight of a tenant the config does not name."""


class Schedulable(Protocol):
    """What the scheduler reads of a run. ``tenant`` and ``seq`` must not
    change while the run is scheduled; after ``priority`` changes, call
    :meth:`FairScheduler.reorder`."""

    @property
    def tenant(self) -> str:
        """The tenant whose share the run's requests count against."""

    @property
    def priority(self) -> int:
        """Higher runs first among the tenant's runs."""

    @property
    def seq(self) -> int:
        """Creation order; lower runs first among equal priorities."""


R = TypeVar("R", bound=Schedulable)
T = TypeVar("T", bound=Sized)


def _order(run: Schedulable) -> tuple[int, int]:
    return -run.priority, run.seq


class _Tenant(Generic[R]):
    """One tenant with work: its runs in order and its DRR state."""

    __slots__ = ("deficit", "name", "quantum", "runs")

    def __init__(self, name: str, quantum: int) -> None:
        self.name = name
        self.quantum = quantum
        self.deficit = 0
        self.runs: list[R] = []


class FairScheduler(Generic[R]):
    """The runs of one model, by tenant; see the module docstring.

    Not thread-safe; meant for one event loop.
    """

    def __init__(self, unit: int, weights: Mapping[str, int] | None = None) -> None:
        """An empty scheduler.

        Args:
            unit: the most requests one ``take`` hands out (a worker's
                chunk), at least 1; a tenant's quantum is its weight times this.
            weights: tenant -> weight (a positive int); tenants not in it
                weigh ``DEFAULT_WEIGHT``.
        """
        if unit < 1:
            raise ValueError("unit must be at least 1")
        for name, weight in (weights or {}).items():
            if weight < 1:
                raise ValueError(f"weight of tenant {name!r} must be at least 1")
        self._unit = unit
        self._weights = dict(weights or {})
        self._ring: deque[_Tenant[R]] = deque()
        self._tenants: dict[str, _Tenant[R]] = {}
        self._where: dict[R, _Tenant[R]] = {}

    def __contains__(self, run: object) -> bool:
        return run in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[R]:
        """Every scheduled run, tenant by tenant in ring order, each tenant's in its order."""
        return (run for tenant in list(self._ring) for run in list(tenant.runs))

    def weight(self, tenant: str) -> int:
        """The weight of ``tenant``."""
        return self._weights.get(tenant, DEFAULT_WEIGHT)

    def tenants(self) -> list[str]:
        """Tenants with runs, from the one whose turn it is."""
        return [t.name for t in self._ring]

    def deficit(self, tenant: str) -> int:
        """Requests ``tenant`` may still take in its turn (0 when it has no runs)."""
        t = self._tenants.get(tenant)
        return t.deficit if t is not None else 0

    def add(self, run: R) -> None:
        """Schedule ``run`` (no-op if it is scheduled); a new tenant joins the ring's tail."""
        if run in self._where:
            return
        t = self._tenants.get(run.tenant)
        if t is None:
            t = self._tenants[run.tenant] = _Tenant(run.tenant, self.weight(run.tenant) * self._unit)
            self._ring.append(t)
        t.runs.append(run)
        if len(t.runs) > 1 and _order(t.runs[-2]) > _order(run):
            t.runs.sort(key=_order)
        self._where[run] = t

    def remove(self, run: R) -> None:
        """Unschedule ``run`` (no-op if it is not); a tenant left without runs leaves the ring."""
        t = self._where.pop(run, None)
        if t is None:
            return
        t.runs.remove(run)
        if not t.runs:
            # An idle tenant earns no credit: it is dropped, deficit and all.
            del self._tenants[t.name]
            self._ring.remove(t)

    def reorder(self, run: R) -> None:
        """Put ``run`` back in order among its tenant's runs after its priority changed."""
        t = self._where.get(run)
        if t is not None:
            t.runs.sort(key=_order)

    def next(self, take: Callable[[R], T | None]) -> tuple[R, T] | None:
        """The run and what ``take`` handed out of it, for the tenant whose
        turn it is, or None when no run of any tenant has anything now.

        ``take(run)`` returns up to ``unit`` requests of ``run`` (anything
        sized: a list, a range) or None if it has none ready; it may
        :meth:`remove` the run it was given, and nothing else. Tenants are
        tried at most once each per call.
        """
        ring = self._ring
        if len(ring) == 1:
            # Nobody to share with: no accounting (the hot path of one tenant).
            return self._first(ring[0], take)
        for _ in range(len(ring)):
            if not ring:
                return None
            t = ring[0]
            if t.deficit <= 0:
                # A new turn. Any debt is under one unit and the quantum is
                # at least one, so the deficit is positive now.
                t.deficit += t.quantum
            got = self._first(t, take)
            if got is None:
                # Nothing ready (being read): the next tenant's turn; this
                # one keeps what is left of its deficit for its next visit.
                if ring and ring[0] is t:
                    ring.rotate(-1)
                continue
            t.deficit -= len(got[1])
            if t.deficit <= 0 and ring and ring[0] is t:
                ring.rotate(-1)
            return got
        return None

    @staticmethod
    def _first(t: _Tenant[R], take: Callable[[R], T | None]) -> tuple[R, T] | None:
        """What the first of ``t``'s runs that has anything hands out."""
        runs = t.runs
        i = 0
        # Bounded: each pass moves on or shrinks the list (take removed the run).
        while i < len(runs):
            run = runs[i]
            got = take(run)
            if got is not None:
                return run, got
            if i < len(runs) and runs[i] is run:
                i += 1
        return None
