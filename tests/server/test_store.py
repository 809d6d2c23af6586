"""The Store contract: every store implementation must pass these.

Every case runs against SQLiteStore and PostgresStore (the ``store``
fixture's params; PostgreSQL as tests/pg.py finds it, skipped with a line
saying how to run it when there is none, failed under CI=true).
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import operator
import sqlite3
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import asyncpg
import pytest
from pg import pg_database, pg_url, store_kinds  # noqa: F401  (fixtures, by name)

from longbatch.server.domain import BatchKind, ItemStatus, NewBatch, NewItem, Outcome, State, StoredFile, now_us
from longbatch.server.filters import TRUE, Compare
from longbatch.server.pg_store import PostgresStore
from longbatch.server.sqlite_store import MIGRATIONS, SQLiteStore
from longbatch.server.store import (
    DeliveryStatus,
    Lease,
    LeaseLost,
    OverQuota,
    Purged,
    Store,
    StoreConflict,
    TenantUsage,
    UsageLimits,
    WebhookDelivery,
)
from longbatch.v1 import batch_pb2

from support import eventually

DAY_US = 86_400_000_000


@pytest.fixture(params=store_kinds())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    # Asked for only by the postgres param, so SQLite cases never wait on PostgreSQL.
    s: Store = (SQLiteStore(tmp_path / "db.sqlite") if request.param == "sqlite"
                else PostgresStore(request.getfixturevalue("pg_url")))
    await s.open()
    yield s
    await s.close()


def new_batch(batch_id: str, tenant: str = "t", request_id: str | None = None, **kw: object) -> NewBatch:
    fields: dict[str, object] = dict(id=batch_id, tenant=tenant, kind=BatchKind.GENERATE, model="models/echo",
                                     display_name="", priority=0, input_file=None, webhook=None,
                                     request_id=request_id)
    fields.update(kw)
    return NewBatch(**fields)  # type: ignore[arg-type]


def items(n: int) -> list[NewItem]:
    return [NewItem(idx=i, key=f"k{i}", metadata=None, payload=f"p{i}".encode()) for i in range(n)]


async def test_create_get_and_tenant_scoping(store: Store) -> None:
    batch, created = await store.create_batch(new_batch("a1"), items(5), DAY_US)
    assert created and batch.request_count == 5 and batch.state is State.PENDING and batch.pending == 5
    assert (await store.get_batch("t", "a1")) == batch
    assert await store.get_batch("other", "a1") is None
    assert (await store.get_batch(None, "a1")) == batch


async def test_request_id_dedupes_within_ttl_and_per_tenant(store: Store) -> None:
    await store.create_batch(new_batch("b1", request_id="r"), items(1), DAY_US)
    again, created = await store.create_batch(new_batch("b2", request_id="r"), items(1), DAY_US)
    assert not created and again.id == "b1"
    other, created = await store.create_batch(new_batch("b3", tenant="u", request_id="r"), items(1), DAY_US)
    assert created and other.id == "b3"
    # Past the TTL the id may be used again.
    fresh, created = await store.create_batch(new_batch("b4", request_id="r"), items(1), 0)
    assert created and fresh.id == "b4"


async def test_outcomes_count_once_and_results_stop_at_first_pending(store: Store) -> None:
    await store.create_batch(new_batch("c1"), items(4), DAY_US)
    ok = Outcome("c1", 0, ItemStatus.SUCCEEDED, b"r0")
    touched = await store.record_outcomes([ok, Outcome("c1", 1, ItemStatus.FAILED, b"e1")])
    assert (touched["c1"].succeeded, touched["c1"].failed) == (1, 1)
    touched = await store.record_outcomes([ok])  # delivered twice: counted once
    assert touched["c1"].succeeded == 1
    await store.record_outcomes([Outcome("c1", 3, ItemStatus.SUCCEEDED, b"r3")])
    rows = await store.results("c1", 0, 100)
    assert [r.idx for r in rows] == [0, 1]  # idx 2 still pending
    everything = await store.results("c1", 0, 100, to_first_pending=False)
    assert [r.status for r in everything] == [ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.PENDING,
                                              ItemStatus.SUCCEEDED]
    pending = await store.pending_items("c1", 0, 10)
    assert [p.idx for p in pending] == [2]


async def test_results_in_columns_count_once_and_stop_at_close(store: Store) -> None:
    await store.create_batch(new_batch("c2"), items(600), DAY_US)
    batch = await store.record_results("c2", ItemStatus.SUCCEEDED, range(0, 600, 2), [b"r%d" % i for i in range(300)])
    assert batch is not None and (batch.succeeded, batch.pending) == (300, 300)
    # Delivered again, together with new ones: only the new ones count.
    batch = await store.record_results("c2", ItemStatus.SUCCEEDED, [0, 1, 3], [b"again", b"r1", b"r3"])
    assert batch is not None and batch.succeeded == 302
    rows = await store.results("c2", 0, 5)
    assert [(r.idx, r.result) for r in rows] == [(0, b"r0"), (1, b"r1"), (2, b"r1"), (3, b"r3"), (4, b"r2")]
    await store.close_batch("c2", State.CANCELLED, None, ItemStatus.CANCELLED)
    assert await store.record_results("c2", ItemStatus.SUCCEEDED, [5], [b"late"]) is None


async def test_close_keeps_results_counts_the_rest_and_ignores_late_results(store: Store) -> None:
    await store.create_batch(new_batch("d1"), items(10), DAY_US)
    await store.record_outcomes([Outcome("d1", i, ItemStatus.SUCCEEDED, b"r") for i in range(3)])
    closed = await store.close_batch("d1", State.CANCELLED, b"err", ItemStatus.CANCELLED)
    # Closed: the terminal state is decided but shows only once done.
    assert closed is not None and closed.final_state is State.CANCELLED and not closed.done
    assert closed.state is State.PENDING and closed.closed
    assert (closed.succeeded, closed.cancelled, closed.pending) == (3, 7, 0)
    assert await store.record_outcomes([Outcome("d1", 5, ItemStatus.SUCCEEDED, b"late")]) == {}
    again = await store.close_batch("d1", State.EXPIRED, None, ItemStatus.EXPIRED)  # first close wins
    assert again is not None and again.final_state is State.CANCELLED and again.expired == 0
    done = await store.mark_done("d1", None)
    assert done is not None and done.done and done.end_time_us is not None and done.state is State.CANCELLED


async def test_large_writes_count_every_row_once(store: Store) -> None:
    # Sizes around the store's statement chunking, several statuses at once,
    # and results delivered twice in the same call.
    statuses = [ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELLED]
    for n in (1, 511, 512, 513, 2001):
        batch, _ = await store.create_batch(new_batch(f"h{n}"), iter(items(n)), DAY_US)
        assert batch.request_count == n
        await store.append_requests(f"h{n}", n, [x for i in range(n) for x in (i, f"a{n + i}", b"q")])
        outcomes = [Outcome(f"h{n}", i, statuses[i % 3], b"r%d" % i) for i in range(0, 2 * n, 2)]
        touched = await store.record_outcomes(outcomes + outcomes[: len(outcomes) // 2])
        expected = [sum(1 for o in outcomes if o.status is s) for s in statuses]
        got = touched[f"h{n}"]
        assert [got.succeeded, got.failed, got.cancelled] == expected
        again = await store.record_outcomes(outcomes)
        assert [again[f"h{n}"].succeeded, again[f"h{n}"].failed, again[f"h{n}"].cancelled] == expected
        rows = await store.results(f"h{n}", 0, 10 * n, to_first_pending=False)
        assert [r.idx for r in rows] == list(range(2 * n))
        assert all(r.result == b"r%d" % r.idx and r.status is statuses[r.idx % 3] for r in rows[::2])
        assert all(r.status is ItemStatus.PENDING for r in rows[1::2])
        assert all(r.key == f"a{r.idx}" and r.metadata is None for r in rows[n:])


async def test_delete_only_when_done(store: Store) -> None:
    await store.create_batch(new_batch("e1"), items(1), DAY_US)
    with pytest.raises(StoreConflict):
        await store.delete_batch("t", "e1")
    await store.close_batch("e1", State.CANCELLED, None, ItemStatus.CANCELLED)
    await store.mark_done("e1", None)
    assert await store.delete_batch("other", "e1") is None
    assert await store.delete_batch("t", "e1") == []
    assert await store.delete_batch("t", "e1") is None


async def test_a_done_batch_reads_as_it_is_after_rename_delete_and_purge(store: Store) -> None:
    # Reads of done batches may be served from memory: every change must show.
    for batch_id in ("g1", "g2", "g3"):
        await store.create_batch(new_batch(batch_id), items(2), DAY_US)
        await store.close_batch(batch_id, State.CANCELLED, None, ItemStatus.CANCELLED)
        done = await store.mark_done(batch_id, None)
        assert (await store.get_batch("t", batch_id)) == done
        assert (await store.get_batch("t", batch_id)) == done  # twice: from memory now, maybe
        assert await store.get_batch("other", batch_id) is None
    renamed = await store.update_batch("t", "g1", display_name="renamed", priority=None)
    assert renamed is not None
    got = await store.get_batch("t", "g1")
    assert got == renamed and got is not None and got.display_name == "renamed"
    assert await store.delete_batch("t", "g2") == []
    assert await store.get_batch("t", "g2") is None
    purged = await store.purge_done_batches(now_us() + DAY_US, max_batches=10, max_requests=100)
    assert sorted(purged.batch_ids) == ["g1", "g3"]
    assert await store.get_batch("t", "g1") is None and await store.get_batch(None, "g3") is None


async def test_only_sqlite_hands_ranges_and_result_reading_to_worker_processes(store: Store) -> None:
    """Worker processes open SQLite's file themselves; on PostgreSQL the
    executor runs ranges and reads results in the server (None is allowed)."""
    batch, _ = await store.create_batch(new_batch("w1"), items(3), DAY_US)
    expected = isinstance(store, SQLiteStore)
    assert (store.range_runner(batch) is not None) is expected
    assert (store.result_reader(batch) is not None) is expected


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
async def test_a_range_runner_answers_pending_requests_once_from_another_process(store: Store) -> None:
    batch, _ = await store.create_batch(new_batch("r1"), items(10), DAY_US)
    await store.record_results("r1", ItemStatus.SUCCEEDED, [2, 3], [b"earlier", b"earlier"])
    runner = store.range_runner(batch)
    assert runner is not None
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        run = functools.partial(asyncio.get_running_loop().run_in_executor, pool, runner)
        done = await run(0, 5, upper)  # 0, 1 and 4: 2 and 3 keep their results
        assert done.answered and done.batch is not None and (done.batch.succeeded, done.batch.pending) == (5, 5)
        assert (await run(0, 5, upper)) == (True, None)  # nothing left there
        assert (await run(5, 10, operator.neg)) == (False, None)  # the answerer raises: nothing written
        assert (await run(5, 10, len)) == (False, None)  # answers that are no list: nothing written
        assert (await run(5, 10, reversed_but_one)) == (False, None)  # a wrong count: nothing written
        await store.close_batch("r1", State.CANCELLED, None, ItemStatus.CANCELLED)
        late = await run(5, 10, upper)  # answered, but a closed batch takes no more
        assert late.answered and late.batch is None
    rows = await store.results("r1", 0, 10, to_first_pending=False)
    assert [r.result for r in rows[:5]] == [b"P0", b"P1", b"earlier", b"earlier", b"P4"]
    assert all(r.status is ItemStatus.PENDING for r in rows[5:])
    closed = await store.get_batch(None, "r1")
    assert closed is not None and (closed.succeeded, closed.cancelled) == (5, 5)


def upper(payloads: list[bytes]) -> list[bytes]:
    """A picklable answerer for the range runner test."""
    return [p.upper() for p in payloads]


def reversed_but_one(payloads: list[bytes]) -> list[bytes]:
    """An answerer that loses an answer."""
    return payloads[:0:-1]


async def test_list_is_newest_first_keyset_paged_and_filtered(store: Store) -> None:
    for i in range(7):
        await store.create_batch(new_batch(f"f{i}", priority=i % 2), items(1), DAY_US)
    page = await store.list_batches("t", TRUE, None, 3)
    assert [b.id for b in page] == ["f6", "f5", "f4"]
    page = await store.list_batches("t", TRUE, page[-1].seq, 3)
    assert [b.id for b in page] == ["f3", "f2", "f1"]
    odd = await store.list_batches("t", Compare("priority", "=", 1), None, 10)
    assert [b.id for b in odd] == ["f5", "f3", "f1"]
    assert await store.list_batches("other", TRUE, None, 10) == []


async def test_writes_survive_cancelled_callers(store: Store) -> None:
    """A caller cancelled mid-write (client deadline, shutdown) must leave the
    store consistent and usable: the write completes or not at all."""
    await store.create_batch(new_batch("g1"), items(200), DAY_US)
    failures = []
    for i in range(150):
        task = asyncio.ensure_future(store.record_outcomes([Outcome("g1", i, ItemStatus.SUCCEEDED, b"r")]))
        # Cancel at varied points: before, during and after the thread hops.
        if i % 3:
            await asyncio.sleep((i % 7) * 0.0002)
        task.cancel()
        (result,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            failures.append(repr(result))
    assert failures == []
    # Writes run in the order they were submitted, and a submitted one runs
    # to its end though its caller was cancelled: a write made now returns
    # after every one of them.
    await store.secret("after the cancelled writes")
    batch = await store.get_batch("t", "g1")
    assert batch is not None
    rows = await store.results("g1", 0, 1000, to_first_pending=False)
    assert batch.succeeded == sum(r.status is ItemStatus.SUCCEEDED for r in rows)
    # The writer is not left inside a stray transaction.
    await store.record_outcomes([Outcome("g1", 199, ItemStatus.SUCCEEDED, b"r")])
    created, _ = await store.create_batch(new_batch("g2"), items(1), DAY_US)
    assert created.id == "g2"


async def test_v5_database_keeps_its_results_through_the_v6_migration(tmp_path: Path) -> None:
    """Schema v6 moved results out of the requests table; a database written
    by v5 must come through with every result and every pending request."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:5], start=1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    db.execute(
        "INSERT INTO batches (seq, id, tenant, kind, model, display_name, priority, state, create_time, update_time, "
        "request_count, succeeded, failed) VALUES (1, 'old', 't', 'generate', 'models/echo', '', 0, 2, 1, 1, 3, 1, 1)"
    )
    db.executemany(
        "INSERT INTO requests (batch_seq, idx, key, payload, status, result) VALUES (1, ?, ?, x'00', ?, ?)",
        [(0, "a", 1, b"ok"), (1, "b", 2, b"bad"), (2, "c", 0, None)],
    )
    db.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        rows = await store.results("old", 0, 10, to_first_pending=False)
        assert [(r.key, r.status, r.result) for r in rows] == [
            ("a", ItemStatus.SUCCEEDED, b"ok"), ("b", ItemStatus.FAILED, b"bad"), ("c", ItemStatus.PENDING, b"")]
        assert [p.idx for p in await store.pending_items("old", 0, 10)] == [2]
        # The migrated batch still takes its last result, once.
        touched = await store.record_outcomes([Outcome("old", 2, ItemStatus.SUCCEEDED, b"late")] * 2)
        assert touched["old"].succeeded == 2 and touched["old"].pending == 0
    finally:
        await store.close()


