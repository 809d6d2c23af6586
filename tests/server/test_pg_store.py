"""What only the PostgreSQL store has: its migrations under an advisory
lock, its errors (never with the password), lost connections, several
stores (replicas) on one database, filters beyond SQLite's types. The shared
behaviour is in test_store.py, the filter SQL in test_pg_filter_sql.py.

Without a PostgreSQL to test against this module is skipped with the one
line that says how to run it (test_store.py and test_filter_sql.py then run
their SQLite cases only); under CI=true it always runs."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pg import HOW_TO_RUN, available, pg_database, pg_url  # noqa: F401  (fixtures, by name)

from longbatch.server.domain import BatchKind, ItemStatus, NewBatch, NewItem, State
from longbatch.server.filters import BATCH_FILTER_FIELDS, TRUE, compile_filter
from longbatch.server.pg_store import MIGRATIONS, DatabaseUnavailable, PostgresStore, redact_url

if not available():
    pytest.skip(f"PostgreSQL tests skipped: {HOW_TO_RUN}", allow_module_level=True)

DAY_US = 86_400_000_000
PASSWORD = "s3cret-Pa55word"


@pytest.fixture
def db(pg_url: str) -> str:  # noqa: F811  (the fixture imported above)
    """An empty database (tests/pg.py)."""
    return pg_url


def with_password(url: str, password: str = PASSWORD, port: int | None = None) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname}:{port or parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}"))


def new_batch(batch_id: str, **kw: object) -> NewBatch:
    fields: dict[str, object] = dict(id=batch_id, tenant="t", kind=BatchKind.GENERATE, model="models/echo",
                                     display_name="", priority=0, input_file=None, webhook=None, request_id=None)
    fields.update(kw)
    return NewBatch(**fields)  # type: ignore[arg-type]


async def test_filters_beyond_a_columns_range_and_non_ascii_case(db: str) -> None:
    store = PostgresStore(db)
    await store.open()
    try:
        await store.create_batch(new_batch("a", display_name="Äpfel NIGHTLY"), [NewItem(0, "k", None, b"p")],
                                 DAY_US)
        # priority is an integer column; an int64 value compares, never overflows.
        for text, expected in [("priority < 9000000000000000000", ["a"]), ("priority > 9000000000000000000", []),
                               ('display_name = "*nightly"', ["a"]), ('display_name = "äpfel*"', [])]:
            page = await store.list_batches("t", compile_filter(text, BATCH_FILTER_FIELDS), None, 10)
            assert [b.id for b in page] == expected, text
    finally:
        await store.close()


# -- migrations and replicas ----------------------------------------------------


async def test_stores_opening_one_empty_database_at_once_all_come_up(db: str) -> None:
    stores = [PostgresStore(db, min_connections=1, max_connections=2) for _ in range(6)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        conn = await asyncpg.connect(db)
        try:
            versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_version ORDER BY version")]
        finally:
            await conn.close()
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        # Replicas share everything: a secret, a batch, its results.
        assert len({await s.secret("hmac") for s in stores}) == 1
        await stores[0].create_batch(new_batch("r1"), [NewItem(i, f"k{i}", None, b"p") for i in range(4)], DAY_US)
        touched = await asyncio.gather(*(s.record_results("r1", ItemStatus.SUCCEEDED, [i, (i + 1) % 4], [b"r", b"r"])
                                         for i, s in enumerate(stores[:4])))
        assert sum(1 for t in touched if t is not None) == 4
        batch = await stores[5].get_batch("t", "r1")
        assert batch is not None and batch.succeeded == 4 and batch.pending == 0
        # Counts by state: another replica's change shows after a refresh.
        await stores[1].refresh_state_counts()
        assert stores[1].count_batches_by_state()[State.PENDING] == 1
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_schema_newer_than_the_code_is_refused(db: str) -> None:
    store = PostgresStore(db)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(db)
    try:
        await conn.execute("INSERT INTO schema_version VALUES ($1, 0)", len(MIGRATIONS) + 1)
    finally:
        await conn.close()
    with pytest.raises(RuntimeError, match="newer than this server"):
        await PostgresStore(db).open()


async def test_close_is_safe_twice_and_a_closed_store_says_so(db: str) -> None:
    store = PostgresStore(db)
    await store.open()
    await store.close()
    await store.close()
    with pytest.raises(RuntimeError, match="not open"):
        await store.get_batch(None, "x")


# -- errors and the password ----------------------------------------------------


def test_redact_url() -> None:
    assert redact_url(f"postgresql://u:{PASSWORD}@h:5/db?sslmode=require") == "postgresql://u:***@h:5/db?sslmode=require"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert PASSWORD not in repr(PostgresStore(f"postgresql://u:{PASSWORD}@h/db"))


async def test_unreachable_database_fails_open_clearly_without_the_password(
        db: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # Nothing listens on port 1; then a database that does not exist; then a bad port in the URL.
    urls = [with_password(db, port=1),
            with_password(urlunsplit(urlsplit(db)._replace(path="/no_such_db_here"))),
            f"postgresql://postgres:{PASSWORD}@127.0.0.1:notaport/db"]
    for url in urls:
        store = PostgresStore(url, connect_timeout_s=5)
        with pytest.raises(DatabaseUnavailable) as failed:
            await store.open()
        text = f"{failed.value!s} {failed.value!r}"
        assert PASSWORD not in text and "cannot open PostgreSQL database" in text, text
        assert failed.value.__cause__ is None and failed.value.__suppress_context__
        await store.close()
    assert PASSWORD not in caplog.text


async def test_a_password_is_used_and_never_shown(db: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # The machine's PostgreSQL trusts local logins, so a password in the URL
    # connects; everything the store logs or raises must still leave it out.
    store = PostgresStore(with_password(db))
    await store.open()
    try:
        assert PASSWORD not in repr(store)
        with pytest.raises(Exception) as failed:
            await store.create_batch(new_batch("same"), [], DAY_US)
            await store.create_batch(new_batch("same"), [], DAY_US)  # a duplicate id
        assert PASSWORD not in str(failed.value)
    finally:
        await store.close()
    assert PASSWORD not in caplog.text


# -- connection loss ------------------------------------------------------------


async def _kill_backends(url: str) -> int:
    """Terminate every other session on the store's database (a restart, as the pool sees it)."""
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
    finally:
        await conn.close()


async def test_reads_survive_lost_connections_and_writes_resume(db: str) -> None:
    store = PostgresStore(db, min_connections=3, max_connections=3)
    await store.open()
    try:
        await store.create_batch(new_batch("c1"), [NewItem(0, "k", None, b"p")], DAY_US)
        assert await _kill_backends(db) >= 3
        got = await store.get_batch("t", "c1")  # read again on a fresh connection
        assert got is not None and got.id == "c1"
        assert [b.id for b in await store.list_batches("t", TRUE, None, 10)] == ["c1"]
        await store.record_results("c1", ItemStatus.SUCCEEDED, [0], [b"r"])
        # A write that finds its connection lost before BEGIN runs on another.
        assert await _kill_backends(db) >= 1
        await store.mark_running("c1")
        running = await store.get_batch("t", "c1")
        assert running is not None and running.state is State.RUNNING
        await store.close_batch("c1", State.SUCCEEDED, None, ItemStatus.CANCELLED)
        done = await store.mark_done("c1", None)
        assert done is not None and done.done and done.succeeded == 1
    finally:
        await store.close()
