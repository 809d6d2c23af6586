"""The background executor: runs batch requests against model backends.

Per model, long-lived workers pull requests from a scheduler
(``scheduler.FairScheduler``) that shares the model between tenants by
deficit round robin, in proportion to their configured weights and counted
in requests dispatched, and serves each tenant's own batches highest
priority first, FIFO among equals; at most ``max_concurrency`` requests are
in flight (one per worker, or a chunk per worker for backends that answer
in bulk). Each worker waits for its results to be
committed before it takes more: a bulk chunk is committed as it is, single
results go to one writer that commits all that queued meanwhile (group
commit); a request counts only once it is persisted. Batches
end through one path, ``finish``, serialized per batch, so a Cancel racing
completion yields exactly one final state.

A model whose backend can answer in another process (``PortableGenerate``:
echo) has its generate batches run there when the server has worker
processes: a worker task hands a range of request indexes to a process,
which reads, answers and commits them itself. The server process then only
schedules, and keeps its one GIL for RPCs (on a 1M echo batch, reading,
answering and committing here used the GIL for ~14 s of a 15 s run).

Every call of a request to a backend passes its model's gate
(``admission.ModelGate``): an AIMD in-flight limit that backs off on 429/503,
and a pause while the backend is unreachable, probing it with backoff, so an
outage costs the requests waiting time rather than their attempts (see
docs/execution.md). Retries wait as ``retry.Backoff`` says, honouring
Retry-After.

On start, every batch that is not done is resumed: requests already persisted
are never run again; those in flight when the process died (at most
``max_concurrency`` per model, since a worker takes new work only after its
results are committed) run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.rpc import code_pb2, status_pb2

from longbatch.v1 import content_pb2

from .admission import Admission, ModelGate
from .backends import Backend, BackendError
from .backends.base import BulkGenerate, PortableGenerate, RawGenerate
from .config import ExecutorSettings
from .domain import Batch, BatchKind, ItemStatus, Outcome, PendingItem, State, now_us
from .events import BatchEvent, BatchEvents, EventKind, Unsubscribe, announce
from .ingest import IngestFailed
from .metrics import Metrics, ModelLoad
from .outputs import Outputs
from .retry import Backoff
from .scheduler import FairScheduler
from .store import Answerer, RangeRunner, Store
from .workers import WorkerPool

log = logging.getLogger("longbatch.executor")

_REFILL = 1024
_YIELD_EVERY = 64
_CANCEL_WAIT_S = 2.0
_RESTART_S = 0.5
_BULK_MAX = 512
# Batches smaller than this run here even when worker processes could take
# them: a process that is not started yet takes ~0.5 s to start, longer
# than echo needs for a few thousand requests on the loop.
_PORTABLE_MIN = 8192
# What a batch's unfinished requests count as when it ends in each state.
_REST = {
    State.SUCCEEDED: ItemStatus.CANCELLED,
    State.FAILED: ItemStatus.CANCELLED,
    State.CANCELLED: ItemStatus.CANCELLED,
    State.EXPIRED: ItemStatus.EXPIRED,
}


@dataclass(frozen=True)
class ModelRuntime:
    """A configured model with its live backend."""

    name: str
    backend: Backend
    max_concurrency: int
    raw_generate: Callable[[bytes], Awaitable[bytes]] | None = field(init=False)
    """The backend's wire-level fast path, if it has one (checked once:
    a runtime Protocol check per call costs more than the call)."""
    raw_generate_many: Callable[[list[bytes]], Awaitable[list[bytes]]] | None = field(init=False)
    """The backend's bulk fast path, if it offers one."""
    portable: Answerer | None = field(init=False)
    """The backend's answers as a function for worker processes, if it offers one."""
    chunk: int = field(init=False)
    """Requests a worker takes at a time: 1, or for a bulk backend a quarter
    of the concurrency (at most _BULK_MAX). A commit's fixed cost is shared
    by many results, and while one chunk commits on the store's writer
    thread the other workers answer theirs."""

    def __post_init__(self) -> None:
        raw = self.backend.generate_raw if isinstance(self.backend, RawGenerate) else None
        object.__setattr__(self, "raw_generate", raw)
        bulk = isinstance(self.backend, BulkGenerate) and self.backend.bulk
        many = self.backend.generate_raw_many if bulk else None  # type: ignore[attr-defined]
        object.__setattr__(self, "raw_generate_many", many)
        portable = self.backend.portable_generate() if isinstance(self.backend, PortableGenerate) else None
        object.__setattr__(self, "portable", portable)
        chunk = max(1, min(_BULK_MAX, self.max_concurrency // 4)) if many is not None else 1
        object.__setattr__(self, "chunk", chunk)


@dataclass(eq=False)
class _Run:
    """Scheduling state of one batch that still has requests to run."""

    batch_id: str
    seq: int
    kind: BatchKind
    priority: int
    tenant: str
    buffer: deque[PendingItem] = field(default_factory=deque)
    cursor: int = 0
    exhausted: bool = False
    refilling: bool = False
    started: bool = False
    reads: int = 0
    """Bumped when the run is to be read again from its start."""
    runner: RangeRunner | None = None
    """Set when the run's requests are run in worker processes, by ranges
    of idx up to ``end``, rather than read into ``buffer``."""
    end: int = 0


class _ModelQueue:
    """The runs of one model, shared fairly between tenants, and a wake-up for workers."""

    def __init__(self, max_concurrency: int, chunk: int, weights: Mapping[str, int]) -> None:
        self.chunk = chunk
        # A tenant's turn is its weight in chunks: one dispatch takes a chunk.
        self.runs: FairScheduler[_Run] = FairScheduler(chunk, weights)
        self.wakeup = asyncio.Event()
        self.dispatched = 0
        """Requests workers hold: taken from the scheduler and not yet persisted."""
        self.take: Callable[[_Run], list[PendingItem] | range | None] = lambda run: None
        """What a run hands out now (``Executor._take``, bound once: _next runs per dispatch)."""
        # Requests read from the store at a time; the next read starts once
        # fewer than this are buffered. At 8x the concurrency the workers of a
        # 1M echo batch spent ~3% of their time waiting for a read, at 2x
        # (reading at half) ~21%: each row fetched on the reader thread
        # waits for the GIL the busy loop holds.
        self.refill = max(_REFILL, 8 * max_concurrency)

    def add(self, run: _Run) -> None:
        self.runs.add(run)
        self.wakeup.set()

    def reorder(self, run: _Run) -> None:
        self.runs.reorder(run)
        self.wakeup.set()


class Executor:
    """Runs batches; see the module docstring."""

    def __init__(
        self,
        store: Store,
        models: Mapping[str, ModelRuntime],
        settings: ExecutorSettings,
        outputs: Outputs,
        events: BatchEvents,
        batch_ttl_s: float,
        read_input: Callable[[Batch], Awaitable[int]] | None = None,
        workers: WorkerPool | None = None,
        tenant_weights: Mapping[str, int] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """Build an executor; ``start`` resumes batches and starts the workers.

        ``tenant_weights`` (tenant -> weight, default 1 each) sets each
        tenant's share of every model while several have work. ``metrics``
        gets finished requests, backend call latencies and retries, and
        reads the scheduler's state per scrape (a private one when None).
        """
        self._store = store
        self._pool = workers
        self._read_input = read_input
        self._models = models
        self._settings = settings
        self._outputs = outputs
        # Gets `done` for every batch this executor finishes, `cancel` and
        # `priority` for the changes made through it; from `start` on, its
        # `cancel` and `priority` events (any replica's) act here.
        self._events = events
        self._unsubscribe: Unsubscribe | None = None
        self._batch_ttl_us = int(batch_ttl_s * 1_000_000)
        self._queues = {name: _ModelQueue(m.max_concurrency, m.chunk, tenant_weights or {})
                        for name, m in models.items()}
        for queue in self._queues.values():
            queue.take = functools.partial(self._take, queue)
        # Retries of a request: the old formula (doubling from the initial
        # delay, half of it jitter), with a Retry-After honoured up to six
        # times the cap.
        self._backoff = Backoff(initial_s=settings.backoff_initial_s, max_s=settings.backoff_max_s, jitter=0.5,
                                max_hint_s=settings.backoff_max_s * 6)
        # Probes of an unreachable backend: less jitter than retries, as one
        # probe at a time goes out and the gaps should keep growing.
        probes = Backoff(initial_s=settings.probe_initial_s, max_s=settings.probe_max_s, jitter=0.2)
        self._gates = {name: ModelGate(name, m.max_concurrency, outage_timeout_s=settings.outage_timeout_s,
                                       probe_backoff=probes) for name, m in models.items()}
        self._runs: dict[str, tuple[_Run, _ModelQueue]] = {}
        # Unbounded, but each worker has at most one entry in it.
        self._results: asyncio.Queue[tuple[list[Outcome], asyncio.Future[None]]] = asyncio.Queue()
        self._finish_locks: dict[str, asyncio.Lock] = {}
        self._ingests: dict[str, asyncio.Task[None]] = {}
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._timed_out: set[asyncio.Task[Any]] = set()
        self._ingest_slots = asyncio.Semaphore(2)
        self._workers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._writer: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.on_terminal: Callable[[Batch], None] | None = None
        """Called with each batch that becomes done (webhooks hook in here)."""
        metrics = metrics or Metrics()
        self._progress = metrics.progress
        self._call_seconds = {name: metrics.backend_call_seconds.labels(name) for name in models}
        self._retries = {name: metrics.backend_retries.labels(name) for name in models}
        metrics.model_load = self.model_load

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Resume unfinished batches, start the workers, and act on the
        ``cancel`` and ``priority`` events of every replica."""
        # Before reading what to resume, so a cancel committed after that
        # read is heard: scheduling the read batches takes no await, so its
        # event arrives once they are scheduled, and stops the one it names.
        self._unsubscribe = self._events.subscribe(self._on_event, self._on_resync)
        cutoff = now_us() - self._batch_ttl_us
        for batch in await self._store.unfinished_batches():
            self._progress.track(batch)  # what it has finished counted before this start
            if batch.final_state is not None:
                self._spawn(self.finish(batch.id, batch.final_state, None))
            elif batch.create_time_us < cutoff:
                # Its TTL passed while the server was down: expire it now
                # instead of running more of it until the first sweep.
                self._spawn(self.finish(batch.id, State.EXPIRED, _EXPIRED_BATCH))
            else:
                self.submit(batch)
        self._writer = asyncio.create_task(self._write_loop(), name="longbatch-writer")
        for name, model in self._models.items():
            workers = -(-model.max_concurrency // model.chunk)
            for i in range(workers):
                self._workers.append(asyncio.create_task(self._supervised(name, model), name=f"worker-{name}-{i}"))
        self._sweeper = asyncio.create_task(self._expire_loop(), name="longbatch-expiry")
        self._watchdog_task = asyncio.create_task(self._watchdog(), name="longbatch-watchdog")

    async def stop(self, grace_s: float) -> None:
        """Stop taking work, let in-flight requests finish for up to ``grace_s``,
        persist what finished, then cancel the rest. Safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        for q in self._queues.values():
            q.wakeup.set()
        for gate in self._gates.values():
            # Requests waiting out an outage stay PENDING and run after a restart.
            gate.close()
        for task in (self._sweeper, self._watchdog_task):
            if task:
                task.cancel()
        if self._workers:
            _, pending = await asyncio.wait(self._workers, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
        await asyncio.gather(*(m.backend.aclose() for m in self._models.values()), return_exceptions=True)
        if self._writer:
            await self._results.join()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=grace_s)
        for task in list(self._background):
            task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def waiting_reason(self, model: str) -> str:
        """Why the requests of ``model`` are not running now (its backend
        unreachable since …); empty while they run."""
        gate = self._gates.get(model)
        return gate.waiting_reason if gate is not None else ""

    def gate(self, model: str) -> ModelGate:
        """The admission gate of a configured model (its in-flight limit and outage state)."""
        return self._gates[model]

    def model_load(self) -> dict[str, ModelLoad]:
        """Each configured model's requests in workers' hands, in-flight
        limit and outage pause (the metrics read this per scrape)."""
        return {name: ModelLoad(queue.dispatched, self._gates[name].limit, self._gates[name].paused)
                for name, queue in self._queues.items()}

    # -- scheduling -------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        """Schedule a stored batch that is not done."""
        self._progress.track(batch)
        queue = self._queues.get(batch.model)
        if queue is None:
            # The model was removed from the config while the batch waited.
            error = status_pb2.Status(code=code_pb2.NOT_FOUND, message=f"model {batch.model} is not configured")
            self._spawn(self.finish(batch.id, State.FAILED, error))
            return
        if batch.id in self._runs or batch.id in self._ingests:
            return
        if not batch.ingested:
            task = asyncio.create_task(self._ingest(batch), name=f"ingest-{batch.id}")
            self._ingests[batch.id] = task
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        if batch.request_count and batch.pending == 0:
            self._spawn(self.finish(batch.id, State.SUCCEEDED, None))
            return
        run = _Run(batch.id, batch.seq, batch.kind, batch.priority, batch.tenant,
                   started=batch.state is State.RUNNING)
        if (batch.kind is BatchKind.GENERATE and batch.request_count >= _PORTABLE_MIN
                and self._models[batch.model].portable is not None and self._pool is not None
                and self._pool.workers > 0):
            run.runner, run.end = self._store.range_runner(batch), batch.request_count
        self._runs[batch.id] = (run, queue)
        queue.add(run)
        self._outputs.begin(batch)

    async def _ingest(self, batch: Batch) -> None:
        """Read a file batch's input, then schedule it; FAILED if it is bad."""
        try:
            async with self._ingest_slots:
                # A restart may find a half-read input: start it over.
                await self._store.reset_ingest(batch.id)
                if self._read_input is None:
                    raise IngestFailed(status_pb2.Status(code=code_pb2.UNIMPLEMENTED, message="no file input"))
                count = await self._read_input(batch)
                ready = await self._store.finish_ingest(batch.id, count)
        except IngestFailed as e:
            self._ingests.pop(batch.id, None)
            await self._store.reset_ingest(batch.id)
            await self.finish(batch.id, State.FAILED, e.status)
            return
        except Exception:
            self._ingests.pop(batch.id, None)
            log.exception("reading the input of %s failed", batch.name)
            await self._store.reset_ingest(batch.id)
            await self.finish(batch.id, State.FAILED, _INTERNAL_INPUT)
            return
        self._ingests.pop(batch.id, None)
        # Not once closed: another replica cancelled it while this one read
        # its input (here, a cancel stops the ingest before closing it).
        if ready is not None and not ready.closed:
            log.info("%s: %d requests read from files/%s", batch.name, count, batch.input_file)
            self.submit(ready)

    def reprioritize(self, batch_id: str, priority: int) -> None:
        """Apply a new priority to the requests not yet started (it orders
        them among their tenant's batches only). Idempotent; a batch not
        running here is left alone."""
        entry = self._runs.get(batch_id)
        if entry:
            entry[0].priority = priority
            entry[1].reorder(entry[0])

    async def priority_changed(self, batch_id: str, priority: int) -> None:
        """A priority change is in the store: apply it here now, and tell
        every replica (a failure to is logged: the change is committed).

        Applied here directly, not only through the event, so the next
        request this replica dispatches already follows it; the event's
        arrival here then reorders again, a no-op.
        """
        self.reprioritize(batch_id, priority)
        await announce(self._events, BatchEvent.priority_changed(batch_id, priority))

    # -- events from every replica ------------------------------------------------

    def _on_event(self, event: BatchEvent) -> None:
        """The bus's handler (on the loop, never inside a publish)."""
        if event.kind is EventKind.CANCEL:
            self._stop_work(event.batch_id)
        elif event.kind is EventKind.PRIORITY:
            assert event.priority is not None  # BatchEvent guarantees it
            self.reprioritize(event.batch_id, event.priority)

    def _stop_work(self, batch_id: str) -> None:
        """Stop running a batch that is closed in the store (by any
        replica): nothing more of it is dispatched here, and its ingest is
        stopped. Requests already in a backend's hands finish, and the store
        refuses their results (a closed batch takes none).

        Idempotent: after this replica's own ``_close`` there is nothing
        left to stop. Not under the batch's lock: the replica that closed
        it completes it, and a lock here would queue behind that.
        """
        self._unschedule(batch_id)
        ingest = self._ingests.pop(batch_id, None)
        if ingest is not None:
            ingest.cancel()
            self._spawn(self._after_ingest_stopped(batch_id, ingest))

    async def _after_ingest_stopped(self, batch_id: str, ingest: asyncio.Task[None]) -> None:
        await asyncio.gather(ingest, return_exceptions=True)
        try:
            await self._store.reset_ingest(batch_id)  # its half-read requests (a closed batch keeps none)
        except Exception:
            log.exception("dropping the half-read input of batches/%s failed", batch_id)

    def _on_resync(self) -> None:
        """Events may have been missed: re-read every batch running here."""
        if not self._stopping:
            self._spawn(self._resync())

    async def _resync(self) -> None:
        for batch_id in [*self._runs, *self._ingests]:
            try:
                batch = await self._store.get_batch(None, batch_id)
            except Exception:
                log.exception("re-reading batches/%s after missed events failed", batch_id)
                continue
            if batch is None or batch.closed:
                self._stop_work(batch_id)
            else:
                entry = self._runs.get(batch_id)
                if entry is not None and entry[0].priority != batch.priority:
                    self.reprioritize(batch_id, batch.priority)

    def _unschedule(self, batch_id: str) -> None:
        entry = self._runs.pop(batch_id, None)
        if entry:
            run, queue = entry
            run.buffer.clear()
            run.exhausted = True
            queue.runs.remove(run)

    @staticmethod
    def _next(queue: _ModelQueue) -> tuple[_Run, list[PendingItem] | range] | None:
        """Up to a chunk of requests of the tenant whose turn it is, from its
        first run (in priority order) that has any: read ones, or a range of
        idx for a run in worker processes."""
        return queue.runs.next(queue.take)

    def _take(self, queue: _ModelQueue, run: _Run) -> list[PendingItem] | range | None:
        """Up to a chunk of ``run``'s requests, or None if none is ready; a
        run with nothing left to dispatch leaves the scheduler."""
        if run.runner is not None:
            if not run.started:
                if not run.refilling:  # here: marking it RUNNING before any result lands
                    run.refilling = True
                    self._spawn(self._start(run, queue))
                return None
            if run.exhausted:
                return None
            span = range(run.cursor, min(run.cursor + queue.chunk, run.end))
            run.cursor = span.stop
            if run.cursor >= run.end:
                run.exhausted = True
                queue.runs.remove(run)  # everything dispatched; the last commit finishes it
            return span
        buffer = run.buffer
        if len(buffer) < queue.refill and not run.exhausted and not run.refilling:
            run.refilling = True
            self._spawn(self._refill(run, queue))
        if buffer:
            items = [buffer.popleft() for _ in range(min(queue.chunk, len(buffer)))]
            if not buffer and run.exhausted:
                # Everything dispatched (the writer finishes it): its tenant
                # has no more work here unless it has other runs.
                queue.runs.remove(run)
            return items
        if run.exhausted and not run.refilling:
            queue.runs.remove(run)
        return None

    async def _start(self, run: _Run, queue: _ModelQueue) -> None:
        try:
            await self._store.mark_running(run.batch_id)
            run.started = True
        except Exception:
            log.exception("starting batches/%s failed; retrying", run.batch_id)
            await asyncio.sleep(1.0)
        run.refilling = False
        queue.wakeup.set()

    async def _refill(self, run: _Run, queue: _ModelQueue) -> None:
        reads = run.reads
        try:
            if not run.started:
                run.started = True
                await self._store.mark_running(run.batch_id)
            items = await self._store.pending_items(run.batch_id, run.cursor, queue.refill)
        except Exception:
            log.exception("reading requests of batches/%s failed; retrying", run.batch_id)
            await asyncio.sleep(1.0)
            run.refilling = False
            queue.wakeup.set()
            return
        if self._runs.get(run.batch_id, (None,))[0] is run and run.reads == reads:
            run.buffer.extend(items)
            if items:
                run.cursor = items[-1].idx + 1
            if len(items) < queue.refill:
                run.exhausted = True
                if not run.buffer:
                    queue.runs.remove(run)  # everything dispatched; the writer finishes it
        run.refilling = False
        queue.wakeup.set()

    # -- running requests -------------------------------------------------------

    async def _supervised(self, model_name: str, model: ModelRuntime) -> None:
        """Run a worker; if a fault of ours kills it, log it and start over.

        The requests it held are PENDING in the store but no longer buffered,
        so every run of the model is read again from its first unfinished
        request (one in flight elsewhere may run twice; the first result
        wins and counts). Without this a batch would wait forever, silently.
        """
        while not self._stopping:
            try:
                await self._worker(model_name, model)
                return
            except Exception:
                log.exception("a worker of %s failed; restarting it, and reading its batches again", model_name)
            queue = self._queues[model_name]
            for run, run_queue in self._runs.values():
                if run_queue is queue:
                    run.reads += 1  # a read under way now brings stale rows: dropped
                    run.buffer.clear()
                    run.cursor, run.exhausted = 0, False
                    queue.add(run)  # back if fully dispatched, so out of the queue; else a no-op
            await asyncio.sleep(_RESTART_S)

    async def _worker(self, model_name: str, model: ModelRuntime) -> None:
        queue = self._queues[model_name]
        done_without_yield = 0
        while not self._stopping:
            picked = self._next(queue)
            if picked is None:
                queue.wakeup.clear()
                await queue.wakeup.wait()
                continue
            run, items = picked
            held = len(items)
            queue.dispatched += held
            try:
                if isinstance(items, range):
                    await self._execute_range(model, run, items)
                    continue
                # Wait for the commit before taking more work: answered but
                # unsaved results are lost (and re-run) if the process dies, so
                # they must stay bounded by the model's concurrency.
                if held > 1:
                    # A chunk is a group already. Committing it at once, rather
                    # than through the writer task, starts the transaction on the
                    # store's thread now, while other workers answer their chunks.
                    answers = await self._execute_bulk(model, items) if run.kind is BatchKind.GENERATE else None
                    if answers is not None:
                        await self._persist_answers(run.batch_id, items, answers)
                    else:
                        await self._persist([await self._execute(model, run, item) for item in items])
                else:
                    committed = asyncio.get_running_loop().create_future()
                    self._results.put_nowait(([await self._execute(model, run, items[0])], committed))
                    await committed
            finally:
                queue.dispatched -= held
            done_without_yield += held
            if done_without_yield >= _YIELD_EVERY:
                # A backend that never suspends (echo) must not starve the loop.
                done_without_yield = 0
                await asyncio.sleep(0)

    async def _execute_range(self, model: ModelRuntime, run: _Run, span: range) -> None:
        """Run a range of a batch's requests in a worker process, which
        commits them; if it cannot answer them, run them here one by one
        (that path owns retries and reports each request's error)."""
        assert model.portable is not None and run.runner is not None and self._pool is not None
        pool = self._pool.get()
        done = None
        if pool is not None:
            try:
                done = await asyncio.get_running_loop().run_in_executor(
                    pool, run.runner, span.start, span.stop, model.portable)
            except Exception as e:  # a broken pool, or the store failing there
                log.exception("running batches/%s[%d:%d] in a worker process failed; running it here",
                              run.batch_id, span.start, span.stop)
                self._pool.drop_if_broken(e)
        if done is not None and done.answered:
            if done.batch is not None:
                self._finish_if_complete(done.batch)
            return
        if run.batch_id not in self._runs:
            return  # closed meanwhile: nothing more runs
        items = await self._store.pending_items(run.batch_id, span.start, len(span))
        await self._persist([await self._execute(model, run, i) for i in items if i.idx < span.stop])

    async def _execute_bulk(self, model: ModelRuntime, items: list[PendingItem]) -> list[bytes] | None:
        """The answers of one bulk call for several requests, or None on any
        failure: then the per-request path, which owns retries and error
        reporting, runs them."""
        assert model.raw_generate_many is not None
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._deadlines[task] = started + self._settings.request_timeout_s
        try:
            results = await model.raw_generate_many([item.payload for item in items])
        except asyncio.CancelledError:
            if task not in self._timed_out:
                raise
            self._timed_out.discard(task)
            task.uncancel()
            results = None
        except Exception:
            results = None
        finally:
            self._deadlines.pop(task, None)
            self._call_seconds[model.name].observe(loop.time() - started)
        return results if results is not None and len(results) == len(items) else None

    async def _execute(self, model: ModelRuntime, run: _Run, item: PendingItem) -> Outcome:
        """Run one request to its outcome: call, retry, wait out outages."""
        settings = self._settings
        gate = self._gates[model.name]
        call_seconds = self._call_seconds[model.name]
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            probe = False
            if not gate.enter():
                admission = await gate.wait()
                if admission is Admission.GAVE_UP:
                    code, message = gate.outage_error()
                    status = status_pb2.Status(code=code, message=message)
                    return Outcome(run.batch_id, item.idx, ItemStatus.FAILED, status.SerializeToString())
                probe = admission is Admission.PROBE
                if run.batch_id not in self._runs:
                    # Closed while this waited: its result would be dropped.
                    gate.left(probe)
                    return Outcome(run.batch_id, item.idx, ItemStatus.CANCELLED, _CANCELLED_ITEM)
            seen = gate.answered
            attempt += 1
            started = loop.time()
            # The watchdog cancels calls past their deadline; registering is a
            # dict write, where asyncio.timeout would cost a timer per call.
            self._deadlines[task] = started + settings.request_timeout_s
            outage = overload = False
            try:
                result = await self._call(model, run.kind, item.payload)
            except BackendError as e:
                error, retryable, retry_after = e.code, e.retryable, e.retry_after_s
                message, outage, overload = e.message, e.outage, e.overload
            except asyncio.CancelledError:
                if task not in self._timed_out:
                    gate.left(probe)
                    raise
                self._timed_out.discard(task)
                task.uncancel()
                error, retryable, retry_after, outage = code_pb2.DEADLINE_EXCEEDED, True, None, True
                message = f"backend did not answer within {settings.request_timeout_s:g}s"
            except Exception:
                log.exception("backend of %s failed on batches/%s[%d]", model.name, run.batch_id, item.idx)
                error, retryable, retry_after = code_pb2.INTERNAL, False, None
                message = "the backend failed on this request; see the server log"
            else:
                gate.ok()
                return Outcome(run.batch_id, item.idx, ItemStatus.SUCCEEDED, result)
            finally:
                call_seconds.observe(loop.time() - started)
                self._deadlines.pop(task, None)
                if task in self._timed_out:
                    # The backend turned the watchdog's cancellation into
                    # another error; clear it so later calls stay guarded.
                    self._timed_out.discard(task)
                    task.uncancel()
            if outage:
                if gate.unreachable(seen, started, error, message, probe):
                    # The model's outage, not this request's failure: no
                    # attempt spent; the paused gate holds it until a probe
                    # gets through or outage_timeout passes.
                    attempt -= 1
                    continue
            else:
                gate.failed(seen, overload)
            if not retryable or attempt >= settings.max_attempts or self._stopping or run.batch_id not in self._runs:
                status = status_pb2.Status(code=error, message=message)
                return Outcome(run.batch_id, item.idx, ItemStatus.FAILED, status.SerializeToString())
            self._retries[model.name].inc()
            await asyncio.sleep(self._backoff.delay(attempt, retry_after))

    async def _watchdog(self) -> None:
        """Cancel backend calls that run past their deadline."""
        interval = min(1.0, max(0.01, self._settings.request_timeout_s / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for task, deadline in list(self._deadlines.items()):
                # A registered task is suspended inside its backend call, so
                # the cancellation lands there and _execute turns it into a
                # DEADLINE_EXCEEDED attempt.
                if deadline <= now and task not in self._timed_out:
                    self._timed_out.add(task)
                    task.cancel()

    @staticmethod
    async def _call(model: ModelRuntime, kind: BatchKind, payload: bytes) -> bytes:
        backend = model.backend
        if kind is BatchKind.GENERATE:
            if model.raw_generate is not None:
                return await model.raw_generate(payload)
            return (await backend.generate(content_pb2.GenerateContentRequest.FromString(payload))).SerializeToString()
        return (await backend.embed(content_pb2.EmbedContentRequest.FromString(payload))).SerializeToString()

    # -- persisting ---------------------------------------------------------------

    async def _write_loop(self) -> None:
        """Persist results as they come: one transaction for everything queued
        while the previous one ran (group commit), then release the workers."""
        while True:
            entries = [await self._results.get()]
            while not self._results.empty():
                entries.append(self._results.get_nowait())
            try:
                await self._persist([o for batch_outcomes, _ in entries for o in batch_outcomes])
            finally:
                for _, committed in entries:
                    if not committed.done():
                        committed.set_result(None)
                    self._results.task_done()

    async def _persist(self, outcomes: list[Outcome]) -> None:
        """Record results in one transaction and finish the batches they complete."""
        try:
            touched = await self._store.record_outcomes(outcomes)
        except Exception:
            # Unrecorded results stay PENDING in the store and run again
            # after a restart; nothing is counted that was not persisted.
            log.exception("persisting %d results failed", len(outcomes))
            return
        for batch in touched.values():
            self._finish_if_complete(batch)

    async def _persist_answers(self, batch_id: str, items: list[PendingItem], answers: list[bytes]) -> None:
        """_persist for a bulk call's answers, kept in columns."""
        try:
            batch = await self._store.record_results(batch_id, ItemStatus.SUCCEEDED, [i.idx for i in items], answers)
        except Exception:
            log.exception("persisting %d results failed", len(answers))
            return
        if batch is not None:
            self._finish_if_complete(batch)

    def _finish_if_complete(self, batch: Batch) -> None:
        """Take a batch's snapshot after a write of its results: count them,
        and finish the batch once nothing is pending."""
        self._progress.update(batch)
        if not batch.closed and batch.pending == 0:
            self._spawn(self.finish(batch.id, State.SUCCEEDED, None))

    # -- ending batches -------------------------------------------------------------

    async def cancel(self, batch_id: str) -> Batch | None:
        """Cancel a batch: finished results stay, the rest become CANCELLED.

        Returns once the batch is done, or after at most ``_CANCEL_WAIT_S``
        with the batch closed (nothing more runs) while a large output is
        still being written in the background.

        Its work here stops before the close is committed (``_close``), so
        no request of it is dispatched here afterwards; once committed, a
        ``cancel`` event tells every replica to stop theirs (arriving here,
        it finds nothing left: a no-op). Sent before the output is written,
        so the other replicas stop within moments whatever the output's size.
        """
        closed = await self._close(batch_id, State.CANCELLED, _CANCELLED_BATCH)
        if closed is None or closed.done:
            return closed
        # A failure is logged, not raised: the cancel is committed, and a
        # replica that missed it stops on its resync (or its results are
        # refused by the store meanwhile).
        await announce(self._events, BatchEvent.cancel(batch_id))
        task = asyncio.create_task(self._complete(batch_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        done, _ = await asyncio.wait({task}, timeout=_CANCEL_WAIT_S)
        return task.result() if done else closed

    async def finish(self, batch_id: str, state: State, error: status_pb2.Status | None) -> Batch | None:
        """Bring a batch to a terminal state exactly once and make it done.

        Idempotent, and safe across restarts: a batch closed but not yet done
        (the process died in between) is finished with the state it has.
        """
        closed = await self._close(batch_id, state, error)
        if closed is None or closed.done:
            return closed
        return await self._complete(batch_id)

    @contextlib.asynccontextmanager
    async def _batch_lock(self, batch_id: str) -> AsyncIterator[None]:
        """Serialize the steps that end one batch; the lock goes when unused."""
        lock = self._finish_locks.setdefault(batch_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._finish_locks.get(batch_id) is lock:
                del self._finish_locks[batch_id]

    async def _close(self, batch_id: str, state: State, error: status_pb2.Status | None) -> Batch | None:
        """Stop a batch's work and record its terminal state (first one wins)."""
        async with self._batch_lock(batch_id):
            batch = await self._store.get_batch(None, batch_id)
            if batch is None or batch.done:
                return batch
            self._unschedule(batch_id)
            ingest = self._ingests.pop(batch_id, None)
            if ingest is not None and ingest is not asyncio.current_task():
                ingest.cancel()
                await asyncio.gather(ingest, return_exceptions=True)
                await self._store.reset_ingest(batch_id)
            closed = await self._store.close_batch(
                batch_id, state, error.SerializeToString() if error else None, _REST[state])
            if closed is not None:
                self._progress.update(closed)  # its unfinished requests count as _REST[state] now
            return closed

    async def _complete(self, batch_id: str) -> Batch | None:
        """Write a closed batch's output and make it done."""
        async with self._batch_lock(batch_id):
            batch = await self._store.get_batch(None, batch_id)
            if batch is None or batch.done:
                return batch
            output_file = await self._outputs.write_if_large(batch)
            final = await self._store.mark_done(batch_id, output_file)
        if final is not None:
            self._progress.update(final)  # counted before any waiter hears that it is done
        # Wakes the waiters of every replica; a failure is logged, not raised: the batch is done.
        await announce(self._events, BatchEvent.done(batch_id))
        if final is not None:
            log.info("%s %s: %d ok, %d failed, %d cancelled, %d expired", final.name, final.state.name,
                     final.succeeded, final.failed, final.cancelled, final.expired)
            if self.on_terminal:
                self.on_terminal(final)
        return final

    async def _expire_loop(self) -> None:
        interval = max(0.05, min(30.0, self._batch_ttl_us / 1_000_000 / 20))
        while True:
            await asyncio.sleep(interval)
            try:
                for batch_id in await self._store.expired_batches(now_us() - self._batch_ttl_us):
                    await self.finish(batch_id, State.EXPIRED, _EXPIRED_BATCH)
            except Exception:
                log.exception("expiry sweep failed")


_INTERNAL_INPUT = status_pb2.Status(code=code_pb2.INTERNAL, message="reading the input file failed; see the server log")
_CANCELLED_BATCH = status_pb2.Status(code=code_pb2.CANCELLED, message="batch was cancelled")
_CANCELLED_ITEM = status_pb2.Status(
    code=code_pb2.CANCELLED, message="batch was cancelled before this request ran").SerializeToString()
_EXPIRED_BATCH = status_pb2.Status(
    code=code_pb2.DEADLINE_EXCEEDED, message="batch did not finish within the server's batch TTL"
)