async def test_quotas_are_checked_in_the_write_and_nothing_is_stored_over_them(store: Store) -> None:
    limits = UsageLimits(unfinished_batches=2, pending_requests=10)
    await store.create_batch(new_batch("q1"), items(6), DAY_US, limits)
    with pytest.raises(OverQuota) as over:
        await store.create_batch(new_batch("q2"), items(5), DAY_US, limits)
    assert (over.value.quota, over.value.used, over.value.adding, over.value.limit) == ("pending_requests", 6, 5, 10)
    assert await store.get_batch("t", "q2") is None
    # A file batch has no requests yet but needs room for one.
    file_batch, _ = await store.create_batch(new_batch("q3", input_file="in"), [], DAY_US, limits)
    assert not file_batch.ingested and file_batch.request_count == 0
    with pytest.raises(OverQuota) as over:
        await store.create_batch(new_batch("q4"), items(1), DAY_US, limits)
    assert over.value.quota == "unfinished_batches"
    assert await store.usage("t") == TenantUsage(0, 0, 2, 6)
    # Requests read from the file count as they are appended.
    await store.append_requests("q3", 0, [0, "a", b"x", 1, "b", b"y"], max_pending=10)
    assert (await store.usage("t")).pending_requests == 8
    with pytest.raises(OverQuota):
        await store.append_requests("q3", 2, [x for i in range(3) for x in (i, f"k{i}", b"z")], max_pending=10)
    assert [r.idx for r in await store.results("q3", 0, 10, to_first_pending=False)] == [0, 1]
    # Another tenant has its own room; no limits, no checks.
    await store.create_batch(new_batch("q5", tenant="u"), items(9), DAY_US, limits)
    await store.create_batch(new_batch("q6"), items(100), DAY_US)
    assert await store.usage("u") == TenantUsage(0, 0, 1, 9)


