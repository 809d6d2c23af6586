"""One ``longbatch serve`` per PostgreSQL database, for now.

The executor does not lease its work yet: every server resumes every
unfinished batch it finds at start, so two servers on one database would
both run them. Until work leases exist, a server holds a session-level
advisory lock on a dedicated connection for its whole life, and a second
server on the same database is refused at start (``DatabaseInUse``).

The lock is the session's: it goes when the connection ends, so a server
killed with SIGKILL (or its host lost) frees the database for the next one
as soon as PostgreSQL notices the dead connection. A server whose lock
connection is lost while it runs keeps running but is no longer protected;
that is logged as an error.
"""

from __future__ import annotations

import contextlib
import logging
from urllib.parse import unquote, urlsplit

import asyncpg

from .pg_store import DatabaseUnavailable, redact_url

log = logging.getLogger("longbatch")

SERVER_LOCK = 0x6C6F6E6762617403  # "longbat" 03, beside pg_store's migration and fold locks
"""The advisory lock key a running server holds."""

LOCK_APP = "longbatch-server-lock"
"""How the lock's connection shows in pg_stat_activity."""

IN_USE = "another longbatch server is using this database; replicas need work leases, not yet available"


class DatabaseInUse(RuntimeError):
    """Another server holds this database's server lock."""


class ServerLock:
    """The advisory lock that keeps a second server off a database.

    Args:
        url: libpq URL of the database (its password never goes into a
            message).
        connect_timeout_s: The most the connection attempt may take.
    """

    def __init__(self, url: str, *, connect_timeout_s: float = 10.0) -> None:
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        self._conn: asyncpg.Connection | None = None
        self._releasing = False

    def __repr__(self) -> str:
        return f"ServerLock({redact_url(self._url)!r})"

    async def acquire(self) -> None:
        """Connect and take the lock, or fail at once.

        Raises:
            DatabaseUnavailable: the database does not answer or refuses
                (message without the password).
            DatabaseInUse: another server holds the lock.
        """
        try:
            conn = await asyncpg.connect(self._url, timeout=self._connect_timeout_s,
                                         server_settings={"application_name": LOCK_APP})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as e:
            raise DatabaseUnavailable(
                f"cannot open PostgreSQL database {redact_url(self._url)}: "
                f"{type(e).__name__}: {self._scrub(str(e)) or 'no answer'}") from None
        try:
            taken = await conn.fetchval("SELECT pg_try_advisory_lock($1)", SERVER_LOCK)
        except BaseException:
            await _close(conn)
            raise
        if not taken:
            await _close(conn)
            raise DatabaseInUse(IN_USE)
        conn.add_termination_listener(self._on_lost)
        self._conn = conn

    async def release(self) -> None:
        """Give the lock back by closing its connection; safe to call twice."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._releasing = True
            await _close(conn)

    def _on_lost(self, conn: object) -> None:
        if not self._releasing:
            log.error("lost the connection that holds this server's lock on %s: another server could now start "
                      "on the same database", redact_url(self._url))

    def _scrub(self, text: str) -> str:
        with contextlib.suppress(ValueError):
            password = urlsplit(self._url).password
            if password:
                # As written in the URL and as the driver sends it (percent-decoded).
                for form in {password, unquote(password)}:
                    text = text.replace(form, "***")
        return text


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=5)
    except Exception:  # a dead connection: the session, and its lock, are gone anyway
        conn.terminate()
