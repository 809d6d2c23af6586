"""Fixtures of the server's unit tests: PostgreSQL databases (tests/pg.py)."""

from __future__ import annotations

from pg import pg_database, pg_url

__all__ = ["pg_database", "pg_url"]