async def test_concurrent_creates_respect_request_ids_and_quotas(store: Store) -> None:
    got = await asyncio.gather(*(store.create_batch(new_batch(f"x{i}", request_id="same"), items(2), DAY_US)
                                 for i in range(8)))
    assert sum(created for _, created in got) == 1 and len({b.id for b, _ in got}) == 1
    limits = UsageLimits(unfinished_batches=4)
    tries = await asyncio.gather(*(store.create_batch(new_batch(f"y{i}", tenant="u"), items(1), DAY_US, limits)
                                   for i in range(10)), return_exceptions=True)
    assert sum(isinstance(t, OverQuota) for t in tries) == 6
    assert (await store.usage("u")).unfinished_batches == 4


async def test_file_ingest_finishes_or_resets(store: Store) -> None:
    batch, _ = await store.create_batch(new_batch("i1", input_file="in"), [], DAY_US)
    assert not batch.ingested and batch.state is State.PENDING
    await store.append_requests("i1", 0, [x for i in range(300) for x in (i, f"k{i}", b"p%d" % i)])
    await store.reset_ingest("i1")
    assert await store.results("i1", 0, 10, to_first_pending=False) == []
    await store.append_requests("i1", 0, [0, "a", b"x"])
    await store.append_requests("i1", 1, [0, "b", b"y", 1, "c", b"z"])
    done = await store.finish_ingest("i1", 3)
    assert done is not None and done.ingested and done.request_count == 3 and done.pending == 3
    await store.reset_ingest("i1")  # an ingested batch keeps its requests
    assert [(p.idx, p.payload) for p in await store.pending_items("i1", 1, 10)] == [(1, b"y"), (2, b"z")]
    assert await store.finish_ingest("nope", 1) is None


