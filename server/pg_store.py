"""PostgreSQL implementation of the Store (asyncpg; see pyproject.toml for why).

Many stateless replicas may share one database, so nothing here relies on
being the only writer: every write is one transaction whose checks run
inside it under row or advisory locks (a batch's row for its results and
its close, a per-tenant advisory lock for quotas and request ids), and no
batch is cached in memory (another replica may rename or delete it).

A write is never abandoned halfway by a cancelled caller: it runs as a task
of its own, and a cancelled caller waits for it to commit or roll back
before the cancellation goes on, so the connection returns to the pool
clean and a write made afterwards comes after it.

The URL (``postgresql://user:password@host:port/db``, libpq's form) holds a
password: it is kept only to connect and never goes into a message or a
log line (``redact_url``). All SQL of this store lives in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from .domain import (
    Batch,
    BatchKind,
    ItemStatus,
    NewBatch,
    NewItem,
    Outcome,
    PendingItem,
    ResultRow,
    State,
    StoredFile,
    now_us,
)
from .filters import And, Compare, Expr, Match, Not
from .store import (
    DeliveryStatus,
    Lease,
    LeaseLost,
    OverQuota,
    Purged,
    RangeRunner,
    ResultReader,
    StoreConflict,
    TenantUsage,
    UsageLimits,
    WebhookDelivery,
)

log = logging.getLogger(__name__)

# -- schema -------------------------------------------------------------------

# Each entry upgrades the schema by one version, recorded in schema_version.
# The layout follows the SQLite store's v7 (same columns, same meaning).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (name text PRIMARY KEY, value bytea NOT NULL);
    CREATE TABLE batches (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- creation order, for keyset paging
        id text NOT NULL UNIQUE,
        tenant text NOT NULL,
        kind text NOT NULL,
        model text NOT NULL,
        display_name text NOT NULL,
        priority integer NOT NULL,
        state smallint NOT NULL,
        done boolean NOT NULL DEFAULT false,
        create_time bigint NOT NULL,         -- microseconds since the epoch
        update_time bigint NOT NULL,
        end_time bigint,
        input_file text,
        request_count bigint NOT NULL DEFAULT 0,
        succeeded bigint NOT NULL DEFAULT 0,
        failed bigint NOT NULL DEFAULT 0,
        cancelled bigint NOT NULL DEFAULT 0,
        expired bigint NOT NULL DEFAULT 0,
        error bytea,
        output_file text,
        webhook bytea,
        request_id text,
        ingested boolean NOT NULL DEFAULT true,
        final_state smallint
    );
    CREATE INDEX batches_by_tenant ON batches (tenant, seq);
    -- A tenant's unfinished batches, for quotas, without walking its history.
    CREATE INDEX batches_not_done ON batches (tenant) WHERE NOT done;
    CREATE UNIQUE INDEX batches_request_id ON batches (tenant, request_id) WHERE request_id IS NOT NULL;
    CREATE INDEX batches_done_by_end ON batches (end_time) WHERE done;
    CREATE INDEX batches_by_input_file ON batches (input_file) WHERE NOT done;
    CREATE TABLE requests (
        batch_seq bigint NOT NULL,
        idx bigint NOT NULL,
        key text NOT NULL,
        metadata bytea,
        payload bytea NOT NULL,
        PRIMARY KEY (batch_seq, idx)
    );
    -- A request is PENDING while it has no row here (as in SQLite's v6).
    CREATE TABLE results (
        batch_seq bigint NOT NULL,
        idx bigint NOT NULL,
        status smallint NOT NULL,            -- ItemStatus, never PENDING
        result bytea NOT NULL,               -- response, or google.rpc.Status
        PRIMARY KEY (batch_seq, idx)
    );
    CREATE TABLE files (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        tenant text NOT NULL,
        display_name text NOT NULL,
        mime_type text NOT NULL,
        size_bytes bigint NOT NULL,
        sha256 bytea NOT NULL,
        create_time bigint NOT NULL,
        expire_time bigint,
        source text NOT NULL
    );
    CREATE INDEX files_by_tenant ON files (tenant, seq);
    CREATE INDEX files_by_expiry ON files (expire_time) WHERE expire_time IS NOT NULL;
    CREATE TABLE webhook_deliveries (
        id text PRIMARY KEY,
        batch_id text NOT NULL,
        uri text NOT NULL,
        body bytea NOT NULL,
        status text NOT NULL DEFAULT 'pending',
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_time bigint NOT NULL,
        last_error text,
        create_time bigint NOT NULL,
        update_time bigint NOT NULL,
        UNIQUE (batch_id, uri)
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_time) WHERE status = 'pending';
    -- Batches by state for the metrics page, as deltas: one counter row per
    -- state would be locked by every create until it commits (a create's
    -- COPY of a million requests included), serializing creates across
    -- replicas; inserted deltas never wait on each other. Folded by
    -- refresh_state_counts.
    CREATE TABLE batch_state_deltas (state smallint NOT NULL, delta bigint NOT NULL);
    CREATE FUNCTION batch_state_delta() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            INSERT INTO batch_state_deltas VALUES (OLD.state, -1);
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') THEN
            INSERT INTO batch_state_deltas VALUES (NEW.state, 1);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER batch_states_insert_delete AFTER INSERT OR DELETE ON batches
        FOR EACH ROW EXECUTE FUNCTION batch_state_delta();
    CREATE TRIGGER batch_states_update AFTER UPDATE OF state ON batches
        FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION batch_state_delta();
    """,
    # v2: named leases with fencing tokens (store.LeaseStore), as SQLite's v8.
    # A row is never deleted, only expired, so its token keeps growing.
    """
    CREATE TABLE leases (
        name text PRIMARY KEY,
        owner text NOT NULL,
        token bigint NOT NULL,               -- of the latest grant
        expire_time bigint NOT NULL          -- microseconds since the epoch, database clock; 0 once released
    );
    """,
    # v3: delivery claims, as SQLite's v9 (claimed_until on the database clock).
    """
    ALTER TABLE webhook_deliveries ADD COLUMN claim bigint NOT NULL DEFAULT 0;
    ALTER TABLE webhook_deliveries ADD COLUMN claimed_until bigint NOT NULL DEFAULT 0;
    """,
    # v4: file bytes in ~1 MiB chunks (pg_file_bytes.PgFileBytes), so that
    # replicas need no shared disk. No foreign key to files: bytes are
    # committed before their row is added (as on disk). The trigger deletes
    # them in the transaction that deletes the row, however it is deleted
    # (a delete, expiry, retention); bytes whose row never came are removed
    # by PgFileBytes.remove.
    """
    CREATE TABLE file_bytes (
        file_id text NOT NULL,
        seq integer NOT NULL,                -- 0, 1, ...; a file has at least one chunk (0 bytes: one empty)
        data bytea NOT NULL,
        PRIMARY KEY (file_id, seq)
    );
    CREATE FUNCTION delete_file_bytes() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM file_bytes WHERE file_id = OLD.id;
        RETURN NULL;
    END $$;
    CREATE TRIGGER files_delete_bytes AFTER DELETE ON files
        FOR EACH ROW EXECUTE FUNCTION delete_file_bytes();
    """,
)

