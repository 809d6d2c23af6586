"""Prometheus metrics of one server, served as ``GET /metrics``.

Every server has its own ``CollectorRegistry`` (tests run many servers in
one process; nothing goes to prometheus-client's global registry). What is
exported, with its labels, is listed in docs/reference.md#metrics:

- ``longbatch_batches{state}``: batches in the store by state, read at
  scrape time from counts the store keeps as batches change (triggers in
  SQLite), so they are exact, survive restarts and cost ~10 µs a scrape
  however many batches there are.
- ``longbatch_batch_requests_total{model,outcome}``: requests that reached
  a final outcome since the server started. The executor hands every batch
  snapshot a write returns to ``BatchProgress``, which counts what grew
  since the last one: a result counts once it is persisted, whichever path
  wrote it (per request, bulk, a worker process's range, the rest of a
  cancelled or expired batch), never twice.
- ``longbatch_scheduler_waiting_requests{model}``,
  ``longbatch_backend_in_flight_requests{model}``,
  ``longbatch_backend_concurrency_limit{model}``,
  ``longbatch_backend_paused{model}``: read at scrape time from the
  executor (``ModelLoad``) and ``BatchProgress``.
- Latency histograms of backend calls, gRPC calls and HTTP requests, and a
  counter of backend retries.

The histograms are ``LoopHistogram``s, not prometheus-client's
``Histogram``: every observation happens on the server's event loop
thread, so a bucket is a plain list slot and an observation a bisect and
two adds (~0.16 µs), where ``Histogram.observe`` takes two locks (~0.8 µs).
gRPC calls and backend calls are observed once each, on their hot paths.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

from google.rpc import code_pb2
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric

from .domain import Batch, State

__all__ = ["BatchProgress", "LoopHistogram", "Metrics", "ModelLoad"]

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
)
"""Seconds, for every latency histogram: from a point read (GetOperation,
~0.3 ms) to the longest WaitOperation and backend timeout (600 s)."""

OUTCOMES = ("succeeded", "failed", "cancelled", "expired")
"""``outcome`` label values of ``longbatch_batch_requests_total``, in the order of Batch's counters."""

_CODE_NAMES: dict[int, str] = {int(number): str(name) for name, number in code_pb2.Code.items()}
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def code_name(code: int) -> str:
    """A google.rpc.Code number as its name (``5`` -> ``NOT_FOUND``), the ``code`` label of gRPC calls."""
    return _CODE_NAMES.get(code, "UNKNOWN")


class _HistogramChild:
    """One label set of a LoopHistogram: counts per bucket (not cumulative) and their sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (seconds): into the first bucket whose bound is >= it."""
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class LoopHistogram:
    """A labelled histogram for code that runs on one event loop thread.

    Observations take no lock: correct as long as every ``observe`` and
    every scrape runs on the same thread (the server's loop), which is what
    makes an observation ~5x cheaper than prometheus-client's ``Histogram``.
    Collected by the registry it is registered with, like any collector.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        """A histogram named ``name`` (with its unit suffix, e.g. ``_seconds``) over ``buckets``
        (upper bounds; ``+Inf`` is added)."""
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        self._bounds = (*bounds, math.inf)
        self._le = ["+Inf" if math.isinf(b) else repr(b) for b in self._bounds]
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _HistogramChild] = {}

    def labels(self, *values: str) -> _HistogramChild:
        """The series of one label set, made on first use; keep it to observe without a lookup."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            child = self._children[values] = _HistogramChild(self._bounds)
        return child

    def describe(self) -> Iterable[Metric]:
        """The family without samples (lets the registry check names)."""
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterable[Metric]:
        """The family with every label set observed at least once (series
        bound ahead, such as each gRPC method's OK, stay out until used)."""
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            if not any(child.counts):
                continue
            running = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(self._le, child.counts, strict=True):
                running += count
                buckets.append((le, running))
            family.add_metric(list(values), buckets, child.sum)
        return [family]