async def test_unfinished_running_expired_and_counts_by_state(store: Store) -> None:
    assert set(store.count_batches_by_state().values()) == {0}
    for i in range(4):
        await store.create_batch(new_batch(f"u{i}"), items(2), DAY_US)
    await store.mark_running("u1")
    await store.mark_running("u1")  # only PENDING moves
    await store.close_batch("u2", State.FAILED, b"why", ItemStatus.FAILED)
    await store.mark_done("u2", None)
    assert [b.id for b in await store.unfinished_batches()] == ["u0", "u1", "u3"]
    running = await store.get_batch(None, "u1")
    assert running is not None and running.state is State.RUNNING
    counts = store.count_batches_by_state()
    assert State.UNSPECIFIED not in counts and len(counts) == 6
    assert (counts[State.PENDING], counts[State.RUNNING], counts[State.FAILED]) == (2, 1, 1)
    assert await store.expired_batches(0) == []
    assert sorted(await store.expired_batches(now_us() + 1)) == ["u0", "u1", "u3"]
    # A done batch keeps its priority; its name may change.
    failed = await store.update_batch("t", "u2", display_name="x", priority=7)
    assert failed is not None and (failed.display_name, failed.priority, failed.error) == ("x", 0, b"why")
    assert await store.update_batch("other", "u2", display_name="y", priority=None) is None
    await store.delete_batch("t", "u2")
    assert store.count_batches_by_state()[State.FAILED] == 0


