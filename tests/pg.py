"""PostgreSQL for the tests: a fresh database per test session, dropped at the end.

The server is the machine's PostgreSQL at 127.0.0.1:5432 (user postgres), or
the one ``LONGBATCH_TEST_DATABASE_URL`` names (a libpq URL of a database the
tests may connect to and create databases from). When it does not answer,
the tests that need it are left out (``store_kinds``), and
test_pg_store.py is skipped with one line saying how to run them; under
``CI=true`` they run and fail instead, so CI never passes without them.

Fixtures, imported by the test modules that use them (not from a
tests/server/conftest.py: a second module named ``conftest`` would shadow
tests/conftest.py for ``from conftest import ...``):

* ``pg_database``: session scope; the URL of this session's database.
* ``pg_url``: per test; the same URL with the ``public`` schema emptied, so
  every test starts from an empty database as each SQLite test starts from
  a new file (and every store opened on it runs the migrations).
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

ADMIN_URL = os.environ.get("LONGBATCH_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
HOW_TO_RUN = ("no PostgreSQL answers at the test URL; start it "
              "(pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start, for 127.0.0.1:5432) "
              "or set LONGBATCH_TEST_DATABASE_URL")


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead."""
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def _execute_async(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _execute(url: str, sql: str) -> None:
    """Run ``sql`` on ``url``'s database, on a loop of its own in a thread:
    these fixtures are synchronous so that async fixtures may ask for them
    (``getfixturevalue``) from inside a test's running loop."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: asyncio.run(_execute_async(url, sql))).result()


@functools.cache
def available() -> bool:
    """Whether to run the PostgreSQL tests: the test server answers, or
    ``CI=true`` (where the fixtures then fail loudly if it does not). Asked
    once per run, at collection."""
    if os.environ.get("CI") == "true":
        return True
    try:
        _execute(ADMIN_URL, "SELECT 1")
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    return True


def store_kinds() -> list[str]:
    """Params of a store fixture: ``postgres`` only when ``available()``
    (test_pg_store.py then says in one line how to run it)."""
    return ["sqlite", "postgres"] if available() else ["sqlite"]


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """Create ``longbatch_test_<random>`` for this session; drop it afterwards."""
    name = f"longbatch_test_{secrets.token_hex(6)}"
    try:
        _execute(ADMIN_URL, f'CREATE DATABASE "{name}"')
    except (TimeoutError, OSError, asyncpg.PostgresError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but PostgreSQL is not usable ({type(e).__name__}): {HOW_TO_RUN}", pytrace=False)
        pytest.skip(f"PostgreSQL tests skipped: {HOW_TO_RUN}")
    try:
        yield with_database(ADMIN_URL, name)
    finally:
        _execute(ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """The session's database, emptied for this test."""
    _execute(pg_database, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    return pg_database
