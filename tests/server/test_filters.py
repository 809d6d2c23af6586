"""Tests for the AIP-160 filter compiler: the trees it builds, and (through the
SQLite store's renderer) the rows they match."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longbatch.server.filters import (
    BATCH_FILTER_FIELDS,
    TRUE,
    And,
    Compare,
    FilterError,
    FilterField,
    Match,
    Not,
    Or,
    compile_filter,
)
from longbatch.server.sqlite_store import render_filter


def _micros(iso: str) -> int:
    return (datetime.fromisoformat(iso) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


# name, state, done, model, display_name, create_time, priority
ROWS = [
    ("a", 1, 0, "models/echo", "nightly run", _micros("2025-12-31T23:00:00+00:00"), 0),
    ("b", 2, 0, "models/echo", "Nightly_big", _micros("2026-01-01T00:00:00+00:00"), 5),
    ("c", 3, 1, "models/gemini-1.5", "weekly 100%", _micros("2026-01-02T00:00:00+00:00"), -3),
    ("d", 4, 1, "models/echo", "a*b", _micros("2026-02-01T12:00:00+00:00"), 10),
    ("e", 5, 1, "models/other", "", _micros("2026-03-01T00:00:00+00:00"), 5),
]


@pytest.fixture(scope="module")
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE batches (name TEXT PRIMARY KEY, state INTEGER NOT NULL, done INTEGER NOT NULL,"
        " model TEXT NOT NULL, display_name TEXT NOT NULL, create_time INTEGER NOT NULL,"
        " priority INTEGER NOT NULL)"
    )
    conn.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)", ROWS)
    yield conn
    conn.close()


def matching(db: sqlite3.Connection, text: str) -> str:
    sql, params = render_filter(compile_filter(text, BATCH_FILTER_FIELDS))
    rows = db.execute(f"SELECT name FROM batches WHERE {sql} ORDER BY name", params).fetchall()
    return "".join(name for (name,) in rows)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "abcde"),
        ("   \t\n", "abcde"),
        ("state = SUCCEEDED", "c"),
        ("state=BATCH_STATE_SUCCEEDED", "c"),
        ('state = "RUNNING"', "b"),
        ("state = 'BATCH_STATE_RUNNING'", "b"),
        ("state != PENDING", "bcde"),
        ("done = true", "cde"),
        ('done = "false"', "ab"),
        ("done != true", "ab"),
        ("model = echo", "abd"),
        ("model = models/echo", "abd"),
        ('model = "models/gemini-1.5"', "c"),
        ("model = gemini-1.5", "c"),
        ("model != echo", "ce"),
        ("priority = 5", "be"),
        ("priority > 0", "bde"),
        ("priority >= 5", "bde"),
        ("priority < 0", "c"),
        ("priority <= -3", "c"),
        ("priority != 5", "acd"),
        ('priority = "10"', "d"),
        ('display_name = "nightly run"', "a"),
        ('display_name = ""', "e"),
        ('display_name > "w"', "c"),
        # Wildcards: '*' is any run; '%' and '_' stay literal.
        ('display_name = "nightly*"', "ab"),
        ('display_name = "*100%"', "c"),
        ("display_name = *ly*", "abc"),
        ('display_name = "*_*"', "b"),
        ('display_name = "a\\*b"', "d"),
        ('display_name = "*"', "abcde"),
        ('display_name != "a*b"', "abce"),
        # Timestamps.
        ('create_time = "2026-01-01T00:00:00Z"', "b"),
        ('create_time >= "2026-01-01T00:00:00Z"', "bcde"),
        ('create_time < "2026-01-01T00:00:00.000001Z"', "ab"),
        ('create_time < "2026-01-01T01:00:00+01:00"', "a"),
        ('create_time <= "2026-01-01T00:00:00.000000999z"', "ab"),
        ("create_time > '2026-01-31T19:00:00-05:00'", "de"),
        # Boolean structure.
        ("state = PENDING OR state = RUNNING", "ab"),
        ("done = true AND priority = 5", "e"),
        ("done = true priority = 5", "e"),
        ("NOT done = true", "ab"),
        ("-done = true", "ab"),
        ("NOT (state = PENDING OR state = RUNNING)", "cde"),
        ("-(state = PENDING OR state = RUNNING)", "cde"),
        ("NOT NOT done = true", "cde"),
        ("(done = true)(priority = 5)", "e"),
        ("((((state = FAILED))))", "d"),
        ("model = echo -state = FAILED", "ab"),
        # OR binds tighter than AND (AIP-160): a AND (b OR c).
        ("priority = 5 AND state = RUNNING OR state = FAILED", "b"),
        ("state = FAILED OR state = RUNNING AND priority = 5", "b"),
        ("state = FAILED OR state = RUNNING priority = 5", "b"),
        ("(state = FAILED OR state = RUNNING) AND priority = 5", "b"),
        ("state = FAILED OR (state = RUNNING AND priority = 5)", "bd"),
    ],
)
def test_matches(db: sqlite3.Connection, text: str, expected: str) -> None:
    assert matching(db, text) == expected


def test_empty_filter_is_true() -> None:
    assert compile_filter("", BATCH_FILTER_FIELDS) == TRUE == And(())
    assert compile_filter("  ", BATCH_FILTER_FIELDS) == TRUE


def test_values_stay_values() -> None:
    tree = compile_filter('display_name = "x\') OR 1=1 --" AND model = echo', BATCH_FILTER_FIELDS)
    assert tree == And((Compare("display_name", "=", "x') OR 1=1 --"), Compare("model", "=", "models/echo")))


def test_tree_shape() -> None:
    # OR binds tighter than AND; single terms stand alone, never in a one-term And/Or.
    assert compile_filter("a = 1 AND b = 2 OR -c = 3", _ABC) == And(
        (Compare("ca", "=", 1), Or((Compare("cb", "=", 2), Not(Compare("cc", "=", 3)))))
    )
    assert compile_filter("a = 1", _ABC) == Compare("ca", "=", 1)
    assert compile_filter("((a = 1))", _ABC) == Compare("ca", "=", 1)
    assert compile_filter("a = 1 b = 2 AND c = 3", _ABC) == And(
        (And((Compare("ca", "=", 1), Compare("cb", "=", 2))), Compare("cc", "=", 3))
    )
    assert compile_filter("a < 1 OR a >= 2 OR a != 3", _ABC) == Or(
        (Compare("ca", "<", 1), Compare("ca", ">=", 2), Compare("ca", "!=", 3))
    )


def test_typed_values() -> None:
    tree = compile_filter("state = BATCH_STATE_FAILED done = false priority = -7 model = models/x", BATCH_FILTER_FIELDS)
    assert tree == And(
        (Compare("state", "=", 4), Compare("done", "=", False), Compare("priority", "=", -7),
         Compare("model", "=", "models/x"))
    )
    assert type(compile_filter("done = true", BATCH_FILTER_FIELDS).value) is bool  # type: ignore[union-attr]


def test_wildcards_become_match() -> None:
    assert compile_filter('display_name = "50%_*"', BATCH_FILTER_FIELDS) == Match("display_name", ("50%_", ""))
    assert compile_filter("display_name = *ly*", BATCH_FILTER_FIELDS) == Match("display_name", ("", "ly", ""))
    assert compile_filter('display_name = "a\\*b*"', BATCH_FILTER_FIELDS) == Match("display_name", ("a*b", ""))
    # An escaped star alone, or '!=', is no wildcard.
    assert compile_filter('display_name = "a\\*b"', BATCH_FILTER_FIELDS) == Compare("display_name", "=", "a*b")
    assert compile_filter('display_name != "a*"', BATCH_FILTER_FIELDS) == Compare("display_name", "!=", "a*")
    # Only wildcard fields match: model compares the star literally, prefix included.
    assert compile_filter("model = ech*", BATCH_FILTER_FIELDS) == Compare("model", "=", "models/ech*")
    prefixed = {"m": FilterField("model", "string", value_prefix="models/", wildcard=True)}
    assert compile_filter("m = ech*", prefixed) == Match("model", ("models/ech", ""))
    assert compile_filter("m = models/e*", prefixed) == Match("model", ("models/e", ""))


def test_timestamp_value_is_utc_micros() -> None:
    def value(text: str) -> object:
        tree = compile_filter(f'create_time = "{text}"', BATCH_FILTER_FIELDS)
        assert isinstance(tree, Compare) and tree.field == "create_time"
        return tree.value

    assert value("1970-01-01T00:00:01.5Z") == 1_500_000
    assert value("1970-01-01T01:00:00+01:00") == 0
    assert value("1969-12-31T23:59:59.999999Z") == -1


def test_string_escapes() -> None:
    tree = compile_filter(r'display_name = "a\"b\\c\n" display_name = ' + r"'it\'s'", BATCH_FILTER_FIELDS)
    assert tree == And((Compare("display_name", "=", 'a"b\\c\n'), Compare("display_name", "=", "it's")))


def test_trees_are_frozen() -> None:
    tree = compile_filter("priority = 1", BATCH_FILTER_FIELDS)
    with pytest.raises(AttributeError):
        tree.value = 2  # type: ignore[misc, union-attr]
    assert hash(tree) == hash(Compare("priority", "=", 1))


_ABC = {name: FilterField(f"c{name}", "int") for name in "abc"}


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("foo = 1", 0, 'unknown field "foo" at position 0; filterable fields: create_time, display_name, done'),
        ("done = true and state = RUNNING", 12, "must be upper case"),
        ("state = BOGUS", 8, "expected one of: UNSPECIFIED, PENDING, RUNNING, SUCCEEDED"),
        ("state = succeeded", 8, "unknown value"),
        ("state = 3", 8, "unknown value"),
        ("state < RUNNING", 6, "not supported for enum"),
        ("done > false", 5, "not supported for bool"),
        ("done = yes", 7, "expected true or false"),
        ("done = 1", 7, "expected true or false"),
        ("priority = high", 11, "expected an integer"),
        ("priority = 1.5", 11, "expected an integer"),
        ("priority = 1_000", 11, "expected an integer"),
        ("priority = 99999999999999999999", 11, "out of range"),
        ("create_time > 2026-01-01T00:00:00Z", 27, "':' (has) operator"),
        ('create_time > "2026-01-01"', 14, "RFC 3339"),
        ('create_time > "2026-13-01T00:00:00Z"', 14, "RFC 3339"),
        ('create_time > "2026-02-30T00:00:00Z"', 14, "RFC 3339"),
        ('create_time > "2026-01-01T24:00:00Z"', 14, "RFC 3339"),
        ('create_time > "2026-01-01T00:00:00"', 14, "RFC 3339"),
        ('create_time > "2026-01-01T00:00:00+24:00"', 14, "RFC 3339"),
        ('create_time > "2026-01-01T00:00:00+01:60"', 14, "RFC 3339"),
        ('create_time > "0000-01-01T00:00:00Z"', 14, "RFC 3339"),
        ('display_name = "abc', 15, "unterminated string"),
        ("display_name = 'abc\\'", 15, "unterminated string"),
        ("state =", 7, "expected a value after '='"),
        ("state = = RUNNING", 8, "expected a value"),
        ("state", 5, "expected a comparison operator"),
        ("state RUNNING", 6, "expected a comparison operator"),
        ("= RUNNING", 0, "expected a comparison"),
        ("state = RUNNING AND", 19, "expected a comparison"),
        ("state = RUNNING OR", 18, "expected a comparison"),
        ("AND state = RUNNING", 0, "expected a comparison"),
        ("NOT", 3, "expected a comparison"),
        ("-", 1, "expected a comparison"),
        ("state = AND", 8, "expected a value"),
        ("(state = RUNNING", 16, "'(' at position 0 is not closed"),
        ("state = RUNNING)", 15, "unexpected ')'"),
        ("()", 0, "empty parentheses"),
        ("done = true ()", 12, "empty parentheses"),
        ("done = true !", 12, "did you mean '!='"),
        ("done = true # x", 12, "unexpected character '#'"),
        ('display_name = "x"done = true', 18, "unexpected 'done'"),
        ("state = RUNNING =", 16, "unexpected '='"),
        ("state:RUNNING", 5, "has"),
        ("\"state\" = 'RUNNING'", 0, "expected a comparison"),
    ],
)
def test_errors(text: str, position: int, fragment: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filter(text, BATCH_FILTER_FIELDS)
    assert info.value.position == position, str(info.value)
    assert fragment in str(info.value)


def test_length_cap() -> None:
    ok = " AND ".join(["priority = 1"] * 117)
    assert len(ok) <= 2000
    compile_filter(ok, BATCH_FILTER_FIELDS)
    with pytest.raises(FilterError, match="longer than 2000"):
        compile_filter(ok + " " * (2001 - len(ok)), BATCH_FILTER_FIELDS)


def test_depth_cap() -> None:
    compile_filter("(" * 32 + "done = true" + ")" * 32, BATCH_FILTER_FIELDS)
    compile_filter("NOT " * 32 + "done = true", BATCH_FILTER_FIELDS)
    with pytest.raises(FilterError, match="deeper than 32"):
        compile_filter("(" * 33 + "done = true" + ")" * 33, BATCH_FILTER_FIELDS)
    with pytest.raises(FilterError, match="deeper than 32"):
        compile_filter("-" * 33 + "done = true", BATCH_FILTER_FIELDS)
    with pytest.raises(FilterError, match="deeper than 32"):
        compile_filter("(" * 1000, BATCH_FILTER_FIELDS)


def test_long_flat_filter_compiles(db: sqlite3.Connection) -> None:
    text = " OR ".join(["priority = 5"] * 120)
    assert matching(db, text) == "be"


def test_lone_surrogate_is_filter_error() -> None:
    with pytest.raises(FilterError):
        compile_filter('display_name = "\ud800"', BATCH_FILTER_FIELDS)


def test_field_validation() -> None:
    with pytest.raises(ValueError, match="identifier"):
        FilterField("x; DROP TABLE batches", "int")
    with pytest.raises(ValueError, match="enum_values"):
        FilterField("x", "enum")
    with pytest.raises(ValueError, match="enum_values"):
        FilterField("x", "int", {"A": 1})
    with pytest.raises(ValueError, match="string"):
        FilterField("x", "int", wildcard=True)
    FilterField("b.x", "int")


_GRAMMAR = st.sampled_from(
    [
        " ", "(", ")", "-", "=", "!=", "<", "<=", ">", ">=", "AND", "OR", "NOT", '"', "'", "\\", "*", ":",
        "state", "done", "model", "display_name", "create_time", "priority", "foo",
        "RUNNING", "BATCH_STATE_FAILED", "true", "false", "echo", "models/echo", "5", "-7", "1.5",
        '"2026-01-01T00:00:00Z"', '"x*"', "%", "_",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.lists(_GRAMMAR, max_size=25).map(" ".join), st.lists(_GRAMMAR).map("".join)))
def test_random_text_only_raises_filter_error(db: sqlite3.Connection, text: str) -> None:
    try:
        tree = compile_filter(text, BATCH_FILTER_FIELDS)
    except FilterError:
        return
    sql, params = render_filter(tree)
    # Whatever compiles must also be valid SQL with matching placeholders.
    assert sql.count("?") == len(params)
    db.execute(f"SELECT count(*) FROM batches WHERE {sql}", params).fetchone()