# Taken around migrations (session level) so that replicas opening one empty
# database together apply them once; and by refresh_state_counts (try, per
# transaction) so that one replica at a time folds the deltas. Advisory lock
# keys are per database.
_MIGRATION_LOCK = 0x6C6F6E6762617401  # "longbat" 01
_FOLD_LOCK = 0x6C6F6E6762617402

_BATCH_COLUMNS = (
    "id, seq, tenant, kind, model, display_name, priority, state, done, create_time, update_time, "
    "end_time, input_file, request_count, succeeded, failed, cancelled, expired, error, output_file, webhook, "
    "ingested, final_state"
)
_FILE_COLUMNS = "id, seq, tenant, display_name, mime_type, size_bytes, sha256, create_time, expire_time, source"
_OUTCOME_COLUMN = {
    ItemStatus.SUCCEEDED: "succeeded",
    ItemStatus.FAILED: "failed",
    ItemStatus.CANCELLED: "cancelled",
    ItemStatus.EXPIRED: "expired",
}
_REQUEST_COLUMNS = ("batch_seq", "idx", "key", "metadata", "payload")
# Below this many requests one INSERT of arrays beats COPY's extra round trips.
_COPY_FROM = 256

# Requests with their results; status 0 (PENDING) and result NULL while unfinished.
_RESULT_ROWS = (
    "SELECT r.idx, r.key, r.metadata, COALESCE(x.status, 0), x.result FROM requests r "
    "LEFT JOIN results x ON x.batch_seq = r.batch_seq AND x.idx = r.idx"
)
# A tenant's unfinished batches and their pending requests, as SQLite's
# _BATCH_USE counts them: a batch still reading its input counts its highest
# idx + 1, a closed one none.
_BATCH_USE = (
    "SELECT COUNT(*), COALESCE(SUM(CASE WHEN b.ingested "
    "THEN b.request_count - b.succeeded - b.failed - b.cancelled - b.expired "
    "WHEN b.final_state IS NULL THEN COALESCE("
    "(SELECT r.idx + 1 FROM requests r WHERE r.batch_seq = b.seq ORDER BY r.idx DESC LIMIT 1), 0) "
    "ELSE 0 END), 0)::bigint FROM batches b WHERE NOT b.done AND b.tenant = $1"
)
_FILE_USE = "SELECT COALESCE(SUM(size_bytes), 0)::bigint, COUNT(*) FROM files WHERE tenant = $1"
# Serializes one tenant's quota-checked and request-id writes across replicas
# for the rest of the transaction: the checks and the insert must not
# interleave with another create's.
_TENANT_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('longbatch.tenant:' || $1, 0))"
# Results of one batch as arrays; ON CONFLICT keeps the first result of a
# request (also within one statement) and RETURNING counts only the new ones.
_RECORD_RESULTS = (
    "WITH ins AS (INSERT INTO results (batch_seq, idx, status, result) "
    "SELECT $1, u.idx, u.status, u.result FROM unnest($2::bigint[], $3::smallint[], $4::bytea[]) "
    "AS u(idx, status, result) ON CONFLICT DO NOTHING RETURNING status) "
    "SELECT status, COUNT(*) FROM ins GROUP BY status"
)
_INSERT_REQUESTS = (
    "INSERT INTO requests (batch_seq, idx, key, metadata, payload) "
    "SELECT $1, u.idx, u.key, u.metadata, u.payload FROM unnest($2::bigint[], $3::text[], $4::bytea[], $5::bytea[]) "
    "AS u(idx, key, metadata, payload)"
)
_DELETE_DELIVERIES = "DELETE FROM webhook_deliveries WHERE batch_id = $1"
# A batch not done that reads the file: the file must stay (batches_by_input_file).
_FILE_IN_USE = "SELECT 1 FROM batches WHERE input_file = $1 AND NOT done LIMIT 1"
# New deliveries as arrays, only for batches that exist. FOR KEY SHARE holds
# each batch row until commit: a delete or purge of the batch (which locks
# the row) then either commits first, and the row is not found here, or
# waits and deletes these deliveries too; none is left behind without its
# batch. ON CONFLICT covers the id and the (batch, uri) pair.
_ADD_DELIVERIES = (
    "WITH b AS (SELECT id FROM batches WHERE id = ANY($2::text[]) FOR KEY SHARE) "
    "INSERT INTO webhook_deliveries (id, batch_id, uri, body, status, attempts, next_attempt_time, create_time, "
    "update_time) SELECT u.id, u.batch_id, u.uri, u.body, 'pending', u.attempts, u.next_at, $7, $7 "
    "FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::integer[], $6::bigint[]) "
    "AS u(id, batch_id, uri, body, attempts, next_at) JOIN b ON b.id = u.batch_id ON CONFLICT DO NOTHING"
)
# Leases (store.LeaseStore) on the database's clock, so that replicas with
# skewed clocks agree on expiry: now() is the transaction's start.
_NOW_US = "(extract(epoch FROM now()) * 1000000)::bigint"
# Grants a free or expired name with the next token; a live lease is left
# alone (no row returned). Two grants at once: the second waits on the row
# and re-checks the WHERE against the first's grant, so one wins.
_ACQUIRE_LEASE = (
    f"INSERT INTO leases AS l (name, owner, token, expire_time) VALUES ($1, $2, 1, {_NOW_US} + $3) "
    "ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, token = l.token + 1, "
    f"expire_time = EXCLUDED.expire_time WHERE l.expire_time <= {_NOW_US} RETURNING token"
)
_RENEW_LEASE = (f"UPDATE leases SET expire_time = {_NOW_US} + $4 WHERE name = $1 AND owner = $2 AND token = $3 "
                f"AND expire_time > {_NOW_US}")
