"""What only the PostgreSQL store has: its filter dialect, its migrations
under an advisory lock, its errors (never with the password), and several
stores (replicas) on one database. The shared behaviour is in test_store.py."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from longbatch.server.domain import BatchKind, ItemStatus, NewBatch, NewItem, State
from longbatch.server.filters import BATCH_FILTER_FIELDS, TRUE, And, Compare, Match, Not, Or, compile_filter
from longbatch.server.pg_store import MIGRATIONS, DatabaseUnavailable, PostgresStore, redact_url, render_filter

DAY_US = 86_400_000_000
PASSWORD = "s3cret-Pa55word"


def with_password(url: str, password: str = PASSWORD, port: int | None = None) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname}:{port or parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}"))


def new_batch(batch_id: str, **kw: object) -> NewBatch:
    fields: dict[str, object] = dict(id=batch_id, tenant="t", kind=BatchKind.GENERATE, model="models/echo",
                                     display_name="", priority=0, input_file=None, webhook=None, request_id=None)
    fields.update(kw)
    return NewBatch(**fields)  # type: ignore[arg-type]


# -- rendering ------------------------------------------------------------------


def test_empty_and_is_true() -> None:
    assert render_filter(TRUE) == ("TRUE", [])


def test_sql_shape_params_in_order_and_numbered_from_first_param() -> None:
    tree = And((Compare("priority", "=", 1), Or((Compare("state", "<", 2), Not(Compare("done", "!=", True))))))
    assert render_filter(tree, first_param=3) == (
        "((priority = $3::bigint) AND ((state < $4::bigint) OR (NOT (done IS DISTINCT FROM $5::boolean))))",
        [1, 2, True])


def test_values_are_parameters_not_sql() -> None:
    tree = compile_filter('display_name = "x\') OR 1=1 --" AND model = echo', BATCH_FILTER_FIELDS)
    assert render_filter(tree) == ("((display_name = $1::text) AND (model = $2::text))",
                                   ["x') OR 1=1 --", "models/echo"])


def test_match_escapes_like_metacharacters_and_folds_ascii_only() -> None:
    sql, params = render_filter(compile_filter('display_name = "50%_*"', BATCH_FILTER_FIELDS))
    assert sql == ("(translate(display_name, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') "
                   "LIKE $1::text ESCAPE '\\')")
    assert params == ["50\\%\\_%"]
    assert render_filter(Match("display_name", ("A\\B", "", "Ä")))[1] == ["a\\\\b%%Ä"]


def test_columns_come_only_from_the_table() -> None:
    with pytest.raises(KeyError):
        render_filter(Compare("seq; DROP TABLE batches", "=", 1))
    assert render_filter(Compare("a", ">=", 3), {"a": "t.col"}) == ("(t.col >= $1::bigint)", [3])


def test_one_term_and_or_render_as_the_term() -> None:
    assert render_filter(Or((Compare("priority", "=", 1),))) == ("(priority = $1::bigint)", [1])


async def test_filters_beyond_a_columns_range_and_non_ascii_case(pg_url: str) -> None:
    store = PostgresStore(pg_url)
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


async def test_stores_opening_one_empty_database_at_once_all_come_up(pg_url: str) -> None:
    stores = [PostgresStore(pg_url, min_connections=1, max_connections=2) for _ in range(6)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        conn = await asyncpg.connect(pg_url)
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


async def test_a_schema_newer_than_the_code_is_refused(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO schema_version VALUES ($1, 0)", len(MIGRATIONS) + 1)
    finally:
        await conn.close()
    with pytest.raises(RuntimeError, match="newer than this server"):
        await PostgresStore(pg_url).open()


async def test_close_is_safe_twice_and_a_closed_store_says_so(pg_url: str) -> None:
    store = PostgresStore(pg_url)
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
        pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # Nothing listens on port 1; then a database that does not exist; then a bad port in the URL.
    urls = [with_password(pg_url, port=1),
            with_password(urlunsplit(urlsplit(pg_url)._replace(path="/no_such_db_here"))),
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


async def test_a_password_is_used_and_never_shown(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # The machine's PostgreSQL trusts local logins, so a password in the URL
    # connects; everything the store logs or raises must still leave it out.
    store = PostgresStore(with_password(pg_url))
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
