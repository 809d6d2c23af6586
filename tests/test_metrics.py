"""Prometheus metrics (``GET /metrics``) against real servers, the store's
batch counts through every change of state, and the histogram behind them."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import grpc
import pytest
from conftest import MakeServer, ServerHandle
from fakemodel import FakeModel, FaultPlan
from google.longrunning import operations_pb2
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from longbatch.server.config import ApiKey, ExecutorSettings, ModelConfig, ServerConfig
from longbatch.server.domain import BatchKind, ItemStatus, NewBatch, NewItem, Outcome, State, now_us
from longbatch.server.edge import Authenticator, EdgeRegistrar
from longbatch.server.metrics import LATENCY_BUCKETS, LoopHistogram, Metrics
from longbatch.server.sqlite_store import MIGRATIONS, SQLiteStore
from longbatch.v1 import batch_pb2, model_pb2

from support import Stubs, eventually, generate_batch, metadata_of, wait_done

Labels = Mapping[str, str]


class Scrape:
    """One parsed ``/metrics`` page: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self._values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self._values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a series not exported (yet)."""
        return self._values.get((name, frozenset(labels.items())), 0.0)

    def labelled(self, name: str) -> list[Labels]:
        """The label sets of every sample named ``name``."""
        return [dict(labels) for sample_name, labels in self._values if sample_name == name]


async def scrape(server: ServerHandle, http: aiohttp.ClientSession) -> Scrape:
    async with http.get(f"{server.http}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(await response.text())


def requests_done(page: Scrape, model: str, outcome: str) -> float:
    return page.value("longbatch_batch_requests_total", model=model, outcome=outcome)


def rpc_count(page: Scrape, service: str, method: str, code: str) -> float:
    return page.value("longbatch_grpc_server_handling_seconds_count", service=service, method=method, code=code)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


OPS = "google.longrunning.Operations"


async def test_a_batch_shows_in_every_metric(server: ServerHandle, stubs: Stubs,
                                             http: aiohttp.ClientSession) -> None:
    before = await scrape(server, http)
    assert before.families["longbatch_batches"].type == "gauge"
    assert before.families["longbatch_batch_requests"].type == "counter"
    for histogram in ("longbatch_backend_call_duration_seconds", "longbatch_grpc_server_handling_seconds",
                      "longbatch_http_request_duration_seconds"):
        assert before.families[histogram].type == "histogram"
    # Every configured model has its scheduler gauges from the start.
    for model in ("models/echo", "models/echo-slow"):
        assert before.value("longbatch_backend_concurrency_limit", model=model) > 0
        assert before.value("longbatch_scheduler_waiting_requests", model=model) == 0
    assert before.value("longbatch_batches", state="SUCCEEDED") == 0

    n = 37
    op = await stubs.batches.BatchGenerateContent(generate_batch(n))
    op = await wait_done(stubs, op.name)
    assert metadata_of(op).state == batch_pb2.BatchState.BATCH_STATE_SUCCEEDED
    await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name="batches/" + "x" * 22))
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    async with http.get(f"{server.http}/healthz") as response:
        assert response.status == 200

    after = await scrape(server, http)
    assert requests_done(after, "models/echo", "succeeded") - requests_done(before, "models/echo", "succeeded") == n
    for outcome in ("failed", "cancelled", "expired"):
        assert requests_done(after, "models/echo", outcome) == 0
    assert after.value("longbatch_batches", state="SUCCEEDED") == 1
    assert after.value("longbatch_batches", state="PENDING") == after.value("longbatch_batches", state="RUNNING") == 0
    calls = "longbatch_backend_call_duration_seconds_count"
    assert after.value(calls, model="models/echo") > before.value(calls, model="models/echo")
    assert after.value("longbatch_backend_call_duration_seconds_sum", model="models/echo") > 0
    assert after.value("longbatch_backend_retries_total", model="models/echo") == 0
    assert rpc_count(after, OPS, "GetOperation", "OK") == 1
    assert rpc_count(after, OPS, "WaitOperation", "OK") >= 1
    assert rpc_count(after, OPS, "GetOperation", "NOT_FOUND") == 1
    assert rpc_count(after, "longbatch.v1.BatchService", "BatchGenerateContent", "OK") == 1
    # Buckets are cumulative and end at +Inf with the count.
    buckets = [s for s in after.families["longbatch_grpc_server_handling_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["method"] == "GetOperation" and s.labels["code"] == "OK"]
    assert [s.labels["le"] for s in buckets][-1] == "+Inf" and buckets[-1].value == 1
    assert all(a.value <= b.value for a, b in itertools.pairwise(buckets))
    healthz = "longbatch_http_request_duration_seconds_count"
    assert after.value(healthz, route="healthz", method="GET", status="200") == 1
    # The first scrape was observed too, once its answer was made.
    assert after.value(healthz, route="metrics", method="GET", status="200") >= 1


async def test_cancel_counts_the_rest_and_the_queue_drains(server: ServerHandle, stubs: Stubs,
                                                          http: aiohttp.ClientSession) -> None:
    # models/echo-slow: 50 ms a request, 16 at a time, so 320 take ~1 s.
    n, model = 320, "models/echo-slow"
    op = await stubs.batches.BatchGenerateContent(generate_batch(n, model=model))

    async def busy() -> Scrape | None:
        page = await scrape(server, http)
        running = page.value("longbatch_batches", state="RUNNING") == 1
        in_flight = page.value("longbatch_backend_in_flight_requests", model=model)
        # Requests count as they are persisted, not when the batch ends.
        counted = requests_done(page, model, "succeeded")
        return page if running and in_flight > 0 and counted > 0 else None

    page = await eventually(busy, what="the batch running, some requests counted, some in flight")
    assert page.value("longbatch_backend_in_flight_requests", model=model) <= 16
    # Waiting and in flight together are what has no result yet.
    waiting = page.value("longbatch_scheduler_waiting_requests", model=model)
    assert 0 < waiting < n

    await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
    op = await wait_done(stubs, op.name)
    stats = metadata_of(op).batch_stats
    assert stats.pending_request_count == 0 and 0 < stats.successful_request_count < n

    page = await scrape(server, http)
    succeeded, cancelled = requests_done(page, model, "succeeded"), requests_done(page, model, "cancelled")
    assert succeeded == stats.successful_request_count
    assert succeeded + cancelled == n
    assert page.value("longbatch_batches", state="CANCELLED") == 1
    assert page.value("longbatch_batches", state="RUNNING") == 0
    assert page.value("longbatch_scheduler_waiting_requests", model=model) == 0
    # Workers let go of the requests they held once their results were persisted.
    await eventually(lambda: _in_flight_is_zero(server, http, model), what="no requests in flight")


async def _in_flight_is_zero(server: ServerHandle, http: aiohttp.ClientSession, model: str) -> bool:
    page = await scrape(server, http)
    return page.value("longbatch_backend_in_flight_requests", model=model) == 0



async def test_retries_and_failures_are_counted_per_model(make_server: MakeServer, fake: FakeModel,
                                                         http: aiohttp.ClientSession) -> None:
    model = "models/remote"
    config = ServerConfig(
        models=(ModelConfig(name=model, backend="gemini-http", max_concurrency=4, options={"base_url": fake.url}),),
        executor=ExecutorSettings(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02),
    )
    server = await make_server(config)
    stubs = Stubs.connect(server.target)
    try:
        # Each prompt's first call answers 500 (retryable), its second succeeds.
        fake.plan = FaultPlan(rate=1.0, faults=("500",), max_faults_per_key=1)
        n = 6
        op = await stubs.batches.BatchGenerateContent(generate_batch(n, model=model))
        await wait_done(stubs, op.name)
        page = await scrape(server, http)
        assert page.value("longbatch_backend_retries_total", model=model) == n
        assert page.value("longbatch_backend_call_duration_seconds_count", model=model) == 2 * n == fake.stats.total
        assert requests_done(page, model, "succeeded") == n

        # 400 is final: one call, a failed request, no retry.
        fake.plan = FaultPlan(rate=1.0, faults=("400",))
        op = await stubs.batches.BatchGenerateContent(generate_batch(n, model=model))
        await wait_done(stubs, op.name)
        page = await scrape(server, http)
        assert requests_done(page, model, "failed") == n
        assert page.value("longbatch_backend_retries_total", model=model) == n
        assert page.value("longbatch_backend_call_duration_seconds_count", model=model) == 3 * n
        assert page.value("longbatch_batches", state="SUCCEEDED") == 2  # a batch succeeds with failed items
    finally:
        await stubs.channel.close()


async def test_a_restarted_server_reports_old_batches_and_never_recounts_results(
    make_server: MakeServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = tmp_path / "data"
    first = await make_server(data_dir=data)
    stubs = Stubs.connect(first.target)
    done = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(generate_batch(10))).name)
    assert done.done
    n, model = 800, "models/echo-slow"  # ~2.5 s at 16 in flight, 50 ms each
    running = await stubs.batches.BatchGenerateContent(generate_batch(n, model=model))

    async def some_finished() -> bool:
        op = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=running.name))
        return metadata_of(op).batch_stats.successful_request_count > 0

    await eventually(some_finished, what="some requests finished")
    await stubs.channel.close()
    await first.running.stop(grace_s=0)
    db = sqlite3.connect(data / "longbatch.db")
    try:
        (before_restart,) = db.execute(
            "SELECT succeeded FROM batches WHERE id = ?", (running.name.removeprefix("batches/"),)).fetchone()
    finally:
        db.close()
    assert 0 < before_restart < n

    second = await make_server(data_dir=data)
    page = await scrape(second, http)
    assert page.value("longbatch_batches", state="SUCCEEDED") >= 1
    unfinished = page.value("longbatch_batches", state="PENDING") + page.value("longbatch_batches", state="RUNNING")
    assert page.value("longbatch_batches", state="SUCCEEDED") + unfinished == 2
    stubs = Stubs.connect(second.target)
    try:
        op = await wait_done(stubs, running.name)
        assert metadata_of(op).batch_stats.successful_request_count == n
        page = await scrape(second, http)
        assert page.value("longbatch_batches", state="SUCCEEDED") == 2
        # Counted by the process that persisted them: the first server's
        # results are not counted again, the old batch's not at all.
        assert requests_done(page, model, "succeeded") == n - before_restart
        assert requests_done(page, "models/echo", "succeeded") == 0
    finally:
        await stubs.channel.close()


async def test_metrics_and_healthz_take_no_key(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await make_server(ServerConfig(api_keys=(ApiKey("k", "t"),)))
    async with http.get(f"{server.http}/healthz") as response:
        assert response.status == 200
    stubs = Stubs.connect(server.target)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.models.ListModels(model_pb2.ListModelsRequest())
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        await stubs.models.ListModels(model_pb2.ListModelsRequest(), metadata=(("x-goog-api-key", "k"),))
    finally:
        await stubs.channel.close()
    page = await scrape(server, http)  # no key sent
    assert rpc_count(page, "longbatch.v1.ModelService", "ListModels", "UNAUTHENTICATED") == 1
    assert rpc_count(page, "longbatch.v1.ModelService", "ListModels", "OK") == 1
    assert page.value("longbatch_http_request_duration_seconds_count", route="healthz", method="GET",
                      status="200") == 1


async def test_a_handler_that_aborts_is_labelled_with_its_code() -> None:
    """A servicer may abort the call itself; the edge reads the code it set."""

    async def deny(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        raise AssertionError("abort returned")

    metrics = Metrics()
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("test.Svc", {"Deny": grpc.unary_unary_rpc_method_handler(deny)})
    EdgeRegistrar(server, Authenticator(()), metrics).add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await channel.unary_unary("/test.Svc/Deny")(b"")
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(0)
    page = Scrape(metrics.exposition()[0].decode())
    assert rpc_count(page, "test.Svc", "Deny", "PERMISSION_DENIED") == 1


# -- the parts -------------------------------------------------------------------


def test_loop_histogram_matches_prometheus_client() -> None:
    """Same buckets (an observation on a bound counts in it), count and sum as the library's Histogram."""
    registry = CollectorRegistry()
    reference = Histogram("h_seconds", "h", ["k"], buckets=LATENCY_BUCKETS, registry=registry)
    ours = LoopHistogram("h_seconds", "h", ["k"])
    ours.labels("unused")  # bound ahead, never observed: left out of the page
    values = [0.0, 0.0005, 0.0007, 0.001, 0.3, 1.0, 2.5, 599.0, 600.0, 601.0, 1e9]
    for v in values:
        reference.labels("a").observe(v)
        ours.labels("a").observe(v)

    def samples(family_list: object) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name, s.labels, float(s.value)) for f in family_list for s in f.samples  # type: ignore[attr-defined]
                if not s.name.endswith("_created")]

    expected = samples(reference.collect())
    got = samples(ours.collect())
    assert sorted(map(repr, got)) == sorted(map(repr, expected))
    assert ours.labels("a").counts[-1] == 2  # 601 and 1e9 above the last bound
    with pytest.raises(ValueError, match="takes labels"):
        ours.labels("a", "b")


