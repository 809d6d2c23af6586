"""Tests for the SQLite store's rendering of filter trees: the SQL it writes,
and the batches a real store returns for compiled filters (SQLite and
PostgreSQL alike; PostgreSQL's SQL is in test_pg_store.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pg import pg_database, pg_url, store_kinds  # noqa: F401  (fixtures, by name)

from longbatch.server.domain import BatchKind, NewBatch, NewItem
from longbatch.server.filters import BATCH_FILTER_FIELDS, TRUE, And, Compare, Match, Not, Or, compile_filter
from longbatch.server.pg_store import PostgresStore
from longbatch.server.sqlite_store import SQLiteStore, render_filter
from longbatch.server.store import Store

DAY_US = 86_400_000_000


def test_empty_and_is_true() -> None:
    assert render_filter(TRUE) == ("1", [])


def test_sql_shape_and_params_in_order() -> None:
    tree = And((Compare("priority", "=", 1), Or((Compare("state", "<", 2), Not(Compare("done", "!=", True))))))
    assert render_filter(tree) == ("((priority = ?) AND ((state < ?) OR (NOT (done IS NOT ?))))", [1, 2, 1])


def test_values_are_parameters_not_sql() -> None:
    tree = compile_filter('display_name = "x\') OR 1=1 --" AND model = echo', BATCH_FILTER_FIELDS)
    assert render_filter(tree) == ("((display_name = ?) AND (model = ?))", ["x') OR 1=1 --", "models/echo"])


def test_bools_bind_as_integers() -> None:
    sql, params = render_filter(Compare("done", "=", False))
    assert sql == "(done = ?)" and params == [0] and type(params[0]) is int


def test_match_escapes_like_metacharacters() -> None:
    sql, params = render_filter(compile_filter('display_name = "50%_*"', BATCH_FILTER_FIELDS))
    assert sql == "(display_name LIKE ? ESCAPE '\\')"
    assert params == ["50\\%\\_%"]
    assert render_filter(Match("display_name", ("a\\b", "", "c")))[1] == ["a\\\\b%%c"]


def test_columns_come_only_from_the_table() -> None:
    with pytest.raises(KeyError):
        render_filter(Compare("seq; DROP TABLE batches", "=", 1))
    assert render_filter(Compare("a", ">=", 3), {"a": "t.col"}) == ("(t.col >= ?)", [3])


def test_one_term_and_or_render_as_the_term() -> None:
    assert render_filter(Or((Compare("priority", "=", 1),))) == ("(priority = ?)", [1])


@pytest.fixture(params=store_kinds())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = (SQLiteStore(tmp_path / "db.sqlite") if request.param == "sqlite"
                else PostgresStore(request.getfixturevalue("pg_url")))
    await s.open()
    # id, model, display_name, priority (all pending, created in this order)
    rows = [("a", "models/echo", "nightly run", 0), ("b", "models/echo", "Nightly_big", 5),
            ("c", "models/gemini-1.5", "weekly 100%", -3), ("d", "models/echo", "a*b", 10),
            ("e", "models/other", "", 5)]
    for batch_id, model, name, priority in rows:
        await s.create_batch(
            NewBatch(id=batch_id, tenant="t", kind=BatchKind.GENERATE, model=model, display_name=name,
                     priority=priority, input_file=None, webhook=None, request_id=f"r-{batch_id}"),
            [NewItem(idx=0, key="k", metadata=None, payload=b"p")], DAY_US)
    yield s
    await s.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "edcba"),
        ("state = PENDING", "edcba"),
        ("state != PENDING", ""),
        ("done = false", "edcba"),
        ("done = true", ""),
        ("model = echo", "dba"),
        ("model != echo", "ec"),
        ("priority >= 5", "edb"),
        ("priority = 5 OR priority < 0", "ecb"),
        ('display_name = "nightly*"', "ba"),
        ('display_name = "*_*"', "b"),
        ('display_name = "a\\*b"', "d"),
        ('display_name != "a*b" -model = echo', "ec"),
        ('create_time >= "2000-01-01T00:00:00Z" priority = 0', "a"),
        ('create_time < "2000-01-01T00:00:00Z"', ""),
        ("NOT (model = echo OR priority = 5)", "c"),
    ],
)
async def test_real_store_results(store: Store, text: str, expected: str) -> None:
    page = await store.list_batches("t", compile_filter(text, BATCH_FILTER_FIELDS), None, 10)
    assert "".join(b.id for b in page) == expected
    assert await store.list_batches("other", compile_filter(text, BATCH_FILTER_FIELDS), None, 10) == []


async def test_real_store_keyset_and_request_id(store: Store) -> None:
    first = await store.list_batches("t", TRUE, None, 2)
    assert [b.id for b in first] == ["e", "d"]
    rest = await store.list_batches("t", TRUE, first[-1].seq, 10)
    assert [b.id for b in rest] == ["c", "b", "a"]
    found = await store.list_batches("t", Compare("request_id", "=", "r-c"), None, 1)
    assert [b.id for b in found] == ["c"]
    assert await store.list_batches("other", Compare("request_id", "=", "r-c"), None, 1) == []
