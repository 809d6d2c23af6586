"""SQLite implementation of the Store.

Each connection of the server has one job. Every write transaction runs as
one synchronous function on a single writer thread that owns a plain
sqlite3 connection: one hop between the event loop and that thread per
transaction, however many statements it holds, and FIFO order on the one
thread serializes writers (the single write path that keeps "database is
locked" away from clients). Point reads run on the event loop's own thread
through ``_quick``; longer reads and scans go through an aiosqlite reader so
that they never stall the loop. In WAL mode both readers see committed
snapshots without waiting for the writer. All SQL of the project lives here.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import secrets
import sqlite3
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

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
    Answerer,
    DeliveryStatus,
    Lease,
    LeaseLost,
    OverQuota,
    Purged,
    RangeRun,
    RangeRunner,
    RawResult,
    ResultReader,
    StoreConflict,
    TenantUsage,
    UsageLimits,
    WebhookDelivery,
)

# Each entry upgrades the schema by one version (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE batches (
        seq INTEGER PRIMARY KEY,             -- creation order, for keyset paging
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        kind TEXT NOT NULL,
        model TEXT NOT NULL,
        display_name TEXT NOT NULL,
        priority INTEGER NOT NULL,
        state INTEGER NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        create_time INTEGER NOT NULL,        -- microseconds since the epoch
        update_time INTEGER NOT NULL,
        end_time INTEGER,
        input_file TEXT,
        request_count INTEGER NOT NULL DEFAULT 0,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        cancelled INTEGER NOT NULL DEFAULT 0,
        expired INTEGER NOT NULL DEFAULT 0,
        error BLOB,
        output_file TEXT,
        webhook BLOB,
        request_id TEXT
    );
    CREATE INDEX batches_by_tenant ON batches (tenant, seq);
    CREATE INDEX batches_not_done ON batches (done) WHERE done = 0;
    CREATE UNIQUE INDEX batches_request_id ON batches (tenant, request_id) WHERE request_id IS NOT NULL;
    CREATE TABLE requests (
        batch_seq INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        key TEXT NOT NULL,
        metadata BLOB,
        payload BLOB NOT NULL,
        status INTEGER NOT NULL DEFAULT 0,
        result BLOB,
        PRIMARY KEY (batch_seq, idx)
    ) WITHOUT ROWID;
    CREATE TABLE files (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        display_name TEXT NOT NULL,
        mime_type TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        sha256 BLOB NOT NULL,
        create_time INTEGER NOT NULL,
        expire_time INTEGER,
        source TEXT NOT NULL
    );
    CREATE INDEX files_by_tenant ON files (tenant, seq);
    """,
    # v2: file input is read in the background; until `ingested` is set the
    # batch's requests are incomplete and must not run.
    """
    ALTER TABLE batches ADD COLUMN ingested INTEGER NOT NULL DEFAULT 1;
    """,
    # v3: webhook deliveries, one row per (batch, uri), kept durable so that
    # retries survive a restart. No foreign key: deleting a batch must not
    # cancel the notification that it ended.
    """
    CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,
        batch_id TEXT NOT NULL,
        uri TEXT NOT NULL,
        body BLOB NOT NULL,                  -- the exact bytes signed and sent on every attempt
        status TEXT NOT NULL DEFAULT 'pending',  -- pending, delivered, failed
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_time INTEGER NOT NULL,  -- microseconds since the epoch
        last_error TEXT,
        create_time INTEGER NOT NULL,
        update_time INTEGER NOT NULL,
        UNIQUE (batch_id, uri)
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_time) WHERE status = 'pending';
    """,
    # v4: retention purges done batches oldest end first; without this index
    # every sweep would scan all batches.
    """
    CREATE INDEX batches_done_by_end ON batches (end_time) WHERE done = 1;
    """,
    # v5: the terminal state a batch was closed with waits in final_state
    # until its output is written; `state` turns terminal only together with
    # `done`, so no reader sees SUCCEEDED on an operation that is not done.
    """
    ALTER TABLE batches ADD COLUMN final_state INTEGER;
    UPDATE batches SET final_state = state, state = 2 WHERE done = 0 AND state >= 3;
    """,
    # v6: results move to a table of their own. Writing a result into the
    # request's row grew the row and split its page: ~11 µs per result
    # against ~4 µs to append to this table. A request is PENDING while it
    # has no row here.
    """
    CREATE TABLE results (
        batch_seq INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        status INTEGER NOT NULL,             -- ItemStatus, never PENDING
        result BLOB NOT NULL,                -- response, or google.rpc.Status
        PRIMARY KEY (batch_seq, idx)
    ) WITHOUT ROWID;
    INSERT INTO results SELECT batch_seq, idx, status, COALESCE(result, x'') FROM requests WHERE status != 0;
    ALTER TABLE requests DROP COLUMN status;
    ALTER TABLE requests DROP COLUMN result;
    """,
    # v7: batches by state, kept by triggers as batches are created, change
    # state and go (whichever connection or process writes), so the metrics
    # page reads seven rows instead of grouping the whole table (~10 ms on a
    # big one) on every scrape. Per-result counter updates do not set
    # `state`, so results never fire these.
    """
    CREATE TABLE batch_states (state INTEGER PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO batch_states (state, count) SELECT state, COUNT(*) FROM batches GROUP BY state;
    CREATE TRIGGER batch_states_insert AFTER INSERT ON batches BEGIN
        INSERT INTO batch_states (state, count) VALUES (NEW.state, 1)
            ON CONFLICT (state) DO UPDATE SET count = count + 1;
    END;
    CREATE TRIGGER batch_states_update AFTER UPDATE OF state ON batches WHEN OLD.state != NEW.state BEGIN
        UPDATE batch_states SET count = count - 1 WHERE state = OLD.state;
        INSERT INTO batch_states (state, count) VALUES (NEW.state, 1)
            ON CONFLICT (state) DO UPDATE SET count = count + 1;
    END;
    CREATE TRIGGER batch_states_delete AFTER DELETE ON batches BEGIN
        UPDATE batch_states SET count = count - 1 WHERE state = OLD.state;
    END;
    """,
    # v8: named leases with fencing tokens (store.LeaseStore). A row is never
    # deleted, only expired, so its token keeps growing across grants.
    """
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        token INTEGER NOT NULL,              -- of the latest grant
        expire_time INTEGER NOT NULL         -- microseconds since the epoch; 0 once released
    ) WITHOUT ROWID;
    """,
    # v9: a dispatcher claims a delivery before attempting it, so two sharing
    # the database never attempt it at once: claim counts the claims (the
    # fencing token of the latest), claimed_until ends the latest.
    """
    ALTER TABLE webhook_deliveries ADD COLUMN claim INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE webhook_deliveries ADD COLUMN claimed_until INTEGER NOT NULL DEFAULT 0;
    """,
)