def test_http_methods_outside_the_standard_ones_are_one_label() -> None:
    metrics = Metrics()
    for method in ("BREW", "PROPFIND", "GET"):
        metrics.observe_http("unmatched", method, 404, 0.001)
    page = Scrape(metrics.exposition()[0].decode())
    methods = sorted(labels["method"] for labels in page.labelled("longbatch_http_request_duration_seconds_count"))
    assert methods == ["GET", "OTHER"]
    assert page.value("longbatch_http_request_duration_seconds_count", route="unmatched", method="OTHER",
                      status="404") == 2
    # Without a store the batches gauge is left out rather than made up.
    assert "longbatch_batches" not in page.families


def _new(batch_id: str) -> NewBatch:
    return NewBatch(id=batch_id, tenant="t", kind=BatchKind.GENERATE, model="models/echo", display_name="",
                    priority=0, input_file=None, webhook=None, request_id=None)


def _items(n: int) -> list[NewItem]:
    return [NewItem(i, str(i), None, b"\x00") for i in range(n)]


async def _assert_counts_match(store: SQLiteStore, path: Path) -> dict[State, int]:
    db = sqlite3.connect(path)
    try:
        grouped = dict(db.execute("SELECT state, COUNT(*) FROM batches GROUP BY state").fetchall())
    finally:
        db.close()
    counts = store.count_batches_by_state()
    assert set(counts) == set(State) - {State.UNSPECIFIED}
    assert {int(s): n for s, n in counts.items() if n} == grouped
    return counts


