"""Fixtures of the server's unit tests: PostgreSQL databases (tests/pg.py).

Without a PostgreSQL to test against (and not under ``CI=true``, where the
fixtures fail instead), the tests that need one are deselected and the run
says so in one line, rather than one skip line per test.
"""

from __future__ import annotations

import os

import pytest
from pg import HOW_TO_RUN, needs_postgres, pg_database, pg_url, reachable

__all__ = ["pg_database", "pg_url"]

_left_out: list[int] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the PostgreSQL tests when no PostgreSQL answers, outside CI."""
    if os.environ.get("CI") == "true":
        return
    wanted = [item for item in items if needs_postgres(item)]
    if not wanted or reachable():
        return
    config.hook.pytest_deselected(items=wanted)
    items[:] = [item for item in items if not needs_postgres(item)]
    _left_out.append(len(wanted))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The one line saying how to run the PostgreSQL tests left out."""
    if _left_out:
        terminalreporter.write_line(f"{sum(_left_out)} PostgreSQL tests deselected: {HOW_TO_RUN}", yellow=True)