_RELEASE_LEASE = "UPDATE leases SET expire_time = 0 WHERE name = $1 AND owner = $2 AND token = $3"
_LIVE_LEASE = f"SELECT 1 FROM leases WHERE name = $1 AND owner = $2 AND token = $3 AND expire_time > {_NOW_US}"
_DELIVERY_COLUMNS = "id, batch_id, uri, body, attempts, next_attempt_time, claim"
# Due deliveries no live claim holds. SKIP LOCKED: dispatchers claiming at
# once take different rows; a row claimed by a transaction that committed
# meanwhile is re-checked on its new version and left out.
_CLAIM_DELIVERIES = (
    "WITH c AS (SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_time <= $1 "
    f"AND claimed_until <= {_NOW_US} ORDER BY next_attempt_time LIMIT $2 FOR UPDATE SKIP LOCKED) "
    f"UPDATE webhook_deliveries d SET claim = d.claim + 1, claimed_until = {_NOW_US} + $3 FROM c "
    f"WHERE d.id = c.id RETURNING {', '.join('d.' + c for c in _DELIVERY_COLUMNS.split(', '))}"
)
_STATE_COUNTS = "SELECT state, SUM(delta)::bigint FROM batch_state_deltas GROUP BY state"

# What a lost connection raises: the socket's errors, the server ending the
# session (restart, pg_terminate_backend), or asyncpg finding it closed.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    OSError, asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError, asyncpg.CannotConnectNowError,
    asyncpg.ConnectionFailureError,
    # A session the server ended while idle in the pool can leave asyncpg's
    # protocol mid-state: the next query fails with this before it is sent.
    asyncpg.InternalClientError)


class _Unbegun(Exception):
    """A write's connection was lost before its transaction began."""

_STATES: dict[int, State] = {int(s): s for s in State}
_COUNTED_STATES: tuple[State, ...] = tuple(s for s in State if s is not State.UNSPECIFIED)
_STATUS = {int(s): s for s in ItemStatus}
_KINDS = {k.value: k for k in BatchKind}

T = TypeVar("T")
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
"""Every connection comes from the pool."""


def _batch(row: asyncpg.Record) -> Batch:
    # Positional, in _BATCH_COLUMNS order.
    return Batch(
        row[0], row[1], row[2], _KINDS[row[3]], row[4], row[5], row[6], _STATES[row[7]], row[8], row[9],
        row[10], row[11], row[12], row[13], row[14], row[15], row[16], row[17], row[18], row[19], row[20],
        row[21], None if row[22] is None else _STATES[row[22]],
    )


def _file(row: asyncpg.Record) -> StoredFile:
    return StoredFile(
        id=row[0], seq=row[1], tenant=row[2], display_name=row[3], mime_type=row[4], size_bytes=row[5],
        sha256=row[6], create_time_us=row[7], expire_time_us=row[8], source=row[9],
    )


def _delivery(row: asyncpg.Record) -> WebhookDelivery:
    # Positional, in _DELIVERY_COLUMNS order.
    return WebhookDelivery(id=row[0], batch_id=row[1], uri=row[2], body=bytes(row[3]), attempts=row[4],
                           next_attempt_us=row[5], claim=row[6])


def _check(quota: str, used: int, adding: int, limit: int | None) -> None:
    """Raise OverQuota when ``used + adding`` goes over ``limit`` (None: no limit)."""
    if limit is not None and used + adding > limit:
        raise OverQuota(quota, used, limit, adding)


def _count(status: str) -> int:
    """The row count of a command tag such as ``INSERT 0 12`` or ``COPY 12``."""
    return int(status.rsplit(" ", 1)[-1])


# -- filters --------------------------------------------------------------------