# Requests with their results; status 0 (PENDING) and result NULL while unfinished.
_RESULT_ROWS = (
    "SELECT r.idx, r.key, r.metadata, COALESCE(x.status, 0), x.result FROM requests r "
    "LEFT JOIN results x ON x.batch_seq = r.batch_seq AND x.idx = r.idx"
)

# Connections of worker processes that read results, by database path.
_worker_connections: dict[str, sqlite3.Connection] = {}


def read_result_rows(path: str, batch_seq: int, lo: int, hi: int) -> list[RawResult]:
    """The rows of batch ``batch_seq`` with ``lo <= idx < hi``, in idx order,
    through a read-only connection kept for the process (WAL: it never waits
    for the server's writer)."""
    conn = _worker_connections.get(path)
    if conn is None:
        uri = Path(path).absolute().as_uri() + "?mode=ro"  # as_uri percent-encodes odd characters
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        _worker_connections[path] = conn
    return conn.execute(
        f"{_RESULT_ROWS} WHERE r.batch_seq = ? AND r.idx >= ? AND r.idx < ? ORDER BY r.idx", (batch_seq, lo, hi),
    ).fetchall()


# Write connections of worker processes that run requests, by database path.
_worker_writers: dict[str, sqlite3.Connection] = {}
_PENDING_IN_RANGE = (
    "SELECT r.idx, r.payload FROM requests r WHERE r.batch_seq = ? AND r.idx >= ? AND r.idx < ? AND NOT EXISTS "
    "(SELECT 1 FROM results x WHERE x.batch_seq = r.batch_seq AND x.idx = r.idx) ORDER BY r.idx"
)


def run_range(path: str, batch_id: str, batch_seq: int, lo: int, hi: int, answer: Answerer) -> RangeRun:
    """A ``RangeRunner`` (see store.py) for worker processes.

    The read runs outside the write transaction, so two runs of one range
    may answer the same requests; the first commit wins and counts, as with
    ``record_results``. Writers in other processes wait on SQLite's write
    lock (busy_timeout), and a closed batch takes nothing: the check runs
    inside the transaction, so a Cancel and this commit are ordered by it.
    """
    conn = _worker_writers.get(path)
    if conn is None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        _worker_writers[path] = conn
    rows = conn.execute(_PENDING_IN_RANGE, (batch_seq, lo, hi)).fetchall()
    if not rows:
        return RangeRun(True, None)
    try:
        answers = answer([r[1] for r in rows])
        fits = isinstance(answers, list) and len(answers) == len(rows) and all(type(a) is bytes for a in answers)
    except Exception:
        # The caller runs the range again its own way, which reports each
        # request's error; an exception sent back could fail to unpickle.
        fits = False
    if not fits:
        return RangeRun(False, None)
    record = functools.partial(
        SQLiteStore._record_tx, [(batch_id, ItemStatus.SUCCEEDED, [r[0] for r in rows], answers)])
    return RangeRun(True, _transaction(conn, record).get(batch_id))


_pending_item: Callable[[Sequence[object]], PendingItem] = functools.partial(tuple.__new__, PendingItem)
_STATUS = {int(s): s for s in ItemStatus}  # ItemStatus by value without an enum call per row
_STATES: dict[int, State] = {int(s): s for s in State if s is not State.UNSPECIFIED}
_COUNTED_STATES: tuple[State, ...] = tuple(_STATES.values())

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
_INSERT_CHUNK = 2000
_INSERT_REQUESTS = "INSERT INTO requests (batch_seq, idx, key, metadata, payload) VALUES {values}"
# The values are (idx offset, key, payload) rows; seq and the first idx come once per statement.
_APPEND_REQUESTS = ("INSERT INTO requests (batch_seq, idx, key, metadata, payload) "
                    "SELECT ?, ? + column1, column2, NULL, column3 FROM (VALUES {values})")
# The values are (idx, result) rows; seq and status come once per statement.
_RECORD_RESULTS = ("INSERT OR IGNORE INTO results (batch_seq, idx, status, result) "
                   "SELECT ?, column1, ?, column2 FROM (VALUES {values})")
_DONE_KEPT = 4096  # done batches kept in memory (a few hundred bytes each)
_VALUES_MAX = 512  # rows per multi-row statement; 5 columns stay far below SQLite's 32766 variables
_PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",  # durable across process crashes in WAL mode
    "PRAGMA busy_timeout = 10000",
    "PRAGMA foreign_keys = ON",
    "PRAGMA cache_size = -16000",
)

T = TypeVar("T")


@functools.cache
def _values_sql(template: str, width: int, rows: int) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return template.format(values=", ".join([row] * rows))


def _execute_rows(conn: sqlite3.Connection, template: str, rows: Sequence[tuple[object, ...]]) -> int:
    """Run ``template`` over ``rows`` with its ``{values}`` replaced by a
    multi-row VALUES list; the number of rows changed."""
    if not rows:
        return 0
    return _execute_flat(conn, template, (), [x for r in rows for x in r], len(rows[0]))


def _execute_flat(conn: sqlite3.Connection, template: str, head: Sequence[object], flat: Sequence[object],
                  width: int) -> int:
    """Run ``template`` with its ``{values}`` replaced by a multi-row VALUES
    list over ``flat``, rows of ``width`` values back to back, each statement
    taking the ``head`` parameters first; the number of rows changed.

    Not executemany: the sqlite3 module releases the GIL around every step,
    and each time this thread takes it back from a busy event loop it may
    wait a whole switch interval (5 ms), so a statement per row cost
    seconds per commit under load. Rows go in slices of _VALUES_MAX, the
    rest in powers of two, so few distinct statements get prepared.
    """
    before = conn.total_changes
    start, n = 0, len(flat) // width
    head = list(head)
    while start < n:
        left = n - start
        size = _VALUES_MAX if left >= _VALUES_MAX else 1 << (left.bit_length() - 1)
        conn.execute(_values_sql(template, width, size), [*head, *flat[start * width:(start + size) * width]])
        start += size
    return conn.total_changes - before