async def test_purge_takes_a_big_batch_in_steps_from_its_tail(store: Store) -> None:
    await store.create_batch(new_batch("p1"), items(25), DAY_US)
    await store.record_results("p1", ItemStatus.SUCCEEDED, range(25), [b"r"] * 25)
    await store.create_batch(new_batch("p2"), items(3), DAY_US)
    for batch_id in ("p1", "p2"):
        await store.close_batch(batch_id, State.SUCCEEDED, None, ItemStatus.CANCELLED)
        await store.mark_done(batch_id, None)
    assert (await store.purge_done_batches(now_us() - DAY_US, 10, 10)) == Purged([], [], False)
    step = await store.purge_done_batches(now_us() + 1, 10, 10)
    assert step.batch_ids == [] and step.more
    rows = await store.results("p1", 0, 100)
    assert [r.idx for r in rows] == list(range(15))  # a shorter tail, never a gap
    step = await store.purge_done_batches(now_us() + 1, 10, 10)
    assert step.batch_ids == [] and step.more and len(await store.results("p1", 0, 100)) == 5
    step = await store.purge_done_batches(now_us() + 1, 10, 10)
    assert step.batch_ids == ["p1", "p2"] and not step.more
    assert await store.get_batch(None, "p1") is None and await store.results("p1", 0, 10) == []


async def test_sizes_and_finished_counts(store: Store) -> None:
    batch, _ = await store.create_batch(
        new_batch("s1"), [NewItem(i, f"k{i}", b"meta" if i % 2 else None, b"p") for i in range(6)], DAY_US)
    await store.record_results("s1", ItemStatus.SUCCEEDED, [0, 1, 4], [b"12345", b"", b"123"])
    assert await store.finished_count(batch, 0, 6) == 3
    assert await store.finished_count(batch, 1, 4) == 1
    # 8 bytes of results, 3 unfinished at 64 each, 12 bytes of metadata, 16 per request.
    assert await store.output_size("s1") == 8 + 3 * 64 + 12 + 6 * 16
    assert await store.output_size("nope") == 0
    assert await store.pending_items("nope", 0, 10) == [] and await store.results("nope", 0, 10) == []


# -- files --------------------------------------------------------------------------


def new_file(file_id: str, tenant: str = "t", size: int = 10, expire_us: int | None = None,
             source: str = "uploaded") -> StoredFile:
    return StoredFile(id=file_id, seq=0, tenant=tenant, display_name=f"name-{file_id}", mime_type="application/jsonl",
                      size_bytes=size, sha256=b"\x01" * 32, create_time_us=now_us(), expire_time_us=expire_us,
                      source=source)


async def done_batch(store: Store, batch_id: str, **kw: object) -> None:
    await store.create_batch(new_batch(batch_id, **kw), items(1), DAY_US)
    await store.close_batch(batch_id, State.CANCELLED, None, ItemStatus.CANCELLED)
    await store.mark_done(batch_id, None)


async def test_files_are_stored_scoped_listed_newest_first_and_deleted(store: Store) -> None:
    for i in range(5):
        await store.add_file(new_file(f"f{i}", expire_us=1000 + i))
    await store.add_file(new_file("u0", tenant="u", source="generated"))
    got = await store.get_file("t", "f2")
    assert got is not None and got.seq > 0
    assert (got.id, got.tenant, got.display_name, got.mime_type, got.size_bytes, got.sha256, got.expire_time_us,
            got.source) == ("f2", "t", "name-f2", "application/jsonl", 10, b"\x01" * 32, 1002, "uploaded")
    assert await store.get_file("u", "f2") is None and await store.get_file(None, "f2") == got
    assert await store.get_file("t", "nope") is None
    page = await store.list_files("t", None, 2)
    assert [f.id for f in page] == ["f4", "f3"]
    page = await store.list_files("t", page[-1].seq, 10)
    assert [f.id for f in page] == ["f2", "f1", "f0"]
    assert [f.id for f in await store.list_files("u", None, 10)] == ["u0"]
    assert await store.delete_file("u", "f1") is False  # another tenant's
    assert await store.delete_file("t", "nope") is False
    assert await store.delete_file("t", "f1") is True
    assert await store.get_file("t", "f1") is None and await store.delete_file("t", "f1") is False
    assert await store.usage("t") == TenantUsage(40, 4, 0, 0)