# Domain field -> batches column. Only names listed here are ever
# interpolated into SQL; values always travel as parameters.
BATCH_FILTER_COLUMNS: dict[str, str] = {
    name: name for name in ("state", "done", "model", "display_name", "create_time", "priority", "request_id")
}
# '!=' must count a NULL column as different, as the tree's null-safe
# comparison promises: IS DISTINCT FROM. Tree values are never NULL, so '='
# stays plain '=' (the planner then uses partial indexes such as
# batches_request_id).
_SQL_OPS = {"=": "=", "!=": "IS DISTINCT FROM", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
# Parameters carry an explicit type: an int64 bound against an integer column
# would otherwise be typed int4 by the column and overflow instead of comparing.
_CASTS: dict[type, str] = {bool: "boolean", int: "bigint", str: "text"}
_ASCII_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ASCII_LOWER = _ASCII_UPPER.lower()
_FOLD = str.maketrans(_ASCII_UPPER, _ASCII_LOWER)


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def render_filter(expr: Expr, columns: dict[str, str] = BATCH_FILTER_COLUMNS,
                  first_param: int = 1) -> tuple[str, list[object]]:
    """Render a compiled filter as a PostgreSQL boolean expression.

    Args:
        expr: The tree from ``filters.compile_filter`` (or built by hand).
        columns: Field names mapped to the columns they compare.
        first_param: The number of the first ``$n`` placeholder, for
            statements whose earlier parameters come before the filter's.

    Returns:
        ``(sql, params)``: a parenthesised expression using ``$n``
        placeholders numbered from ``first_param`` (``"TRUE"`` for the empty
        ``And``), and its values in order.

    Raises:
        KeyError: The tree names a field that ``columns`` lacks (a bug, not
            client input: the compiler only emits fields from its table).
    """
    params: list[object] = []
    return _render(expr, columns, params, first_param), params


def _render(expr: Expr, columns: dict[str, str], params: list[object], first: int) -> str:
    # Recursion depth follows the tree's, which the compiler caps (MAX_DEPTH).
    if isinstance(expr, Compare):
        params.append(expr.value)
        cast = _CASTS[type(expr.value)]
        return f"({columns[expr.field]} {_SQL_OPS[expr.op]} ${first + len(params) - 1}::{cast})"
    if isinstance(expr, Match):
        # Match is ASCII case-insensitive, as SQLite's LIKE: fold ASCII letters
        # only on both sides (ILIKE would fold every letter of the collation).
        params.append("%".join(_like_escape(part) for part in expr.parts).translate(_FOLD))
        column = columns[expr.field]
        return (f"(translate({column}, '{_ASCII_UPPER}', '{_ASCII_LOWER}') "
                f"LIKE ${first + len(params) - 1}::text ESCAPE '\\')")
    if isinstance(expr, Not):
        return f"(NOT {_render(expr.term, columns, params, first)})"
    if not expr.terms:
        return "TRUE"  # only And can be empty
    joiner = " AND " if isinstance(expr, And) else " OR "
    if len(expr.terms) == 1:
        return _render(expr.terms[0], columns, params, first)
    return "(" + joiner.join([_render(term, columns, params, first) for term in expr.terms]) + ")"


# -- URLs and errors ------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
    except ValueError:
        return "<unparsable database URL>"


def _password(url: str) -> str | None:
    with contextlib.suppress(ValueError):
        return urlsplit(url).password
    return None


class DatabaseUnavailable(RuntimeError):
    """The database could not be reached or used at open; the message names
    the URL without its password."""


# -- the store ------------------------------------------------------------------


class PostgresStore:
    """The Store over a PostgreSQL database shared by any number of replicas.

    Args:
        url: libpq URL, ``postgresql://user:password@host:port/dbname``.
        min_connections, max_connections: The pool's bounds.
        connect_timeout_s: How long one connection attempt may take before
            ``open`` gives up with ``DatabaseUnavailable``.
        state_refresh_s: How often the counts of ``count_batches_by_state``
            are read again (changes by other replicas show within this;
            this store's own show when its write returns).
    """

    def __init__(self, url: str, *, min_connections: int = 2, max_connections: int = 16,
                 connect_timeout_s: float = 10.0, state_refresh_s: float = 1.0) -> None:
        self._url = url
        self._min = min_connections
        self._max = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._state_refresh_s = state_refresh_s
        self._pool: asyncpg.Pool | None = None
        self._writes: set[asyncio.Task[Any]] = set()
        self._state_counts: dict[State, int] = dict.fromkeys(_COUNTED_STATES, 0)
        self._refresher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self._url)!r})"

    def _scrub(self, text: str) -> str:
        password = _password(self._url)
        if password:
            # As written in the URL and as the driver sends it (percent-decoded).
            for form in {password, unquote(password)}:
                text = text.replace(form, "***")
        return text

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool and apply pending migrations (under an advisory lock).

        Raises:
            DatabaseUnavailable: the server does not answer, refuses the
                login, or the database does not exist (message without the
                password).
            RuntimeError: the database's schema is newer than this code.
        """
        try:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=self._min, max_size=self._max, timeout=self._connect_timeout_s,
                server_settings={"application_name": "longbatch"})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as e:
            raise DatabaseUnavailable(
                f"cannot open PostgreSQL database {redact_url(self._url)}: "
                f"{type(e).__name__}: {self._scrub(str(e)) or 'no answer'}") from None
        try:
            async with self._pool.acquire() as conn:
                await self._migrate(conn)
            await self.refresh_state_counts()
        except BaseException:
            await self.close()
            raise
        self._refresher = asyncio.create_task(self._refresh_loop(), name="longbatch-pg-state-counts")

    @staticmethod
    async def _migrate(conn: Conn) -> None:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, applied_time bigint NOT NULL)")
            version = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
            if version > len(MIGRATIONS):
                raise RuntimeError(f"database schema v{version} is newer than this server (v{len(MIGRATIONS)})")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                async with conn.transaction():
                    await conn.execute(script)
                    await conn.execute("INSERT INTO schema_version VALUES ($1, $2)", number, now_us())
                log.info("PostgreSQL schema migrated to v%d", number)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    async def close(self) -> None:
        """Wait for writes in flight, stop the refresher, close the pool; safe to call twice."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool, for seams that share this store's connections
        (``PgFileBytes``); RuntimeError when the store is not open."""
        return self._p

    @property
    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run one read on a pooled connection, once more on a fresh one if
        the first was lost (database restart, failover, a killed backend):
        a read has no effect to repeat."""
        pool = self._p
        try:
            async with pool.acquire() as conn:
                return await fn(conn)
        except _CONNECTION_LOST as e:
            log.warning("PostgreSQL connection lost, reading again: %s", self._scrub(f"{type(e).__name__}: {e}"))
            await pool.expire_connections()
        async with pool.acquire() as conn:
            return await fn(conn)

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        return await self._read(lambda conn: conn.fetch(sql, *args))

    async def _fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        return await self._read(lambda conn: conn.fetchrow(sql, *args))

    async def _fetchval(self, sql: str, *args: object) -> Any:
        return await self._read(lambda conn: conn.fetchval(sql, *args))

    async def _write(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction on a pooled connection.

        The transaction runs as a task of its own; a cancelled caller waits
        for it to end (commit or rollback) before its cancellation goes on,
        so no write is cut off mid-statement and callers see writes end in
        the order their awaits returned.

        A connection found lost at BEGIN is replaced and the write runs on
        another (nothing of it ran). Lost later, the write is not repeated
        (it may have committed): it raises, and the pool's other
        connections, likely lost too, are replaced before their next use.
        """
        pool = self._p

        async def attempt() -> T:
            began = False
            try:
                async with pool.acquire() as conn, conn.transaction():
                    began = True
                    return await fn(conn)
            except _CONNECTION_LOST as e:
                await pool.expire_connections()
                if began:
                    raise
                log.warning("PostgreSQL connection lost, writing on another: %s",
                            self._scrub(f"{type(e).__name__}: {e}"))
                raise _Unbegun from None

        async def run() -> T:
            try:
                return await attempt()
            except _Unbegun:
                async with pool.acquire() as conn, conn.transaction():
                    return await fn(conn)

        task = asyncio.ensure_future(run())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                with contextlib.suppress(BaseException):
                    await asyncio.wait([task])
            raise

    # -- meta -----------------------------------------------------------------

    async def secret(self, name: str, size: int = 32) -> bytes:
        """A random secret stored under ``name``, made on first use (the
        first replica to store one wins; all read the same)."""
        value = secrets.token_bytes(size)

        async def tx(conn: Conn) -> bytes:
            await conn.execute("INSERT INTO meta (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING", name, value)
            return bytes(await conn.fetchval("SELECT value FROM meta WHERE name = $1", name))

        return await self._write(tx)

    async def usage(self, tenant: str) -> TenantUsage:
        """What ``tenant`` holds (see Store)."""
        files = await self._fetchrow(_FILE_USE, tenant)
        batches = await self._fetchrow(_BATCH_USE, tenant)
        assert files is not None and batches is not None
        return TenantUsage(int(files[0]), int(files[1]), int(batches[0]), int(batches[1]))

    # -- batches ----------------------------------------------------------------

    async def create_batch(
        self, batch: NewBatch, items: Iterable[NewItem], request_id_ttl_us: int, limits: UsageLimits | None = None
    ) -> tuple[Batch, bool]:
        """Insert a batch and its requests (COPY when many) in one
        transaction, within ``limits`` (see Store)."""
        now = now_us()

        async def tx(conn: Conn) -> tuple[Batch, bool]:
            if batch.request_id or limits is not None:
                await conn.execute(_TENANT_LOCK, batch.tenant)
            if batch.request_id:
                row = await conn.fetchrow(
                    f"SELECT {_BATCH_COLUMNS} FROM batches WHERE tenant = $1 AND request_id = $2",
                    batch.tenant, batch.request_id)
                if row is not None:
                    earlier = _batch(row)
                    if earlier.create_time_us > now - request_id_ttl_us:
                        return earlier, False
                    await conn.execute("UPDATE batches SET request_id = NULL WHERE seq = $1", earlier.seq)
            unfinished = pending = 0
            if limits is not None:
                use = await conn.fetchrow(_BATCH_USE, batch.tenant)
                assert use is not None
                unfinished, pending = use
                _check("unfinished_batches", unfinished, 1, limits.unfinished_batches)
            seq = await conn.fetchval(
                "INSERT INTO batches (id, tenant, kind, model, display_name, priority, state, create_time, "
                "update_time, input_file, webhook, request_id, ingested) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING seq",
                batch.id, batch.tenant, batch.kind.value, batch.model, batch.display_name, batch.priority,
                int(State.PENDING), now, now, batch.input_file, batch.webhook, batch.request_id or None,
                batch.input_file is None)
            count = await _insert_items(conn, seq, items)
            if limits is not None:
                # Raising rolls the rows back; a file batch needs room for one.
                _check("pending_requests", pending, max(count, 1), limits.pending_requests)
            row = await conn.fetchrow(
                f"UPDATE batches SET request_count = $1 WHERE seq = $2 RETURNING {_BATCH_COLUMNS}", count, seq)
            assert row is not None
            return _batch(row), True

        result = await self._write(tx)
        if result[1]:
            await self.refresh_state_counts(fold=False)
        return result

    async def get_batch(self, tenant: str | None, batch_id: str) -> Batch | None:
        """The batch, scoped to ``tenant`` unless it is None."""
        row = await self._fetchrow(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = $1", batch_id)
        if row is None or (tenant is not None and row[2] != tenant):
            return None
        return _batch(row)

    async def list_batches(self, tenant: str, where: Expr, before_seq: int | None, limit: int) -> list[Batch]:
        """Newest first, keyset-paged on seq (see Store)."""
        sql, params = render_filter(where, first_param=3)
        rows = await self._fetch(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE tenant = $1 AND seq < $2 AND {sql} "
            f"ORDER BY seq DESC LIMIT ${3 + len(params)}",
            tenant, before_seq if before_seq is not None else 2**62, *params, limit)
        return [_batch(r) for r in rows]

    async def update_batch(
        self, tenant: str, batch_id: str, *, display_name: str | None, priority: int | None
    ) -> Batch | None:
        """Apply the given changes (see Store); priority only while not done."""

        async def tx(conn: Conn) -> asyncpg.Record | None:
            if display_name is not None:
                await conn.execute(
                    "UPDATE batches SET display_name = $1, update_time = $2 WHERE id = $3 AND tenant = $4",
                    display_name, now_us(), batch_id, tenant)
            if priority is not None:
                await conn.execute(
                    "UPDATE batches SET priority = $1, update_time = $2 WHERE id = $3 AND tenant = $4 AND NOT done",
                    priority, now_us(), batch_id, tenant)
            return await conn.fetchrow(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = $1 AND tenant = $2", batch_id, tenant)

        row = await self._write(tx)
        return _batch(row) if row else None

    async def delete_batch(self, tenant: str, batch_id: str) -> list[str] | None:
        """Delete a done batch with its requests, results, deliveries and
        generated output file row (see Store)."""

        async def tx(conn: Conn) -> list[str] | None:
            row = await conn.fetchrow(
                "SELECT seq, done, output_file FROM batches WHERE id = $1 AND tenant = $2 FOR UPDATE",
                batch_id, tenant)
            if row is None:
                return None
            seq, done, output_file = row
            if not done:
                raise StoreConflict("batch is not done")
            await _delete_batch_rows(conn, seq, batch_id)
            if output_file:
                await conn.execute("DELETE FROM files WHERE id = $1", output_file)
            return [output_file] if output_file else []

        deleted = await self._write(tx)
        if deleted is not None:
            await self.refresh_state_counts(fold=False)
        return deleted

    def count_batches_by_state(self) -> dict[State, int]:
        """Batches by state, every state but UNSPECIFIED (0 included), as
        last read: this store's own changes show once its write returns,
        other replicas' within ``state_refresh_s``."""
        return dict(self._state_counts)

    async def refresh_state_counts(self, *, fold: bool = True) -> None:
        """Read the counts of ``count_batches_by_state`` again; with ``fold``,
        first fold the deltas the triggers left into one row per state (one
        replica at a time; the others just read)."""

        async def tx(conn: Conn) -> list[asyncpg.Record]:
            if fold and await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _FOLD_LOCK):
                await conn.execute(
                    "WITH d AS (DELETE FROM batch_state_deltas RETURNING state, delta) "
                    "INSERT INTO batch_state_deltas SELECT state, SUM(delta) FROM d GROUP BY state "
                    "HAVING SUM(delta) <> 0")
            return await conn.fetch(_STATE_COUNTS)

        rows = await self._write(tx) if fold else await self._fetch(_STATE_COUNTS)
        counts: dict[State, int] = dict.fromkeys(_COUNTED_STATES, 0)
        for state, count in rows:
            if state in _STATES and _STATES[state] is not State.UNSPECIFIED:
                counts[_STATES[state]] = int(count)
        self._state_counts = counts

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._state_refresh_s)
            try:
                await self.refresh_state_counts()
            except Exception as e:
                # The last counts stay and the next round tries again: the
                # loop must outlive any one failure, whatever it is.
                log.warning("reading batch counts failed: %s", self._scrub(f"{type(e).__name__}: {e}"))

    async def unfinished_batches(self) -> list[Batch]:
        """Batches not done, oldest first."""
        rows = await self._fetch(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE NOT done ORDER BY seq")
        return [_batch(r) for r in rows]

    async def mark_running(self, batch_id: str) -> None:
        """PENDING → RUNNING."""

        async def tx(conn: Conn) -> str:
            return str(await conn.execute(
                "UPDATE batches SET state = $1, update_time = $2 WHERE id = $3 AND state = $4",
                int(State.RUNNING), now_us(), batch_id, int(State.PENDING)))

        if _count(await self._write(tx)):
            await self.refresh_state_counts(fold=False)

    async def close_batch(self, batch_id: str, state: State, error: bytes | None, rest: ItemStatus) -> Batch | None:
        """Set the terminal state; unfinished requests now count as ``rest``
        (their rows stay as they are: one update however big the batch)."""
        column = _OUTCOME_COLUMN[rest]

        async def tx(conn: Conn) -> asyncpg.Record | None:
            # The row lock this takes orders it against record_* on the batch.
            row = await conn.fetchrow(
                f"UPDATE batches SET final_state = $1, error = $2, {column} = request_count - succeeded - failed, "
                f"update_time = $3 WHERE id = $4 AND final_state IS NULL AND NOT done RETURNING {_BATCH_COLUMNS}",
                int(state), error, now_us(), batch_id)
            if row is None:
                row = await conn.fetchrow(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = $1", batch_id)
            return row

        row = await self._write(tx)
        return _batch(row) if row else None

    async def mark_done(self, batch_id: str, output_file: str | None) -> Batch | None:
        """Set done, end_time and the output file (see Store)."""
        now = now_us()

        async def tx(conn: Conn) -> tuple[asyncpg.Record | None, bool]:
            row = await conn.fetchrow(
                "UPDATE batches SET done = TRUE, state = COALESCE(final_state, state), end_time = $1, "
                f"update_time = $1, output_file = $2 WHERE id = $3 AND NOT done RETURNING {_BATCH_COLUMNS}",
                now, output_file, batch_id)
            if row is not None:
                return row, True
            return await conn.fetchrow(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = $1", batch_id), False

        row, changed = await self._write(tx)
        if changed:
            await self.refresh_state_counts(fold=False)
        return _batch(row) if row else None

    async def expired_batches(self, created_before_us: int) -> list[str]:
        """Not-done batches created before the cutoff."""
        rows = await self._fetch("SELECT id FROM batches WHERE NOT done AND create_time < $1", created_before_us)
        return [r[0] for r in rows]

    async def purge_done_batches(self, ended_before_us: int, max_batches: int, max_requests: int, *,
                                 lease: Lease | None = None) -> Purged:
        """Delete old done batches in one bounded transaction, fenced by
        ``lease`` when given (see Store)."""

        async def tx(conn: Conn) -> Purged:
            await _fence(conn, lease)
            batch_ids: list[str] = []
            file_ids: list[str] = []
            budget = max_requests
            # SKIP LOCKED: replicas purging at once take different batches.
            rows = await conn.fetch(
                "SELECT seq, id, output_file FROM batches WHERE done AND end_time < $1 ORDER BY end_time "
                "LIMIT $2 FOR UPDATE SKIP LOCKED", ended_before_us, max_batches)
            more = len(rows) == max_batches
            for seq, batch_id, output_file in rows:
                # The idx before the last `budget` requests: None when the
                # rest of the batch fits in this step.
                cut = await conn.fetchval(
                    "SELECT idx FROM requests WHERE batch_seq = $1 ORDER BY idx DESC LIMIT 1 OFFSET $2", seq, budget)
                if cut is not None:
                    more = True
                    if not batch_ids:
                        # Too big for one step: its last requests go now and
                        # the row stays until the final step (a reader sees a
                        # shorter tail, never a gap).
                        await conn.execute("DELETE FROM requests WHERE batch_seq = $1 AND idx > $2", seq, cut)
                        await conn.execute("DELETE FROM results WHERE batch_seq = $1 AND idx > $2", seq, cut)
                    break
                budget -= await _delete_batch_rows(conn, seq, batch_id)
                if output_file:
                    # Only generated files are outputs; inputs follow file_ttl.
                    gone = await conn.execute("DELETE FROM files WHERE id = $1 AND source = 'generated'", output_file)
                    if _count(gone):
                        file_ids.append(output_file)
                batch_ids.append(batch_id)
            return Purged(batch_ids, file_ids, more)

        purged = await self._write(tx)
        if purged.batch_ids:
            await self.refresh_state_counts(fold=False)
        return purged

    # -- requests and results ---------------------------------------------------------

    async def append_requests(self, batch_id: str, first_idx: int, flat: Sequence[int | str | bytes],
                              max_pending: int | None = None) -> None:
        """Add requests read from a batch's input file by COPY, in one
        transaction, within ``max_pending`` (see Store)."""

        async def tx(conn: Conn) -> None:
            row = await conn.fetchrow("SELECT seq, tenant FROM batches WHERE id = $1", batch_id)
            if row is None:
                return
            seq, tenant = row
            if max_pending is not None:
                await conn.execute(_TENANT_LOCK, tenant)
                # Counts this batch's requests read so far too.
                use = await conn.fetchrow(_BATCH_USE, tenant)
                assert use is not None
                _check("pending_requests", use[1], len(flat) // 3, max_pending)
            # The triples are typed loosely (one flat sequence); the offsets are ints.
            records = ((seq, first_idx + flat[i], flat[i + 1], None, flat[i + 2])  # type: ignore[operator]
                       for i in range(0, len(flat), 3))
            await _insert_items(conn, seq, (), records)

        await self._write(tx)

    async def finish_ingest(self, batch_id: str, request_count: int) -> Batch | None:
        """Mark a batch's requests complete; it may run from now on."""

        async def tx(conn: Conn) -> asyncpg.Record | None:
            await conn.execute(
                "UPDATE batches SET ingested = TRUE, request_count = $1, update_time = $2 WHERE id = $3 AND NOT done",
                request_count, now_us(), batch_id)
            return await conn.fetchrow(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = $1", batch_id)

        row = await self._write(tx)
        return _batch(row) if row else None

    async def reset_ingest(self, batch_id: str) -> None:
        """Drop the requests of a batch whose ingest did not complete."""

        async def tx(conn: Conn) -> None:
            for table in ("requests", "results"):
                await conn.execute(
                    f"DELETE FROM {table} WHERE batch_seq = "
                    "(SELECT seq FROM batches WHERE id = $1 AND NOT ingested)", batch_id)

        await self._write(tx)

    async def pending_items(self, batch_id: str, from_idx: int, limit: int) -> list[PendingItem]:
        """Next PENDING requests by idx."""
        rows = await self._fetch(
            "SELECT r.idx, r.payload FROM requests r WHERE r.batch_seq = (SELECT seq FROM batches WHERE id = $1) "
            "AND r.idx >= $2 AND NOT EXISTS "
            "(SELECT 1 FROM results x WHERE x.batch_seq = r.batch_seq AND x.idx = r.idx) ORDER BY r.idx LIMIT $3",
            batch_id, from_idx, limit)
        return [PendingItem(r[0], r[1]) for r in rows]

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> dict[str, Batch]:
        """Persist results and counters in one transaction (see Store)."""
        if not outcomes:
            return {}
        groups: dict[str, tuple[list[int], list[int], list[bytes]]] = {}
        for o in outcomes:
            idxs, statuses, results = groups.setdefault(o.batch_id, ([], [], []))
            idxs.append(o.idx)
            statuses.append(int(o.status))
            results.append(o.result)
        return await self._write(lambda conn: _record_tx(conn, groups))

    async def record_results(self, batch_id: str, status: ItemStatus, idxs: Sequence[int],
                             results: Sequence[bytes]) -> Batch | None:
        """record_outcomes for one batch and one status, in columns (see Store)."""
        if len(idxs) != len(results):
            raise ValueError(f"{len(idxs)} idxs but {len(results)} results")
        group = {batch_id: (list(idxs), [int(status)] * len(idxs), list(results))}
        touched = await self._write(lambda conn: _record_tx(conn, group))
        return touched.get(batch_id)

    async def results(self, batch_id: str, start_idx: int, limit: int, *, to_first_pending: bool = True
                      ) -> list[ResultRow]:
        """Requests from ``start_idx`` in order, up to the first PENDING one
        unless ``to_first_pending`` is False (then PENDING rows come too)."""
        rows = await self._fetch(
            f"{_RESULT_ROWS} WHERE r.batch_seq = (SELECT seq FROM batches WHERE id = $1) AND r.idx >= $2 "
            "ORDER BY r.idx LIMIT $3", batch_id, start_idx, limit)
        out = []
        for r in rows:
            if r[3] == ItemStatus.PENDING and to_first_pending:
                break
            out.append(ResultRow(r[0], r[1], r[2], _STATUS[r[3]], r[4] or b""))
        return out

    async def finished_count(self, batch: Batch, lo: int, hi: int) -> int:
        """See Store: a range scan of the results key."""
        return int(await self._fetchval(
            "SELECT COUNT(*) FROM results WHERE batch_seq = $1 AND idx >= $2 AND idx < $3", batch.seq, lo, hi))

    async def output_size(self, batch_id: str) -> int:
        """Total bytes of results and metadata (as SQLite counts them)."""
        return int(await self._fetchval(
            # An unfinished request of a closed batch reads as a ~64-byte status.
            "SELECT (COALESCE(SUM(COALESCE(length(x.result), 64)), 0) + COALESCE(SUM(length(r.metadata)), 0) "
            "+ COUNT(*) * 16)::bigint "
            "FROM requests r JOIN batches b ON b.seq = r.batch_seq "
            "LEFT JOIN results x ON x.batch_seq = r.batch_seq AND x.idx = r.idx WHERE b.id = $1", batch_id))

    def result_reader(self, batch: Batch) -> ResultReader | None:
        """None: worker processes do not read this store yet (outputs are
        rendered in the server process)."""
        return None

    def range_runner(self, batch: Batch) -> RangeRunner | None:
        """None: worker processes do not write this store yet (the executor
        runs ranges in the server process)."""
        return None

    # -- files ------------------------------------------------------------------------
    # Metadata only: the bytes are FileBytes' (on disk, or PgFileBytes' chunks).

    async def add_file(self, file: StoredFile, limits: UsageLimits | None = None) -> None:
        """Insert a file row (its seq is assigned here), within ``limits``
        checked under the tenant's lock (see Store)."""

        async def tx(conn: Conn) -> None:
            if limits is not None:
                # Two replicas adding a tenant's files at once must not both
                # pass the check on the same count.
                await conn.execute(_TENANT_LOCK, file.tenant)
                use = await conn.fetchrow(_FILE_USE, file.tenant)
                assert use is not None
                stored, count = use
                _check("files", count, 1, limits.files)
                _check("stored_bytes", stored, file.size_bytes, limits.stored_bytes)
            await conn.execute(
                "INSERT INTO files (id, tenant, display_name, mime_type, size_bytes, sha256, create_time, "
                "expire_time, source) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                file.id, file.tenant, file.display_name, file.mime_type, file.size_bytes, file.sha256,
                file.create_time_us, file.expire_time_us, file.source)

        await self._write(tx)

    async def get_file(self, tenant: str | None, file_id: str) -> StoredFile | None:
        """The file, scoped to ``tenant`` unless it is None."""
        row = await self._fetchrow(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = $1", file_id)
        if row is None or (tenant is not None and row[2] != tenant):
            return None
        return _file(row)

    async def list_files(self, tenant: str, before_seq: int | None, limit: int) -> list[StoredFile]:
        """Newest first, keyset-paged on seq."""
        rows = await self._fetch(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE tenant = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
            tenant, before_seq if before_seq is not None else 2**62, limit)
        return [_file(r) for r in rows]

    async def delete_file(self, tenant: str, file_id: str, *, lease: Lease | None = None) -> bool:
        """Delete a file row unless a batch that is not done reads it, fenced
        by ``lease`` when given (see Store)."""

        async def tx(conn: Conn) -> bool:
            await _fence(conn, lease)
            if await conn.fetchval(_FILE_IN_USE, file_id) is not None:
                raise StoreConflict("a batch that is not done reads this file")
            return _count(await conn.execute("DELETE FROM files WHERE id = $1 AND tenant = $2", file_id, tenant)) > 0

        return await self._write(tx)

    async def expired_files(self, now_us: int, limit: int = 1000) -> list[StoredFile]:
        """Expired files that no unfinished batch reads (see Store)."""
        # Generated files have no expire_time: they go with their batch.
        rows = await self._fetch(
            f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.expire_time IS NOT NULL AND f.expire_time <= $1 "
            "AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.input_file = f.id AND NOT b.done) "
            "ORDER BY f.seq LIMIT $2", now_us, limit)
        return [_file(r) for r in rows]

    # -- webhook deliveries -------------------------------------------------------------
    # A batch's deliveries go with it (delete_batch, purge_done_batches), as
    # in the SQLite store.

    async def add_webhook_deliveries(self, deliveries: Sequence[WebhookDelivery]) -> int:
        """Insert PENDING deliveries, ignoring (batch, uri) pairs already
        stored and batches that are gone (see Store)."""
        if not deliveries:
            return 0
        now = now_us()

        async def tx(conn: Conn) -> int:
            return _count(await conn.execute(
                _ADD_DELIVERIES, [d.id for d in deliveries], [d.batch_id for d in deliveries],
                [d.uri for d in deliveries], [d.body for d in deliveries], [d.attempts for d in deliveries],
                [d.next_attempt_us for d in deliveries], now))

        return await self._write(tx)

    async def delete_orphan_webhook_deliveries(self, limit: int) -> int:
        """Delete up to ``limit`` deliveries whose batch is gone (see Store)."""

        async def tx(conn: Conn) -> int:
            return _count(await conn.execute(
                "DELETE FROM webhook_deliveries WHERE id IN (SELECT d.id FROM webhook_deliveries d "
                "WHERE NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = d.batch_id) LIMIT $1)", limit))

        return await self._write(tx)

    async def batches_missing_webhooks(self) -> list[Batch]:
        """Done batches with a webhook config and no delivery rows."""
        rows = await self._fetch(
            f"SELECT {_BATCH_COLUMNS} FROM batches b WHERE b.done AND length(b.webhook) > 0 "
            "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.batch_id = b.id) ORDER BY b.seq")
        return [_batch(r) for r in rows]

    async def due_webhook_deliveries(self, now_us: int, limit: int) -> list[WebhookDelivery]:
        """PENDING deliveries due at ``now_us``, earliest first."""
        rows = await self._fetch(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries "
            "WHERE status = 'pending' AND next_attempt_time <= $1 ORDER BY next_attempt_time LIMIT $2",
            now_us, limit)
        return [_delivery(r) for r in rows]

    async def claim_webhook_deliveries(self, now_us: int, limit: int, claim_s: float) -> list[WebhookDelivery]:
        """Claim due deliveries no live claim holds (see DeliveryStore)."""
        rows = await self._write(lambda conn: conn.fetch(_CLAIM_DELIVERIES, now_us, limit, int(claim_s * 1_000_000)))
        # RETURNING comes in no particular order.
        return sorted((_delivery(r) for r in rows), key=lambda d: (d.next_attempt_us, d.id))

    async def next_webhook_time(self, after_us: int) -> int | None:
        """Earliest time after ``after_us`` a PENDING delivery comes due (a
        claimed one when its claim ends, on the database's clock: replicas'
        clocks are taken to agree to well within a claim)."""
        value = await self._fetchval(
            "SELECT MIN(GREATEST(next_attempt_time, claimed_until)) FROM webhook_deliveries "
            "WHERE status = 'pending' AND GREATEST(next_attempt_time, claimed_until) > $1", after_us)
        return None if value is None else int(value)

    async def record_webhook_attempt(
        self, delivery_id: str, attempts: int, status: DeliveryStatus, next_attempt_us: int, error: str | None,
        *, claim: int | None = None,
    ) -> bool:
        """Store an attempt's outcome and end its claim (see DeliveryStore)."""

        async def tx(conn: Conn) -> bool:
            return _count(await conn.execute(
                "UPDATE webhook_deliveries SET attempts = $1, status = $2, next_attempt_time = $3, last_error = $4, "
                "update_time = $5, claimed_until = 0 WHERE id = $6 AND ($7::bigint IS NULL OR claim = $7)",
                attempts, status.value, next_attempt_us, error, now_us(), delivery_id, claim)) > 0

        return await self._write(tx)

    # -- leases -------------------------------------------------------------------------

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> Lease | None:
        """Grant ``name`` if it is free or expired (see LeaseStore)."""
        token = await self._write(lambda conn: conn.fetchval(_ACQUIRE_LEASE, name, owner, int(ttl_s * 1_000_000)))
        return None if token is None else Lease(name, owner, int(token))

    async def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        """Extend a live lease (see LeaseStore)."""
        status = await self._write(lambda conn: conn.execute(
            _RENEW_LEASE, lease.name, lease.owner, lease.token, int(ttl_s * 1_000_000)))
        return _count(status) > 0

    async def release_lease(self, lease: Lease) -> None:
        """End the lease if it is the latest grant (see LeaseStore)."""
        await self._write(lambda conn: conn.execute(_RELEASE_LEASE, lease.name, lease.owner, lease.token))

    async def holds_lease(self, lease: Lease) -> bool:
        """Whether the lease is live now."""
        return await self._fetchval(_LIVE_LEASE, lease.name, lease.owner, lease.token) is not None


# -- transaction bodies shared by several methods ------------------------------------


async def _insert_items(conn: Conn, seq: int, items: Iterable[NewItem],
                        records: Iterable[tuple[Any, ...]] | None = None) -> int:
    """Insert requests of batch ``seq``: ``items``, or ready ``records`` in
    _REQUEST_COLUMNS order. Few go as one INSERT of arrays; many by COPY,
    streamed (a million requests never become one list). The count inserted."""
    rows = records if records is not None else ((seq, i.idx, i.key, i.metadata, i.payload) for i in items)
    it = iter(rows)
    head = list(itertools.islice(it, _COPY_FROM))
    if len(head) < _COPY_FROM:
        if not head:
            return 0
        columns = list(zip(*head, strict=True))
        return _count(await conn.execute(_INSERT_REQUESTS, seq, columns[1], columns[2], columns[3], columns[4]))
    status = await conn.copy_records_to_table(
        "requests", records=itertools.chain(head, it), columns=_REQUEST_COLUMNS)
    return _count(status)


async def _fence(conn: Conn, lease: Lease | None) -> None:
    """The check of a fenced write (see store.LeaseStore), first in its
    transaction. FOR SHARE holds the lease's row until the transaction ends:
    a grant of the name must update that row, so none commits before this
    write does (and renewals wait the same short while)."""
    if lease is not None and await conn.fetchval(
            _LIVE_LEASE + " FOR SHARE", lease.name, lease.owner, lease.token) is None:
        raise LeaseLost(lease)


async def _delete_batch_rows(conn: Conn, seq: int, batch_id: str) -> int:
    """Delete a batch's row, requests, results and deliveries; the number of requests."""
    gone = _count(await conn.execute("DELETE FROM requests WHERE batch_seq = $1", seq))
    await conn.execute("DELETE FROM results WHERE batch_seq = $1", seq)
    await conn.execute("DELETE FROM batches WHERE seq = $1", seq)
    await conn.execute(_DELETE_DELIVERIES, batch_id)
    return gone


async def _record_tx(conn: Conn,
                     groups: dict[str, tuple[list[int], list[int], list[bytes]]]) -> dict[str, Batch]:
    touched: dict[str, Batch] = {}
    # Batches locked in id order, so two writers of the same batches cannot deadlock.
    for batch_id in sorted(groups):
        idxs, statuses, results = groups[batch_id]
        # The batch row's lock orders this against close_batch: a closed
        # batch takes no more results, and counters are read under it.
        seq = await conn.fetchval(
            "SELECT seq FROM batches WHERE id = $1 AND final_state IS NULL AND NOT done FOR NO KEY UPDATE", batch_id)
        if seq is None:
            continue
        changed = await conn.fetch(_RECORD_RESULTS, seq, idxs, statuses, results)
        sets = ", ".join(f"{_OUTCOME_COLUMN[_STATUS[s]]} = {_OUTCOME_COLUMN[_STATUS[s]]} + {int(n)}"
                         for s, n in changed if n)
        if sets:
            row = await conn.fetchrow(
                f"UPDATE batches SET {sets}, update_time = $1 WHERE seq = $2 RETURNING {_BATCH_COLUMNS}",
                now_us(), seq)
        else:
            row = await conn.fetchrow(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE seq = $1", seq)
        if row is not None:
            touched[batch_id] = _batch(row)
    return touched


__all__ = ["MIGRATIONS", "DatabaseUnavailable", "PostgresStore", "redact_url", "render_filter"]