def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    # BEGIN IMMEDIATE takes the write lock up front instead of failing on
    # the upgrade from a read lock halfway through.
    try:
        conn.execute("BEGIN IMMEDIATE")
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        # Not in a transaction when BEGIN itself failed, or when SQLite
        # already rolled back on its own (disk full, I/O error).
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


# Enum calls cost a microsecond each; rows are decoded on every GetOperation.
_STATES = {int(s): s for s in State}
_KINDS = {k.value: k for k in BatchKind}


def _batch(row: sqlite3.Row | tuple[Any, ...]) -> Batch:
    # Positional, in _BATCH_COLUMNS order: keywords cost a microsecond more,
    # and this runs on every GetOperation.
    return Batch(
        row[0], row[1], row[2], _KINDS[row[3]], row[4], row[5], row[6], _STATES[row[7]], bool(row[8]), row[9],
        row[10], row[11], row[12], row[13], row[14], row[15], row[16], row[17], row[18], row[19], row[20],
        bool(row[21]), None if row[22] is None else _STATES[row[22]],
    )


def _file(row: sqlite3.Row | tuple[Any, ...]) -> StoredFile:
    return StoredFile(
        id=row[0], seq=row[1], tenant=row[2], display_name=row[3], mime_type=row[4], size_bytes=row[5],
        sha256=row[6], create_time_us=row[7], expire_time_us=row[8], source=row[9],
    )


# A tenant's unfinished batches and their pending requests. INDEXED BY the
# partial index of batches not done: the tenant's index would walk its whole
# history (done batches stay for the retention period). A batch whose input
# is still being read counts the requests read so far as its highest idx + 1,
# a seek on the requests' primary key rather than a count of its rows; a
# closed one counts none (its unfinished requests have their outcome).
_BATCH_USE = (
    "SELECT COUNT(*), COALESCE(SUM(CASE WHEN b.ingested "
    "THEN b.request_count - b.succeeded - b.failed - b.cancelled - b.expired "
    "WHEN b.final_state IS NULL THEN COALESCE("
    "(SELECT r.idx + 1 FROM requests r WHERE r.batch_seq = b.seq ORDER BY r.idx DESC LIMIT 1), 0) "
    "ELSE 0 END), 0) FROM batches b INDEXED BY batches_not_done WHERE b.done = 0 AND b.tenant = ?"
)
# A tenant's files, uploaded and generated: at most its max_files rows.
_FILE_USE = "SELECT COALESCE(SUM(size_bytes), 0), COUNT(*) FROM files WHERE tenant = ?"


def _check(quota: str, used: int, adding: int, limit: int | None) -> None:
    """Raise OverQuota when ``used + adding`` goes over ``limit`` (None: no limit)."""
    if limit is not None and used + adding > limit:
        raise OverQuota(quota, used, limit, adding)


# Leases (store.LeaseStore); times are this process's now_us(), taken on the
# writer thread when the transaction runs, not when it was queued.
# The upsert grants a free or expired name with the next token, and leaves a
# live lease alone (no row returned).
_ACQUIRE_LEASE = (
    "INSERT INTO leases (name, owner, token, expire_time) VALUES (?1, ?2, 1, ?3 + ?4) "
    "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, token = token + 1, "
    "expire_time = excluded.expire_time WHERE expire_time <= ?3 RETURNING token"
)
_RENEW_LEASE = ("UPDATE leases SET expire_time = ?5 + ?4 WHERE name = ?1 AND owner = ?2 AND token = ?3 "
                "AND expire_time > ?5")
_RELEASE_LEASE = "UPDATE leases SET expire_time = 0 WHERE name = ? AND owner = ? AND token = ?"
_LIVE_LEASE = "SELECT 1 FROM leases WHERE name = ? AND owner = ? AND token = ? AND expire_time > ?"


def _fence(conn: sqlite3.Connection, lease: Lease | None) -> None:
    """The check of a fenced write (see store.LeaseStore), first in its
    transaction: the single writer keeps any grant out until it commits."""
    if lease is not None and conn.execute(
            _LIVE_LEASE, (lease.name, lease.owner, lease.token, now_us())).fetchone() is None:
        raise LeaseLost(lease)


# The store's clock, under a name that parameters called now_us do not hide.
_clock = now_us
_DELIVERY_COLUMNS = "id, batch_id, uri, body, attempts, next_attempt_time, claim"
# Due deliveries no live claim holds, claimed in one statement (the writer
# is single, so no two claims interleave). ?1 is the caller's due time, ?2
# the store's clock (the same clock here), ?4 the claim's length.
_CLAIM_DELIVERIES = (
    "UPDATE webhook_deliveries SET claim = claim + 1, claimed_until = ?2 + ?4 WHERE id IN "
    "(SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_time <= ?1 "
    "AND claimed_until <= ?2 ORDER BY next_attempt_time LIMIT ?3) "
    f"RETURNING {_DELIVERY_COLUMNS}"
)


def _delivery(row: sqlite3.Row | tuple[Any, ...]) -> WebhookDelivery:
    return WebhookDelivery(id=row[0], batch_id=row[1], uri=row[2], body=bytes(row[3]), attempts=row[4],
                           next_attempt_us=row[5], claim=row[6])


# By batch id, on the (batch_id, uri) unique index.
_DELETE_DELIVERIES = "DELETE FROM webhook_deliveries WHERE batch_id = ?"