async def test_a_file_read_by_a_batch_not_done_is_kept(store: Store) -> None:
    await store.add_file(new_file("in", expire_us=1))
    await store.add_file(new_file("old", expire_us=2))
    await store.add_file(new_file("new", expire_us=now_us() + DAY_US))
    await store.add_file(new_file("out", source="generated"))  # no expiry: goes with its batch
    await store.create_batch(new_batch("reader", input_file="in"), [], DAY_US)
    with pytest.raises(StoreConflict):
        await store.delete_file("t", "in")
    assert [f.id for f in await store.expired_files(now_us())] == ["old"]
    await store.close_batch("reader", State.CANCELLED, None, ItemStatus.CANCELLED)
    assert [f.id for f in await store.expired_files(now_us())] == ["old"]  # closed is not done
    await store.mark_done("reader", None)
    assert [f.id for f in await store.expired_files(now_us())] == ["in", "old"]  # oldest first
    assert [f.id for f in await store.expired_files(now_us(), limit=1)] == ["in"]
    assert [f.id for f in await store.expired_files(1)] == ["in"]
    assert await store.delete_file("t", "in") is True


async def test_file_quotas_are_checked_in_the_write(store: Store) -> None:
    limits = UsageLimits(stored_bytes=100, files=3)
    await store.add_file(new_file("a", size=60), limits)
    with pytest.raises(OverQuota) as over:
        await store.add_file(new_file("b", size=41), limits)
    assert (over.value.quota, over.value.used, over.value.adding, over.value.limit) == ("stored_bytes", 60, 41, 100)
    assert await store.get_file("t", "b") is None
    await store.add_file(new_file("b", size=40), limits)
    await store.add_file(new_file("c", size=0), limits)
    with pytest.raises(OverQuota) as over:
        await store.add_file(new_file("d", size=0), limits)
    assert over.value.quota == "files"
    await store.add_file(new_file("d", size=1000))  # no limits, no checks
    await store.add_file(new_file("e", tenant="u", size=100), limits)  # another tenant's room
    assert await store.usage("t") == TenantUsage(1100, 4, 0, 0)
    # Concurrent adds: the check and the insert do not interleave.
    tries = await asyncio.gather(*(store.add_file(new_file(f"v{i}", tenant="v", size=1), UsageLimits(files=4))
                                   for i in range(10)), return_exceptions=True)
    assert sum(isinstance(t, OverQuota) for t in tries) == 6 and (await store.usage("v")).files == 4


# -- webhook deliveries -----------------------------------------------------------------


def delivery(delivery_id: str, batch_id: str, uri: str = "http://x.test/a", due_us: int = 0) -> WebhookDelivery:
    return WebhookDelivery(id=delivery_id, batch_id=batch_id, uri=uri, body=b'{"n":1}', attempts=0,
                           next_attempt_us=due_us)


async def orphan_deliveries(store: Store, count: int) -> None:
    """Store deliveries whose batch is gone, as older versions left them."""
    rows = [(f"orphan{i}", "gone", f"http://x.test/{i}", b"{}", 0, 0, 0) for i in range(count)]
    sql = ("INSERT INTO webhook_deliveries (id, batch_id, uri, body, next_attempt_time, create_time, update_time) "
           "VALUES ({})")
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store._path)
        with db:
            db.executemany(sql.format("?, ?, ?, ?, ?, ?, ?"), rows)
        db.close()
    else:
        assert isinstance(store, PostgresStore)
        conn = await asyncpg.connect(store._url)
        try:
            await conn.executemany(sql.format("$1, $2, $3, $4, $5, $6, $7"), rows)
        finally:
            await conn.close()


async def test_deliveries_are_stored_once_per_uri_and_only_for_existing_batches(store: Store) -> None:
    await done_batch(store, "w1")
    await done_batch(store, "w2")
    added = await store.add_webhook_deliveries([delivery("d1", "w1"), delivery("d2", "w1", "http://x.test/b"),
                                                delivery("d3", "w2"), delivery("d4", "gone")])
    assert added == 3
    # The same (batch, uri) again, under a new id, and an id again: kept as they are.
    assert await store.add_webhook_deliveries([delivery("d5", "w1"), delivery("d1", "w2", "http://x.test/c")]) == 0
    assert await store.add_webhook_deliveries([]) == 0
    due = await store.due_webhook_deliveries(now_us(), 10)
    assert sorted(d.id for d in due) == ["d1", "d2", "d3"]
    assert next(d for d in due if d.id == "d1") == delivery("d1", "w1")
    # Deleting a batch deletes its deliveries; an enqueue after that stores nothing.
    assert await store.delete_batch("t", "w2") == []
    assert sorted(d.id for d in await store.due_webhook_deliveries(now_us(), 10)) == ["d1", "d2"]
    assert await store.add_webhook_deliveries([delivery("d6", "w2")]) == 0