async def test_store_counts_batches_by_state_through_every_change(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = SQLiteStore(path)
    await store.open()
    try:
        assert set((await _assert_counts_match(store, path)).values()) == {0}
        for name in ("a", "b", "c", "d"):
            await store.create_batch(_new(name), _items(2), 0)
        assert (await _assert_counts_match(store, path))[State.PENDING] == 4
        await store.mark_running("a")
        await store.mark_running("a")  # no change the second time
        await store.mark_running("b")
        assert (await _assert_counts_match(store, path))[State.RUNNING] == 2
        await store.record_outcomes([Outcome("a", i, ItemStatus.SUCCEEDED, b"r") for i in range(2)])
        await store.close_batch("a", State.SUCCEEDED, None, ItemStatus.CANCELLED)
        assert (await _assert_counts_match(store, path))[State.RUNNING] == 2  # closed, not done yet
        await store.mark_done("a", None)
        await store.close_batch("b", State.CANCELLED, None, ItemStatus.CANCELLED)
        await store.mark_done("b", None)
        await store.close_batch("c", State.EXPIRED, None, ItemStatus.EXPIRED)
        await store.mark_done("c", None)
        counts = await _assert_counts_match(store, path)
        assert (counts[State.SUCCEEDED], counts[State.CANCELLED], counts[State.EXPIRED], counts[State.PENDING]) == (
            1, 1, 1, 1)
        assert await store.delete_batch("t", "b") == []
        assert (await _assert_counts_match(store, path))[State.CANCELLED] == 0
        purged = await store.purge_done_batches(now_us() + 1, 10, 1000)
        assert sorted(purged.batch_ids) == ["a", "c"]
        counts = await _assert_counts_match(store, path)
        assert counts[State.PENDING] == 1 and sum(counts.values()) == 1
    finally:
        await store.close()


async def test_the_migration_counts_batches_already_stored(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:6], start=1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    db.executemany(
        "INSERT INTO batches (seq, id, tenant, kind, model, display_name, priority, state, done, create_time, "
        "update_time) VALUES (?, ?, 't', 'generate', 'models/echo', '', 0, ?, ?, 1, 1)",
        [(1, "p", 1, 0), (2, "r", 2, 0), (3, "s1", 3, 1), (4, "s2", 3, 1), (5, "f", 4, 1)],
    )
    db.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        counts = await _assert_counts_match(store, path)
        assert (counts[State.PENDING], counts[State.RUNNING], counts[State.SUCCEEDED], counts[State.FAILED]) == (
            1, 1, 2, 1)
        await store.mark_running("p")
        assert (await _assert_counts_match(store, path))[State.RUNNING] == 2
    finally:
        await store.close()


async def test_the_batches_gauge_reads_kept_counts(tmp_path: Path) -> None:
    """The batches gauge reads the counts the store keeps up to date with
    triggers, not a GROUP BY over the table: rows written straight into the
    table count too."""
    path = tmp_path / "db.sqlite"
    store = SQLiteStore(path)
    await store.open()
    try:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO batches (id, tenant, kind, model, display_name, priority, state, done, create_time, "
            "update_time) VALUES (?, 't', 'generate', 'models/echo', '', 0, 3, 1, 1, 1)",
            ((f"b{i}",) for i in range(20_000)))
        db.execute("COMMIT")
        db.close()
        counts = store.count_batches_by_state()
        assert counts[State.SUCCEEDED] == 20_000
        assert sum(counts.values()) == 20_000
    finally:
        await store.close()