# Domain field -> batches column, for filters. Only names listed here are ever
# interpolated into SQL; values always travel as parameters.
BATCH_FILTER_COLUMNS: dict[str, str] = {
    name: name for name in ("state", "done", "model", "display_name", "create_time", "priority", "request_id")
}
# Tree values are never NULL, so '=' is plain '=' (same rows as IS, and the
# planner can then use partial indexes such as batches_request_id), while '!='
# is IS NOT so that rows whose column is NULL still count as different.
_SQL_OPS = {"=": "=", "!=": "IS NOT", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def render_filter(expr: Expr, columns: dict[str, str] = BATCH_FILTER_COLUMNS) -> tuple[str, list[object]]:
    """Render a compiled filter as an SQLite boolean expression.

    Args:
        expr: The tree from ``filters.compile_filter`` (or built by hand).
        columns: Field names mapped to the columns they compare.

    Returns:
        ``(sql, params)``: a parenthesised expression using only ``?``
        placeholders (``"1"`` for the empty ``And``), and its values in order.

    Raises:
        KeyError: The tree names a field that ``columns`` lacks (a bug, not
            client input: the compiler only emits fields from its table).
    """
    params: list[object] = []
    return _render(expr, columns, params), params


def _render(expr: Expr, columns: dict[str, str], params: list[object]) -> str:
    # Recursion depth follows the tree's, which the compiler caps (MAX_DEPTH);
    # long AND/OR chains are one flat node each.
    if isinstance(expr, Compare):
        value = expr.value
        # bool before int: SQLite stores booleans as 0/1 integers.
        params.append(int(value) if isinstance(value, bool) else value)
        return f"({columns[expr.field]} {_SQL_OPS[expr.op]} ?)"
    if isinstance(expr, Match):
        # LIKE is ASCII case-insensitive, which is what Match promises.
        params.append("%".join(_like_escape(part) for part in expr.parts))
        return f"({columns[expr.field]} LIKE ? ESCAPE '\\')"
    if isinstance(expr, Not):
        return f"(NOT {_render(expr.term, columns, params)})"
    if not expr.terms:
        return "1"  # only And can be empty: true
    joiner = " AND " if isinstance(expr, And) else " OR "
    if len(expr.terms) == 1:
        return _render(expr.terms[0], columns, params)
    return "(" + joiner.join([_render(term, columns, params) for term in expr.terms]) + ")"


class SQLiteStore:
    """The Store over one SQLite database file in WAL mode."""

    def __init__(self, path: Path) -> None:
        self._path = path
        # The writer connection is touched only on the _wpool thread.
        self._wconn: sqlite3.Connection | None = None
        self._wpool: ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._quick: sqlite3.Connection | None = None
        # Done batches by id. A done batch changes only through this store
        # (rename, delete, purge: each drops it here once committed), so
        # polling one costs no query. Worker processes never touch it.
        self._done: OrderedDict[str, Batch] = OrderedDict()

    async def open(self) -> None:
        """Connect, set pragmas and run pending migrations."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        pool = self._wpool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="longbatch-writer")
        try:
            self._wconn = await asyncio.wrap_future(pool.submit(self._open_writer))
            await asyncio.wrap_future(pool.submit(self._migrate, self._wconn))
            self._reader = await aiosqlite.connect(self._path, isolation_level=None)
            for pragma in (*_PRAGMAS, "PRAGMA query_only = ON"):
                await self._reader.execute(pragma)
            # Point reads run on the event loop's thread: in WAL mode a reader
            # never waits for the writer, and a ~10 µs query beats a ~100 µs
            # hop to another thread on the GetOperation path.
            self._quick = sqlite3.connect(self._path, isolation_level=None)
            self._quick.execute("PRAGMA query_only = ON")
            self._quick.execute("PRAGMA busy_timeout = 1000")
        except BaseException:
            await self.close()  # a schema too new must not leave the writer thread behind
            raise

    def _open_writer(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in
        # _transaction), never opened behind our back by the sqlite3 module.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        row = conn.execute("PRAGMA user_version").fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise RuntimeError(f"database schema v{version} is newer than this server (v{len(MIGRATIONS)})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            try:
                conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        """Close the connections; safe to call twice."""
        if self._quick is not None:
            self._quick.close()
            self._quick = None
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()
        conn, pool = self._wconn, self._wpool
        self._wconn = self._wpool = None
        if pool is not None:
            try:
                if conn is not None:
                    # Queued behind every write already submitted (FIFO), so
                    # those commit before the connection goes.
                    await asyncio.wrap_future(pool.submit(conn.close))
            finally:
                pool.shutdown(wait=True)

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn inside BEGIN IMMEDIATE … COMMIT on the writer thread: one hop per transaction."""
        conn, pool = self._wconn, self._wpool
        if conn is None or pool is None:
            raise RuntimeError("store is not open")
        # Submitted before this coroutine first suspends, so transactions run
        # in the order their callers reached this line. Once submitted, a job
        # runs to its end even if the awaiting task is cancelled (expiry or
        # cancel stopping an ingest): the shield keeps wrap_future from
        # cancelling a job still queued, and a job already running cannot be
        # stopped anyway. Either way the transaction commits or rolls back as
        # a whole; nothing may count on a cancel aborting a write.
        return await asyncio.shield(asyncio.wrap_future(pool.submit(_transaction, conn, fn)))

    def _quick_one(self, sql: str, params: Sequence[object]) -> Any:
        if self._quick is None:
            raise RuntimeError("store is not open")
        return self._quick.execute(sql, params).fetchone()

    def _quick_all(self, sql: str, params: Sequence[object]) -> list[Any]:
        if self._quick is None:
            raise RuntimeError("store is not open")
        return self._quick.execute(sql, params).fetchall()

    # Each read is one job on aiosqlite's thread (execute and fetch all),
    # never a cursor held across awaits: a read transaction belongs to the
    # connection, so a statement started while another coroutine's cursor
    # was still open would share that cursor's older snapshot and miss
    # commits made since (a batch created a moment ago read as having no
    # requests, and never ran).
    async def _one(self, sql: str, params: Sequence[object]) -> Any:
        rows = await self._r.execute_fetchall(sql, params)
        return next(iter(rows), None)

    async def _all(self, sql: str, params: Sequence[object]) -> Iterable[Any]:
        return await self._r.execute_fetchall(sql, params)

    # -- meta ---------------------------------------------------------------

    async def secret(self, name: str, size: int = 32) -> bytes:
        """A random secret stored under ``name``, made on first use."""
        value = secrets.token_bytes(size)

        def tx(conn: sqlite3.Connection) -> Any:
            conn.execute("INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)", (name, value))
            return conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()

        row = await self._write(tx)
        assert row is not None
        return bytes(row[0])

    # -- batches ------------------------------------------------------------

    async def create_batch(
        self, batch: NewBatch, items: Iterable[NewItem], request_id_ttl_us: int, limits: UsageLimits | None = None
    ) -> tuple[Batch, bool]:
        """Insert a batch and its requests in one transaction, within
        ``limits`` (see Store)."""
        now = now_us()

        def tx(conn: sqlite3.Connection) -> tuple[Batch, bool]:
            if batch.request_id:
                row = conn.execute(
                    f"SELECT {_BATCH_COLUMNS} FROM batches WHERE tenant = ? AND request_id = ?",
                    (batch.tenant, batch.request_id),
                ).fetchone()
                if row is not None:
                    earlier = _batch(row)
                    if earlier.create_time_us > now - request_id_ttl_us:
                        return earlier, False
                    conn.execute("UPDATE batches SET request_id = NULL WHERE seq = ?", (earlier.seq,))
            # Counted in this transaction, before this batch exists: the one
            # writer thread runs transactions one at a time, so concurrent
            # creates cannot both see the last free place.
            unfinished = pending = 0
            if limits is not None:
                unfinished, pending = conn.execute(_BATCH_USE, (batch.tenant,)).fetchone()
                _check("unfinished_batches", unfinished, 1, limits.unfinished_batches)
            cur = conn.execute(
                "INSERT INTO batches (id, tenant, kind, model, display_name, priority, state, create_time, "
                "update_time, input_file, webhook, request_id, ingested) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (batch.id, batch.tenant, batch.kind.value, batch.model, batch.display_name, batch.priority,
                 int(State.PENDING), now, now, batch.input_file, batch.webhook, batch.request_id or None,
                 int(batch.input_file is None)),
            )
            seq = cur.lastrowid
            count = 0
            chunk: list[tuple[object, ...]] = []
            for item in items:
                chunk.append((seq, item.idx, item.key, item.metadata, item.payload))
                if len(chunk) >= _INSERT_CHUNK:
                    count += _execute_rows(conn, _INSERT_REQUESTS, chunk)
                    chunk.clear()
            count += _execute_rows(conn, _INSERT_REQUESTS, chunk)
            if limits is not None:
                # Raising rolls the rows back. A file batch has no requests
                # yet (they are counted as its input is read) but needs room
                # for one.
                _check("pending_requests", pending, max(count, 1), limits.pending_requests)
            conn.execute("UPDATE batches SET request_count = ? WHERE seq = ?", (count, seq))
            row = conn.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE seq = ?", (seq,)).fetchone()
            assert row is not None
            return _batch(row), True

        return await self._write(tx)

    async def get_batch(self, tenant: str | None, batch_id: str) -> Batch | None:
        """The batch, scoped to ``tenant`` unless it is None."""
        batch = self._done.get(batch_id)
        if batch is not None:
            self._done.move_to_end(batch_id)
        else:
            # Read and kept with no await in between: a change committed
            # meanwhile is dropped from _done only after this returns.
            row = self._quick_one(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,))
            if row is None:
                return None
            batch = _batch(row)
            if batch.done:
                self._done[batch_id] = batch
                if len(self._done) > _DONE_KEPT:
                    self._done.popitem(last=False)
        return None if tenant is not None and batch.tenant != tenant else batch

    async def list_batches(self, tenant: str, where: Expr, before_seq: int | None, limit: int) -> list[Batch]:
        """Newest first, keyset-paged on seq (see Store)."""
        sql, params = render_filter(where)
        rows = self._quick_all(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE tenant = ? AND seq < ? AND ({sql}) "
            "ORDER BY seq DESC LIMIT ?",
            (tenant, before_seq if before_seq is not None else 2**62, *params, limit),
        )
        return [_batch(r) for r in rows]

    async def update_batch(
        self, tenant: str, batch_id: str, *, display_name: str | None, priority: int | None
    ) -> Batch | None:
        """Apply the given changes (see Store)."""

        def tx(conn: sqlite3.Connection) -> Any:
            if display_name is not None:
                conn.execute(
                    "UPDATE batches SET display_name = ?, update_time = ? WHERE id = ? AND tenant = ?",
                    (display_name, now_us(), batch_id, tenant),
                )
            if priority is not None:
                conn.execute(
                    "UPDATE batches SET priority = ?, update_time = ? WHERE id = ? AND tenant = ? AND done = 0",
                    (priority, now_us(), batch_id, tenant),
                )
            return conn.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ? AND tenant = ?", (batch_id, tenant)
            ).fetchone()

        row = await self._write(tx)
        self._done.pop(batch_id, None)
        return _batch(row) if row else None

    async def delete_batch(self, tenant: str, batch_id: str) -> list[str] | None:
        """Delete a done batch and its requests (see Store)."""

        def tx(conn: sqlite3.Connection) -> list[str] | None:
            row = conn.execute(
                "SELECT seq, done, output_file FROM batches WHERE id = ? AND tenant = ?", (batch_id, tenant)
            ).fetchone()
            if row is None:
                return None
            seq, done, output_file = row
            if not done:
                raise StoreConflict("batch is not done")
            conn.execute("DELETE FROM requests WHERE batch_seq = ?", (seq,))
            conn.execute("DELETE FROM results WHERE batch_seq = ?", (seq,))
            conn.execute("DELETE FROM batches WHERE seq = ?", (seq,))
            conn.execute(_DELETE_DELIVERIES, (batch_id,))
            if output_file:
                conn.execute("DELETE FROM files WHERE id = ?", (output_file,))
            return [output_file] if output_file else []

        try:
            return await self._write(tx)
        finally:
            self._done.pop(batch_id, None)

    async def append_requests(self, batch_id: str, first_idx: int, flat: Sequence[int | str | bytes],
                              max_pending: int | None = None) -> None:
        """Add requests read from a batch's input file, in one transaction,
        within ``max_pending`` (see Store)."""

        def tx(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT seq, tenant FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                return
            if max_pending is not None:
                # Counts this batch's requests read so far too: every batch
                # fed the same file counts its own copy.
                _check("pending_requests", conn.execute(_BATCH_USE, (row[1],)).fetchone()[1], len(flat) // 3,
                       max_pending)
            _execute_flat(conn, _APPEND_REQUESTS, (row[0], first_idx), flat, 3)

        await self._write(tx)

    async def finish_ingest(self, batch_id: str, request_count: int) -> Batch | None:
        """Mark a batch's requests complete; it may run from now on."""

        def tx(conn: sqlite3.Connection) -> Any:
            conn.execute(
                "UPDATE batches SET ingested = 1, request_count = ?, update_time = ? WHERE id = ? AND done = 0",
                (request_count, now_us(), batch_id),
            )
            return conn.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,)).fetchone()

        row = await self._write(tx)
        return _batch(row) if row else None

    async def reset_ingest(self, batch_id: str) -> None:
        """Drop the requests of a batch whose ingest did not complete."""

        def tx(conn: sqlite3.Connection) -> None:
            for table in ("requests", "results"):
                conn.execute(
                    f"DELETE FROM {table} WHERE batch_seq = (SELECT seq FROM batches WHERE id = ? AND ingested = 0)",
                    (batch_id,),
                )

        await self._write(tx)

    def count_batches_by_state(self) -> dict[State, int]:
        """Batches by state, every state but UNSPECIFIED (0 included): a
        read of the seven counts the schema's triggers keep, ~10 µs on the
        loop's thread however many batches there are."""
        counts: dict[State, int] = dict.fromkeys(_COUNTED_STATES, 0)
        for state, count in self._quick_all("SELECT state, count FROM batch_states", ()):
            if state in _STATES:
                counts[_STATES[state]] = int(count)
        return counts

    async def unfinished_batches(self) -> list[Batch]:
        """Batches not done, oldest first."""
        rows = await self._all(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE done = 0 ORDER BY seq", ())
        return [_batch(r) for r in rows]

    async def mark_running(self, batch_id: str) -> None:
        """PENDING → RUNNING."""

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE batches SET state = ?, update_time = ? WHERE id = ? AND state = ?",
                (int(State.RUNNING), now_us(), batch_id, int(State.PENDING)),
            )

        await self._write(tx)

    async def pending_items(self, batch_id: str, from_idx: int, limit: int) -> list[PendingItem]:
        """Next PENDING requests by idx."""
        rows = await self._all(
            "SELECT r.idx, r.payload FROM requests r JOIN batches b ON b.seq = r.batch_seq "
            "WHERE b.id = ? AND r.idx >= ? AND NOT EXISTS "
            "(SELECT 1 FROM results x WHERE x.batch_seq = r.batch_seq AND x.idx = r.idx) ORDER BY r.idx LIMIT ?",
            (batch_id, from_idx, limit),
        )
        # tuple.__new__ makes the NamedTuple from the row at half the cost of
        # its generated __new__; millions of requests pass through here.
        return list(map(_pending_item, rows))

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> dict[str, Batch]:
        """Persist results and counters in one transaction (see Store)."""
        if not outcomes:
            return {}
        groups: dict[tuple[str, ItemStatus], tuple[list[int], list[bytes]]] = {}
        for o in outcomes:
            idxs, results = groups.setdefault((o.batch_id, o.status), ([], []))
            idxs.append(o.idx)
            results.append(o.result)
        columns = [(batch_id, status, idxs, results) for (batch_id, status), (idxs, results) in groups.items()]
        return await self._write(functools.partial(self._record_tx, columns))

    async def record_results(self, batch_id: str, status: ItemStatus, idxs: Sequence[int],
                             results: Sequence[bytes]) -> Batch | None:
        """record_outcomes for one batch and one status, in columns (see Store)."""
        touched = await self._write(functools.partial(self._record_tx, [(batch_id, status, idxs, results)]))
        return touched.get(batch_id)

    @staticmethod
    def _record_tx(groups: Sequence[tuple[str, ItemStatus, Sequence[int], Sequence[bytes]]],
                   conn: sqlite3.Connection) -> dict[str, Batch]:
        counts: dict[str, tuple[int, Counter[ItemStatus]]] = {}
        for batch_id, status, idxs, results in groups:
            if batch_id not in counts:
                row = conn.execute(
                    "SELECT seq FROM batches WHERE id = ? AND final_state IS NULL AND done = 0", (batch_id,)
                ).fetchone()
                if row is None:
                    continue  # a closed batch takes no more results
                counts[batch_id] = (row[0], Counter())
            seq, changed = counts[batch_id]
            # Only requests still PENDING take a result (the first one wins);
            # count what changed so a result delivered twice never counts twice.
            flat = list(itertools.chain.from_iterable(zip(idxs, results, strict=True)))
            changed[status] += _execute_flat(conn, _RECORD_RESULTS, (seq, int(status)), flat, 2)
        now = now_us()
        touched: dict[str, Batch] = {}
        for batch_id, (seq, changed) in counts.items():
            sets = ", ".join(f"{_OUTCOME_COLUMN[s]} = {_OUTCOME_COLUMN[s]} + {n}" for s, n in changed.items() if n)
            if sets:
                conn.execute(f"UPDATE batches SET {sets}, update_time = ? WHERE seq = ?", (now, seq))
            updated = conn.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE seq = ?", (seq,)).fetchone()
            if updated is not None:
                touched[batch_id] = _batch(updated)
        return touched

    async def close_batch(self, batch_id: str, state: State, error: bytes | None, rest: ItemStatus) -> Batch | None:
        """Set the terminal state; unfinished requests now count as ``rest``.

        Their rows are left as they are (reading a closed batch maps PENDING
        rows to ``rest``), so closing a batch of a million costs one update.
        """
        column = _OUTCOME_COLUMN[rest]

        def tx(conn: sqlite3.Connection) -> Any:
            conn.execute(
                f"UPDATE batches SET final_state = ?, error = ?, {column} = request_count - succeeded - failed, "
                "update_time = ? WHERE id = ? AND final_state IS NULL AND done = 0",
                (int(state), error, now_us(), batch_id),
            )
            return conn.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,)).fetchone()

        updated = await self._write(tx)
        return _batch(updated) if updated else None

    async def mark_done(self, batch_id: str, output_file: str | None) -> Batch | None:
        """Set done, end_time and the output file (see Store)."""
        now = now_us()

        def tx(conn: sqlite3.Connection) -> Any:
            conn.execute(
                "UPDATE batches SET done = 1, state = COALESCE(final_state, state), end_time = ?, update_time = ?, "
                "output_file = ? WHERE id = ? AND done = 0",
                (now, now, output_file, batch_id),
            )
            return conn.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,)).fetchone()

        row = await self._write(tx)
        return _batch(row) if row else None

    async def results(self, batch_id: str, start_idx: int, limit: int, *, to_first_pending: bool = True
                      ) -> list[ResultRow]:
        """Requests from ``start_idx`` in order, up to the first PENDING one
        unless ``to_first_pending`` is False (then PENDING rows come too)."""
        rows = await self._all(
            f"{_RESULT_ROWS} JOIN batches b ON b.seq = r.batch_seq WHERE b.id = ? AND r.idx >= ? "
            "ORDER BY r.idx LIMIT ?",
            (batch_id, start_idx, limit),
        )
        out = []
        for r in rows:
            if r[3] == ItemStatus.PENDING and to_first_pending:
                break
            out.append(ResultRow(r[0], r[1], r[2], _STATUS[r[3]], r[4] or b""))
        return out

    def result_reader(self, batch: Batch) -> ResultReader:
        """See Store: rows of ``batch`` read by ``read_result_rows``."""
        return functools.partial(read_result_rows, str(self._path), batch.seq)

    def range_runner(self, batch: Batch) -> RangeRunner:
        """See Store: ranges of ``batch`` run by ``run_range``."""
        return functools.partial(run_range, str(self._path), batch.id, batch.seq)

    async def finished_count(self, batch: Batch, lo: int, hi: int) -> int:
        """See Store: a range scan of the results key."""
        row = await self._one(
            "SELECT COUNT(*) FROM results WHERE batch_seq = ? AND idx >= ? AND idx < ?", (batch.seq, lo, hi))
        return int(row[0]) if row else 0

    async def output_size(self, batch_id: str) -> int:
        """Total bytes of results and metadata."""
        row = await self._one(
            # An unfinished request of a closed batch reads as a ~64-byte status.
            "SELECT COALESCE(SUM(COALESCE(LENGTH(x.result), 64)), 0) + COALESCE(SUM(LENGTH(r.metadata)), 0) "
            "+ COUNT(*) * 16 "
            "FROM requests r JOIN batches b ON b.seq = r.batch_seq "
            "LEFT JOIN results x ON x.batch_seq = r.batch_seq AND x.idx = r.idx WHERE b.id = ?",
            (batch_id,),
        )
        return int(row[0]) if row else 0

    async def expired_batches(self, created_before_us: int) -> list[str]:
        """Not-done batches created before the cutoff."""
        rows = await self._all(
            "SELECT id FROM batches WHERE done = 0 AND create_time < ?", (created_before_us,)
        )
        return [r[0] for r in rows]

    async def purge_done_batches(self, ended_before_us: int, max_batches: int, max_requests: int, *,
                                 lease: Lease | None = None) -> Purged:
        """Delete old done batches in one bounded transaction, fenced by
        ``lease`` when given (see Store)."""

        def tx(conn: sqlite3.Connection) -> Purged:
            _fence(conn, lease)
            batch_ids: list[str] = []
            file_ids: list[str] = []
            budget = max_requests
            rows = conn.execute(
                "SELECT seq, id, output_file FROM batches WHERE done = 1 AND end_time < ? ORDER BY end_time LIMIT ?",
                (ended_before_us, max_batches),
            ).fetchall()
            more = len(rows) == max_batches
            for seq, batch_id, output_file in rows:
                # The idx before the last `budget` requests: None when the
                # rest of the batch fits in this step.
                cut = conn.execute(
                    "SELECT idx FROM requests WHERE batch_seq = ? ORDER BY idx DESC LIMIT 1 OFFSET ?", (seq, budget)
                ).fetchone()
                if cut is not None:
                    more = True
                    if not batch_ids:
                        # Too big for one step: its last requests go now and
                        # the row stays until the final step, so a reader
                        # sees a shorter tail, never a gap, and its seq cannot
                        # be reused (requests are keyed by it) meanwhile.
                        conn.execute("DELETE FROM requests WHERE batch_seq = ? AND idx > ?", (seq, cut[0]))
                        conn.execute("DELETE FROM results WHERE batch_seq = ? AND idx > ?", (seq, cut[0]))
                    break
                budget -= conn.execute("DELETE FROM requests WHERE batch_seq = ?", (seq,)).rowcount
                conn.execute("DELETE FROM results WHERE batch_seq = ?", (seq,))
                conn.execute("DELETE FROM batches WHERE seq = ?", (seq,))
                conn.execute(_DELETE_DELIVERIES, (batch_id,))
                if output_file:
                    # Only generated files are outputs; inputs follow file_ttl.
                    gone = conn.execute("DELETE FROM files WHERE id = ? AND source = 'generated'", (output_file,))
                    if gone.rowcount > 0:
                        file_ids.append(output_file)
                batch_ids.append(batch_id)
            return Purged(batch_ids, file_ids, more)

        purged = await self._write(tx)
        for batch_id in purged.batch_ids:
            self._done.pop(batch_id, None)
        return purged

    # -- files --------------------------------------------------------------

    async def add_file(self, file: StoredFile, limits: UsageLimits | None = None) -> None:
        """Insert a file row (its seq is assigned here), within ``limits`` (see Store)."""

        def tx(conn: sqlite3.Connection) -> None:
            if limits is not None:
                stored, count = conn.execute(_FILE_USE, (file.tenant,)).fetchone()
                _check("files", count, 1, limits.files)
                _check("stored_bytes", stored, file.size_bytes, limits.stored_bytes)
            conn.execute(
                "INSERT INTO files (id, tenant, display_name, mime_type, size_bytes, sha256, create_time, "
                "expire_time, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (file.id, file.tenant, file.display_name, file.mime_type, file.size_bytes, file.sha256,
                 file.create_time_us, file.expire_time_us, file.source),
            )

        await self._write(tx)

    async def usage(self, tenant: str) -> TenantUsage:
        """What ``tenant`` holds (see Store), read on the aiosqlite thread:
        both scans are bounded by the tenant's quotas, not its history."""
        files = await self._one(_FILE_USE, (tenant,))
        batches = await self._one(_BATCH_USE, (tenant,))
        return TenantUsage(int(files[0]), int(files[1]), int(batches[0]), int(batches[1]))

    async def get_file(self, tenant: str | None, file_id: str) -> StoredFile | None:
        """The file, scoped to ``tenant`` unless it is None."""
        row = self._quick_one(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ?", (file_id,))
        if row is None or (tenant is not None and row[2] != tenant):
            return None
        return _file(row)

    async def list_files(self, tenant: str, before_seq: int | None, limit: int) -> list[StoredFile]:
        """Newest first, keyset-paged on seq."""
        rows = self._quick_all(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE tenant = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (tenant, before_seq if before_seq is not None else 2**62, limit),
        )
        return [_file(r) for r in rows]

    async def delete_file(self, tenant: str, file_id: str, *, lease: Lease | None = None) -> bool:
        """Delete a file row unless a batch that is not done reads it, fenced
        by ``lease`` when given."""

        def tx(conn: sqlite3.Connection) -> bool:
            _fence(conn, lease)
            if conn.execute(
                "SELECT 1 FROM batches WHERE input_file = ? AND done = 0 LIMIT 1", (file_id,)
            ).fetchone() is not None:
                raise StoreConflict("a batch that is not done reads this file")
            return conn.execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).rowcount > 0

        return await self._write(tx)

    async def expired_files(self, now_us: int, limit: int = 1000) -> list[StoredFile]:
        """Expired files that no unfinished batch reads (see Store)."""
        # Generated files have no expire_time: they go with their batch.
        rows = await self._all(
            f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.expire_time IS NOT NULL AND f.expire_time <= ? "
            "AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.input_file = f.id AND b.done = 0) "
            "ORDER BY f.seq LIMIT ?",
            (now_us, limit),
        )
        return [_file(r) for r in rows]

    # -- webhook deliveries -------------------------------------------------
    # A batch's deliveries go with it (delete_batch, purge_done_batches),
    # pending ones too: their bodies hold its user_metadata, up to
    # MAX_WEBHOOKS copies, and a notification about a deleted batch has
    # nothing left to point at. (Schema v3's comment predates this.)

    async def add_webhook_deliveries(self, deliveries: Sequence[WebhookDelivery]) -> int:
        """Insert PENDING deliveries, ignoring (batch, uri) pairs already stored."""
        if not deliveries:
            return 0
        now = now_us()
        rows = [(d.id, d.batch_id, d.uri, d.body, DeliveryStatus.PENDING.value, d.attempts, d.next_attempt_us,
                 now, now) for d in deliveries]

        def tx(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            # Only while the batch exists: enqueueing runs in the background
            # after the batch is done, so a delete or purge may come first,
            # and rows stored after it would never be deleted.
            conn.executemany(
                "INSERT OR IGNORE INTO webhook_deliveries (id, batch_id, uri, body, status, attempts, "
                "next_attempt_time, create_time, update_time) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM batches WHERE id = ?)",
                [(*row, row[1]) for row in rows],
            )
            return conn.total_changes - before

        return await self._write(tx)

    async def delete_orphan_webhook_deliveries(self, limit: int) -> int:
        """Delete up to ``limit`` deliveries whose batch is gone (see Store)."""
        # Found on the reader, so the writer is held only when there is
        # something to delete (usually never: see add_webhook_deliveries).
        ids = [r[0] for r in await self._all(
            "SELECT d.id FROM webhook_deliveries d WHERE NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = d.batch_id) "
            "LIMIT ?", (limit,))]
        if not ids:
            return 0

        def tx(conn: sqlite3.Connection) -> int:
            # Checked again here: a batch cannot come back, but the rows may
            # have gone since the read.
            return conn.executemany(
                "DELETE FROM webhook_deliveries WHERE id = ? "
                "AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = webhook_deliveries.batch_id)",
                [(i,) for i in ids],
            ).rowcount

        return await self._write(tx)

    async def batches_missing_webhooks(self) -> list[Batch]:
        """Done batches with a webhook config and no delivery rows."""
        rows = await self._all(
            f"SELECT {_BATCH_COLUMNS} FROM batches b WHERE b.done = 1 AND LENGTH(b.webhook) > 0 "
            "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.batch_id = b.id) ORDER BY b.seq",
            (),
        )
        return [_batch(r) for r in rows]

    async def due_webhook_deliveries(self, now_us: int, limit: int) -> list[WebhookDelivery]:
        """PENDING deliveries due at ``now_us``, earliest first."""
        rows = await self._all(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries "
            "WHERE status = 'pending' AND next_attempt_time <= ? ORDER BY next_attempt_time LIMIT ?",
            (now_us, limit),
        )
        return [_delivery(r) for r in rows]

    async def claim_webhook_deliveries(self, now_us: int, limit: int, claim_s: float) -> list[WebhookDelivery]:
        """Claim due deliveries no live claim holds (see DeliveryStore)."""

        def tx(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(_CLAIM_DELIVERIES, (now_us, _clock(), limit, int(claim_s * 1_000_000))).fetchall()

        rows = await self._write(tx)
        # RETURNING comes in no particular order.
        return sorted((_delivery(r) for r in rows), key=lambda d: (d.next_attempt_us, d.id))

    async def next_webhook_time(self, after_us: int) -> int | None:
        """Earliest time after ``after_us`` a PENDING delivery comes due
        (a claimed one when its claim ends)."""
        row = await self._one(
            "SELECT MIN(MAX(next_attempt_time, claimed_until)) FROM webhook_deliveries WHERE status = 'pending' "
            "AND MAX(next_attempt_time, claimed_until) > ?",
            (after_us,),
        )
        return int(row[0]) if row and row[0] is not None else None

    async def record_webhook_attempt(
        self, delivery_id: str, attempts: int, status: DeliveryStatus, next_attempt_us: int, error: str | None,
        *, claim: int | None = None,
    ) -> bool:
        """Store an attempt's outcome and end its claim (see DeliveryStore)."""

        def tx(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "UPDATE webhook_deliveries SET attempts = ?, status = ?, next_attempt_time = ?, last_error = ?, "
                "update_time = ?, claimed_until = 0 WHERE id = ? AND (? IS NULL OR claim = ?)",
                (attempts, status.value, next_attempt_us, error, now_us(), delivery_id, claim, claim),
            ).rowcount > 0

        return await self._write(tx)

    # -- leases ---------------------------------------------------------------

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> Lease | None:
        """Grant ``name`` if it is free or expired (see LeaseStore)."""

        def tx(conn: sqlite3.Connection) -> Any:
            return conn.execute(_ACQUIRE_LEASE, (name, owner, now_us(), int(ttl_s * 1_000_000))).fetchone()

        row = await self._write(tx)
        return None if row is None else Lease(name, owner, int(row[0]))

    async def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        """Extend a live lease (see LeaseStore)."""

        def tx(conn: sqlite3.Connection) -> bool:
            return conn.execute(_RENEW_LEASE, (lease.name, lease.owner, lease.token, int(ttl_s * 1_000_000),
                                               now_us())).rowcount > 0

        return await self._write(tx)

    async def release_lease(self, lease: Lease) -> None:
        """End the lease if it is the latest grant (see LeaseStore)."""

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(_RELEASE_LEASE, (lease.name, lease.owner, lease.token))

        await self._write(tx)

    async def holds_lease(self, lease: Lease) -> bool:
        """Whether the lease is live now (a point read)."""
        return self._quick_one(_LIVE_LEASE, (lease.name, lease.owner, lease.token, now_us())) is not None