async def test_deliveries_come_due_in_order_and_record_their_attempts(store: Store) -> None:
    await done_batch(store, "w1")
    now = now_us()
    await store.add_webhook_deliveries([delivery("late", "w1", "http://x.test/l", now + 5_000_000),
                                        delivery("second", "w1", "http://x.test/s", now - 1_000),
                                        delivery("first", "w1", "http://x.test/f", now - 2_000)])
    assert [d.id for d in await store.due_webhook_deliveries(now, 10)] == ["first", "second"]
    assert [d.id for d in await store.due_webhook_deliveries(now, 1)] == ["first"]
    assert await store.next_webhook_time(now) == now + 5_000_000
    assert await store.next_webhook_time(now + 5_000_000) is None
    await store.record_webhook_attempt("first", 1, DeliveryStatus.PENDING, now + 1_000_000, "HTTP 500")
    await store.record_webhook_attempt("second", 1, DeliveryStatus.DELIVERED, now, None)
    assert await store.due_webhook_deliveries(now, 10) == []
    assert await store.next_webhook_time(now) == now + 1_000_000
    retry = await store.due_webhook_deliveries(now + 1_000_000, 10)
    assert [(d.id, d.attempts, d.next_attempt_us) for d in retry] == [("first", 1, now + 1_000_000)]
    await store.record_webhook_attempt("first", 2, DeliveryStatus.FAILED, now, "HTTP 500")
    await store.record_webhook_attempt("late", 1, DeliveryStatus.DELIVERED, now, None)
    assert await store.due_webhook_deliveries(now + DAY_US, 10) == [] and await store.next_webhook_time(0) is None


async def test_batches_missing_webhooks_and_orphan_deliveries(store: Store) -> None:
    config = batch_pb2.WebhookConfig(uris=["http://x.test/a"]).SerializeToString()
    await done_batch(store, "m1", webhook=config)
    await done_batch(store, "m2", webhook=config)
    await done_batch(store, "m3")  # no webhook
    await store.create_batch(new_batch("m4", webhook=config), items(1), DAY_US)  # not done
    assert [b.id for b in await store.batches_missing_webhooks()] == ["m1", "m2"]
    await store.add_webhook_deliveries([delivery("d1", "m1")])
    assert [b.id for b in await store.batches_missing_webhooks()] == ["m2"]
    await orphan_deliveries(store, 5)
    assert await store.delete_orphan_webhook_deliveries(3) == 3
    assert await store.delete_orphan_webhook_deliveries(3) == 2
    assert await store.delete_orphan_webhook_deliveries(3) == 0
    assert [d.id for d in await store.due_webhook_deliveries(now_us(), 10)] == ["d1"]


# -- leases ---------------------------------------------------------------------------


async def until_acquired(store: Store, name: str, owner: str, ttl_s: float, within: float = 10.0) -> Lease:
    """Ask for the lease until it is granted (the holder's expires); bounded."""
    lease: Lease = await eventually(lambda: store.acquire_lease(name, owner, ttl_s), within,
                                    what=f"lease {name} for {owner}", every=0.01)
    return lease


async def test_a_lease_goes_to_one_owner_of_those_contending(store: Store) -> None:
    tries = await asyncio.gather(*(store.acquire_lease("job", f"o{i}", 60) for i in range(8)))
    granted = [t for t in tries if t is not None]
    assert len(granted) == 1 and granted[0].name == "job" and granted[0].token >= 1
    lease = granted[0]
    assert await store.holds_lease(lease)
    assert await store.acquire_lease("job", lease.owner, 60) is None  # held: by its owner too
    assert await store.acquire_lease("other-job", "o0", 60) is not None  # names are independent
    assert await store.renew_lease(lease, 60)
    assert not await store.renew_lease(Lease("job", "o-not", lease.token), 60)  # not the holder
    assert not await store.renew_lease(Lease("job", lease.owner, lease.token + 1), 60)  # not the token
    assert not await store.holds_lease(Lease("job", lease.owner, lease.token - 1))