class ModelLoad(NamedTuple):
    """What the executor says of one model at scrape time."""

    dispatched: int
    """Requests handed to a backend call (or a worker process) and not yet persisted."""
    limit: int
    """The model's in-flight limit now (``max_concurrency``, lowered after 429/503)."""
    paused: bool
    """True while the backend is unreachable and dispatch waits for a probe to get through."""


class _Followed:
    """A batch BatchProgress follows: its latest request count and the
    outcome counters counted so far."""

    __slots__ = ("children", "finished", "model", "request_count")

    def __init__(self, batch: Batch, children: tuple[Counter, ...]) -> None:
        self.model = batch.model
        self.request_count = batch.request_count
        self.finished = [batch.succeeded, batch.failed, batch.cancelled, batch.expired]
        self.children = children


class BatchProgress:
    """Counts finished requests by model and outcome from batch snapshots, and
    knows the requests still pending per model.

    ``track`` a batch when the executor takes it on (created, resumed after a
    restart, its input read): the counters it has then are its baseline, so
    results persisted before a restart never count again. ``update`` with
    every snapshot a write returns; counters only grow, so what grew beyond
    the highest seen so far is counted, and snapshots may come in any order.
    A done batch is forgotten; later snapshots of it are ignored. Costs a
    dict lookup and four compares per write, nothing per request.
    """

    __slots__ = ("_counter", "_live")

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._live: dict[str, _Followed] = {}

    def track(self, batch: Batch) -> None:
        """Start following a batch that is not done (a no-op for a done one;
        an ``update`` for one already followed)."""
        if batch.id in self._live:
            self.update(batch)
        elif not batch.done:
            children = tuple(self._counter.labels(batch.model, outcome) for outcome in OUTCOMES)
            self._live[batch.id] = _Followed(batch, children)

    def update(self, batch: Batch) -> None:
        """Count what a snapshot of a followed batch adds (nothing for one not followed)."""
        followed = self._live.get(batch.id)
        if followed is None:
            return
        followed.request_count = batch.request_count
        finished = followed.finished
        for i, now in enumerate((batch.succeeded, batch.failed, batch.cancelled, batch.expired)):
            if now > finished[i]:
                followed.children[i].inc(now - finished[i])
                finished[i] = now
        if batch.done:
            del self._live[batch.id]

    def pending(self) -> dict[str, int]:
        """Requests without a result per model, summed over the batches
        followed (as of each one's latest snapshot)."""
        out: dict[str, int] = {}
        for followed in self._live.values():
            left = followed.request_count - sum(followed.finished)
            if left > 0:
                out[followed.model] = out.get(followed.model, 0) + left
        return out

    def __len__(self) -> int:
        """How many batches are followed."""
        return len(self._live)


