"""The PostgreSQL store's rendering of filter trees: the SQL it writes (no
database needed). What a real store returns for compiled filters is in
test_filter_sql.py (both stores) and test_pg_store.py."""

from __future__ import annotations

import pytest

from longbatch.server.filters import BATCH_FILTER_FIELDS, TRUE, And, Compare, Match, Not, Or, compile_filter
from longbatch.server.pg_store import render_filter


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
