"""asyncpg against psycopg 3 (with psycopg_pool) for the PostgreSQL store.

Needs both drivers: ``pip install asyncpg 'psycopg[binary]' psycopg_pool``.

Usage::

    python bench/bench_pg_driver.py [--url postgresql://postgres@127.0.0.1:5432/postgres]
                                    [--point 5000] [--pooled 40000] [--rows 100000] [--rounds 3]

Talks to 127.0.0.1 only (``--url`` must name a loopback host). It creates a
database of its own (``longbatch_bench_<random>``), runs every measurement
against it and drops it in a ``finally``. What it measures, for each driver,
on the same event loop (uvloop when importable, as the server runs):

1. point-query latency: one row by primary key, ``--point`` queries one after
   another on one connection (median and p99, µs);
2. point-query throughput: ``--pooled`` queries with 64 in flight through a
   pool of 16 connections (queries/s);
3. bulk insert: ``--rows`` rows shaped like the store's requests table
   (bigint, int, text, NULL bytea, ~160-byte bytea) by binary COPY: asyncpg's
   ``copy_records_to_table`` against psycopg's ``cursor.copy().write_row`` (rows/s).

Each figure is the best of ``--rounds`` rounds (every round of every driver
runs the same bounded loop). Prints progress to stderr and a table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psycopg
import psycopg_pool

IN_FLIGHT = 64
POOL_SIZE = 16
TABLE_ROWS = 10_000
COLUMNS = ("batch_seq", "idx", "key", "metadata", "payload")


def progress(msg: str) -> None:
    print(f"[bench_pg_driver] {msg}", file=sys.stderr, flush=True)


def with_db(url: str, db: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + db))


def rows(n: int) -> list[tuple[int, int, str, bytes | None, bytes]]:
    payload = b'{"contents":[{"parts":[{"text":"question %d about something fairly ordinary"}]}]}' * 2
    return [(1, i, f"row-{i}", None, payload.replace(b"%d", str(i).encode())) for i in range(n)]


async def setup(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for table in ("point", "bulk_asyncpg", "bulk_psycopg"):
            await conn.execute(
                f"CREATE TABLE {table} (batch_seq bigint NOT NULL, idx integer NOT NULL, key text NOT NULL, "
                "metadata bytea, payload bytea NOT NULL, PRIMARY KEY (batch_seq, idx))")
        await conn.copy_records_to_table("point", records=rows(TABLE_ROWS), columns=COLUMNS)
        await conn.execute("ANALYZE point")
    finally:
        await conn.close()


POINT_SQL_ASYNCPG = "SELECT key, payload FROM point WHERE batch_seq = 1 AND idx = $1"
POINT_SQL_PSYCOPG = "SELECT key, payload FROM point WHERE batch_seq = 1 AND idx = %s"


async def latency(query: Callable[[int], Awaitable[Any]], n: int) -> tuple[float, float]:
    for i in range(50):  # warm: statements prepared, caches filled
        await query(i)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        await query(i % TABLE_ROWS)
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times) * 1e6, times[int(len(times) * 0.99)] * 1e6


async def throughput(query: Callable[[int], Awaitable[Any]], n: int) -> float:
    per_task = n // IN_FLIGHT

    async def worker(w: int) -> None:
        for i in range(per_task):
            await query((w * per_task + i) % TABLE_ROWS)

    await asyncio.gather(*(worker(w) for w in range(IN_FLIGHT)))  # warm-up round trip of every connection
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(IN_FLIGHT)))
    return per_task * IN_FLIGHT / (time.perf_counter() - t0)


async def bench_asyncpg(url: str, args: argparse.Namespace, data: list[Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    conn = await asyncpg.connect(url)
    try:
        async def one(i: int) -> Any:
            return await conn.fetchrow(POINT_SQL_ASYNCPG, i)

        out["p50"], out["p99"] = await latency(one, args.point)
        for _ in range(3):
            await conn.execute("TRUNCATE bulk_asyncpg")
            t0 = time.perf_counter()
            await conn.copy_records_to_table("bulk_asyncpg", records=data, columns=COLUMNS)
            out["copy"] = max(out.get("copy", 0.0), len(data) / (time.perf_counter() - t0))
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(url, min_size=POOL_SIZE, max_size=POOL_SIZE)
    try:
        async def pooled(i: int) -> Any:
            return await pool.fetchrow(POINT_SQL_ASYNCPG, i)

        out["qps"] = await throughput(pooled, args.pooled)
    finally:
        await pool.close()
    return out


async def bench_psycopg(url: str, args: argparse.Namespace, data: list[Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    # prepare_threshold=0: every statement server-side prepared from its first
    # use, as asyncpg does (the default waits for 5 uses).
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=0)
    try:
        async def one(i: int) -> Any:
            cur = await conn.execute(POINT_SQL_PSYCOPG, (i,))
            return await cur.fetchone()

        out["p50"], out["p99"] = await latency(one, args.point)
        for _ in range(3):
            await conn.execute("TRUNCATE bulk_psycopg")
            t0 = time.perf_counter()
            async with conn.cursor() as cur, cur.copy(
                    f"COPY bulk_psycopg ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "int4", "text", "bytea", "bytea"])
                for row in data:
                    await copy.write_row(row)
            out["copy"] = max(out.get("copy", 0.0), len(data) / (time.perf_counter() - t0))
    finally:
        await conn.close()
    pool = psycopg_pool.AsyncConnectionPool(
        url, min_size=POOL_SIZE, max_size=POOL_SIZE, open=False,
        kwargs={"autocommit": True, "prepare_threshold": 0})
    await pool.open(wait=True, timeout=30)
    try:
        async def pooled(i: int) -> Any:
            async with pool.connection() as c:
                cur = await c.execute(POINT_SQL_PSYCOPG, (i,))
                return await cur.fetchone()

        out["qps"] = await throughput(pooled, args.pooled)
    finally:
        await pool.close()
    return out


async def main_async(args: argparse.Namespace) -> None:
    host = urlsplit(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--url must point at loopback, not {host!r}")
    db = f"longbatch_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.url)
    await admin.execute(f'CREATE DATABASE "{db}"')
    url = with_db(args.url, db)
    try:
        progress(f"database {db}: loading {TABLE_ROWS:,} rows to query")
        await setup(url)
        data = rows(args.rows)
        results: dict[str, dict[str, float]] = {"asyncpg": {}, "psycopg": {}}
        for r in range(args.rounds):
            for name, fn in (("asyncpg", bench_asyncpg), ("psycopg", bench_psycopg)):
                progress(f"round {r + 1}/{args.rounds}: {name}")
                got = await fn(url, args, data)
                best = results[name]
                for k, v in got.items():
                    lower_is_better = k in ("p50", "p99")
                    if k not in best or (v < best[k] if lower_is_better else v > best[k]):
                        best[k] = v
        print(f"\nPostgreSQL {admin.get_server_version().major} at 127.0.0.1, "
              f"{'uvloop' if 'uvloop' in sys.modules else 'asyncio'} loop; best of {args.rounds} rounds\n")
        print(f"{'measure':<44} {'asyncpg':>12} {'psycopg 3':>12} {'ratio':>7}")
        lines = [
            ("point query p50 (µs, sequential)", "p50", "{:,.0f}"),
            ("point query p99 (µs, sequential)", "p99", "{:,.0f}"),
            (f"point queries/s ({IN_FLIGHT} in flight, pool {POOL_SIZE})", "qps", "{:,.0f}"),
            (f"COPY {args.rows:,} rows (rows/s)", "copy", "{:,.0f}"),
        ]
        for label, key, fmt in lines:
            a, p = results["asyncpg"][key], results["psycopg"][key]
            print(f"{label:<44} {fmt.format(a):>12} {fmt.format(p):>12} {a / p:>7.2f}")
    finally:
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()
        progress(f"dropped {db}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--point", type=int, default=5000, help="sequential point queries per round")
    parser.add_argument("--pooled", type=int, default=40_000, help="pooled point queries per round")
    parser.add_argument("--rows", type=int, default=100_000, help="rows per COPY")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async(args))
    else:
        uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