class _Collected:
    """A collector made of a function (the registry calls ``collect`` per scrape)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]], describe: Callable[[], Iterable[Metric]]) -> None:
        self.collect = collect
        self.describe = describe


class Metrics:
    """The registry of one server and its metrics; see the module docstring.

    Parts of the server take it at construction: the executor (requests,
    backend calls, retries, the scheduler's gauges), the gRPC edge (calls)
    and the HTTP surface (``exposition`` for ``/metrics``, ``observe_http``
    for every request).
    """

    def __init__(self, batch_counts: Callable[[], Mapping[State, int]] | None = None) -> None:
        """Metrics on a new registry.

        Args:
            batch_counts: the store's ``count_batches_by_state``, read per
                scrape; without it ``longbatch_batches`` is left out.
        """
        self.registry = CollectorRegistry()
        """The registry ``exposition`` renders; register more collectors here."""
        registry = self.registry
        self.batch_requests = Counter(
            "longbatch_batch_requests", "Requests of batches that reached a final outcome, by model and outcome "
            "(succeeded, failed, cancelled, expired), counted once persisted.",
            ["model", "outcome"], registry=registry)
        self.backend_retries = Counter(
            "longbatch_backend_retries", "Backend calls made again after a retryable failure (backoff), by model.",
            ["model"], registry=registry)
        self.backend_call_seconds = LoopHistogram(
            "longbatch_backend_call_duration_seconds",
            "Backend call latency by model: one observation per call, a bulk call of many requests included.",
            ["model"])
        self.grpc_seconds = LoopHistogram(
            "longbatch_grpc_server_handling_seconds",
            "gRPC calls by service, method and status code: seconds from the handler's start to its answer "
            "(a streaming call's last message).",
            ["service", "method", "code"])
        self.http_seconds = LoopHistogram(
            "longbatch_http_request_duration_seconds",
            "HTTP requests by route name, method and status: seconds from the request's start to its response.",
            ["route", "method", "status"])
        for histogram in (self.backend_call_seconds, self.grpc_seconds, self.http_seconds):
            registry.register(histogram)
        self.progress = BatchProgress(self.batch_requests)
        """Where the executor reports batch snapshots (see BatchProgress)."""
        self.model_load: Callable[[], Mapping[str, ModelLoad]] | None = None
        """Set by the executor: each model's dispatch state, read per scrape."""
        self._batch_counts = batch_counts
        self._http: dict[tuple[str, str, int], _HistogramChild] = {}
        registry.register(_Collected(self._collect_batches, self._describe_batches))
        registry.register(_Collected(self._collect_models, self._describe_models))

    # -- feeding ----------------------------------------------------------------

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """Record one HTTP request (HttpSurface's ``observe`` hook). A method
        outside the standard ones is recorded as ``OTHER``, so clients cannot
        grow the label set."""
        key = (route, method if method in _HTTP_METHODS else "OTHER", status)
        child = self._http.get(key)
        if child is None:
            child = self._http[key] = self.http_seconds.labels(key[0], key[1], str(status))
        child.observe(seconds)

    def grpc_observers(self, method: str) -> tuple[Callable[[float], None], Callable[[str, float], None]]:
        """For one gRPC method (``/package.Service/Method``): ``ok(seconds)``,
        its OK series bound here once, and ``failed(code, seconds)`` for any
        other code (looked up per call: the error path)."""
        service, _, name = method.lstrip("/").rpartition("/")
        histogram = self.grpc_seconds

        def failed(code: str, seconds: float) -> None:
            histogram.labels(service, name, code).observe(seconds)

        return histogram.labels(service, name, "OK").observe, failed

    # -- exposition ---------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, and its content type (``/metrics``)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _describe_batches(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("longbatch_batches", _BATCHES_HELP, labels=["state"])

    def _collect_batches(self) -> Iterator[Metric]:
        if self._batch_counts is None:
            return
        family = GaugeMetricFamily("longbatch_batches", _BATCHES_HELP, labels=["state"])
        for state, count in sorted(self._batch_counts().items()):
            family.add_metric([state.name], count)
        yield family

    def _describe_models(self) -> Iterator[Metric]:
        for name, help_text in _MODEL_GAUGES:
            yield GaugeMetricFamily(name, help_text, labels=["model"])

    def _collect_models(self) -> Iterator[Metric]:
        loads = self.model_load() if self.model_load is not None else {}
        pending = self.progress.pending()
        families = [GaugeMetricFamily(name, help_text, labels=["model"]) for name, help_text in _MODEL_GAUGES]
        waiting, in_flight, limit, paused = families
        for model in sorted(loads.keys() | pending.keys()):
            load = loads.get(model)
            dispatched = load.dispatched if load is not None else 0
            waiting.add_metric([model], max(0, pending.get(model, 0) - dispatched))
            if load is not None:
                in_flight.add_metric([model], dispatched)
                limit.add_metric([model], load.limit)
                paused.add_metric([model], int(load.paused))
        yield from families


_BATCHES_HELP = "Batches in the store by state (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED)."
_MODEL_GAUGES = (
    ("longbatch_scheduler_waiting_requests",
     "Requests of unfinished batches that wait for a backend call, by model (not yet dispatched)."),
    ("longbatch_backend_in_flight_requests",
     "Requests dispatched to the model's backend (or a worker process) and not yet persisted, by model."),
    ("longbatch_backend_concurrency_limit",
     "The model's in-flight limit now: max_concurrency, lowered while the backend answers 429/503."),
    ("longbatch_backend_paused",
     "1 while the model's backend is unreachable and its dispatch waits for a probe to get through, else 0."),
)