async def test_an_expired_lease_goes_to_another_with_a_greater_token(store: Store) -> None:
    first = await store.acquire_lease("job", "a", 0.05)
    assert first is not None
    second = await until_acquired(store, "job", "b", 60)
    assert second.token > first.token and second.owner == "b"
    # The first holder lost it: no renew, no hold, no release of the new grant.
    assert not await store.holds_lease(first)
    assert not await store.renew_lease(first, 60)
    await store.release_lease(first)
    assert await store.holds_lease(second) and await store.acquire_lease("job", "a", 60) is None
    # An expired lease that nobody took is not renewed either: acquire again.
    lapsed = await store.acquire_lease("lapsing", "a", 0.01)
    assert lapsed is not None
    async def lapsed_out() -> bool:
        return not await store.holds_lease(lapsed)

    await eventually(lapsed_out, what="the lease expiring", every=0.01)
    assert not await store.renew_lease(lapsed, 60)


async def test_a_released_lease_is_free_at_once_and_tokens_never_go_back(store: Store) -> None:
    tokens = []
    for i in range(6):
        lease = await store.acquire_lease("job", f"o{i % 2}", 60)
        assert lease is not None
        tokens.append(lease.token)
        await store.release_lease(lease)
        assert not await store.holds_lease(lease) and not await store.renew_lease(lease, 60)
    assert tokens == sorted(set(tokens))
    # Expired grants count too.
    lease = await store.acquire_lease("job", "x", 0.01)
    assert lease is not None and lease.token > tokens[-1]
    after = await until_acquired(store, "job", "y", 60)
    assert after.token > lease.token


async def test_a_fenced_write_under_a_lost_lease_is_refused(store: Store) -> None:
    await done_batch(store, "b1")
    await store.add_file(new_file("f1", expire_us=1))
    lease = await store.acquire_lease("retention", "a", 0.05)
    assert lease is not None
    taker = await until_acquired(store, "retention", "b", 60)
    with pytest.raises(LeaseLost):
        await store.purge_done_batches(now_us() + 1, 10, 100, lease=lease)
    with pytest.raises(LeaseLost):
        await store.delete_file("t", "f1", lease=lease)
    assert await store.get_batch(None, "b1") is not None and await store.get_file("t", "f1") is not None
    # Under the live lease the same writes go through.
    assert (await store.purge_done_batches(now_us() + 1, 10, 100, lease=taker)).batch_ids == ["b1"]
    assert await store.delete_file("t", "f1", lease=taker)
    await store.release_lease(taker)
    with pytest.raises(LeaseLost):
        await store.delete_file("t", "f1", lease=taker)


async def test_due_deliveries_are_claimed_by_one_dispatcher_at_a_time(store: Store) -> None:
    await done_batch(store, "w1")
    now = now_us()
    await store.add_webhook_deliveries([delivery(f"d{i}", "w1", f"http://x.test/{i}", now - 1000 + i)
                                        for i in range(10)])
    claims = await asyncio.gather(*(store.claim_webhook_deliveries(now, 3, 60) for _ in range(4)))
    ids = [d.id for got in claims for d in got]
    assert sorted(ids) == sorted(f"d{i}" for i in range(10))  # each once, none left out
    assert all(len(got) <= 3 and [d.next_attempt_us for d in got] == sorted(d.next_attempt_us for d in got)
               for got in claims)
    assert all(d.claim >= 1 for got in claims for d in got)
    assert await store.claim_webhook_deliveries(now, 10, 60) == []  # all held
    assert len(await store.due_webhook_deliveries(now, 20)) == 10  # still PENDING and due
    # A claimed delivery comes due again when its claim ends.
    later = await store.next_webhook_time(now)
    assert later is not None and later > now + 50_000_000
    first = next(d for got in claims for d in got if d.id == "d0")
    assert await store.record_webhook_attempt("d0", 1, DeliveryStatus.PENDING, now + 5, "HTTP 500", claim=first.claim)
    # Recorded: the claim ended, the retry is due at its time.
    (again,) = await store.claim_webhook_deliveries(now + 5, 10, 60)
    assert (again.id, again.attempts) == ("d0", 1) and again.claim > first.claim


async def test_an_attempt_under_a_claim_taken_over_is_not_recorded(store: Store) -> None:
    await done_batch(store, "w1")
    now = now_us()
    await store.add_webhook_deliveries([delivery("d1", "w1", due_us=now)])
    (lost,) = await store.claim_webhook_deliveries(now, 10, 0.05)

    async def claim_again() -> list[WebhookDelivery]:
        return await store.claim_webhook_deliveries(now, 10, 60)

    (taken,) = await eventually(claim_again, what="the claim running out", every=0.01)
    assert taken.id == "d1" and taken.claim > lost.claim
    assert not await store.record_webhook_attempt("d1", 1, DeliveryStatus.DELIVERED, now, None, claim=lost.claim)
    assert [d.id for d in await store.due_webhook_deliveries(now, 10)] == ["d1"]  # nothing written
    assert await store.record_webhook_attempt("d1", 1, DeliveryStatus.DELIVERED, now, None, claim=taken.claim)
    assert await store.due_webhook_deliveries(now, 10) == [] and await store.next_webhook_time(0) is None
