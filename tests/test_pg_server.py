"""The server on PostgreSQL (``--database-url``): the core end-to-end tests
again, and what only a database server brings (an unreachable one, a second
server on it, a restart after SIGKILL).

The tests imported below run here with this module's ``server`` fixture,
which starts the server on this test's empty database (tests/pg.py): the
same test bodies as on SQLite, so the two stores answer the API alike. They
are skipped, or fail under ``CI=true``, per tests/pg.py's rules.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import asyncpg
import pytest
from conftest import MakeServer, ServerHandle
from google.longrunning import operations_pb2
from pg import pg_database, pg_url  # noqa: F401  (fixtures, by name)

# The core tests, collected again in this module (they take ``stubs``, so the
# ``server`` fixture below puts them on PostgreSQL).
from test_batches import (  # noqa: F401
    test_cancel_running_batch_keeps_finished_results,  # cancel, delete, then NOT_FOUND
    test_embed_batch_of_100_gives_unit_vectors,
    test_generate_batch_of_100_succeeds_in_order,
    test_same_request_id_makes_one_batch,
    test_stream_results_from_start_index,
    test_update_display_name_and_priority,
    test_wait_returns_promptly_on_completion,
)
from test_file_batches import (  # noqa: F401
    test_bad_lines_fail_the_batch_before_anything_runs,
    test_crlf_blank_lines_and_both_field_spellings,  # upload, batch, download the responses file
    test_deleting_a_file_in_use_is_refused,
    test_generate_file_batch_of_10000,
)
from test_list import (  # noqa: F401
    test_filters,
    test_page_token_is_bound_to_filter_and_signed,
    test_paging_visits_each_batch_once_newest_first,
)

from longbatch.server.pg_server_lock import IN_USE, LOCK_APP
from longbatch.v1 import batch_pb2

from support import ServerProcess, Stubs, eventually, generate_batch, metadata_of, run_process, wait_done

SERVE = (sys.executable, "-m", "longbatch.server.main", "--port", "0", "--http-port", "0", "--log-level", "WARNING")


@pytest.fixture
async def server(make_server: MakeServer, pg_url: str) -> ServerHandle:  # noqa: F811
    """A server on the embedded defaults, on this test's PostgreSQL database."""
    return await make_server(database_url=pg_url)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGBATCH_")}
    return {**env, "LONGBATCH_HTTP_PORT": "0", **extra}


def _closed_port() -> int:
    """A loopback port nothing listens on (free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_database_is_one_line_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://longbatch:pw-s3cret%21@127.0.0.1:{_closed_port()}/longbatch"
    code, out, err = await run_process(*SERVE, "--data-dir", str(tmp_path / "d"), "--database-url", url,
                                       env=_clean_env(), within=60)
    assert code == 1, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot open PostgreSQL database "), err
    assert "pw-s3cret" not in err and "pw-s3cret!" not in err and "***" in err


async def test_a_url_that_is_not_postgresql_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = await run_process(*SERVE, "--data-dir", str(tmp_path / "d"),
                                     env=_clean_env(LONGBATCH_DATABASE_URL="mysql://u:secretpw@127.0.0.1/x"))
    assert code == 2
    assert err.splitlines() == ["error: --database-url must be a postgresql:// or postgres:// URL, got scheme 'mysql'"]


async def _lock_holders(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
            LOCK_APP))
    finally:
        await conn.close()


@pytest.mark.timeout(120)
async def test_a_second_server_on_the_same_database_is_refused(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    first = ServerProcess(tmp_path / "a", extra=["--database-url", pg_url])
    try:
        stubs = Stubs.connect(await first.start())
        assert not (tmp_path / "a" / "longbatch.db").exists()  # the data dir is scratch only
        # The second has its own data dir (the data-dir lock is not what refuses it)
        # and its URL from the environment.
        code, out, err = await run_process(*SERVE, "--data-dir", str(tmp_path / "b"),
                                           env=_clean_env(LONGBATCH_DATABASE_URL=pg_url))
        assert code == 1
        assert out == ""
        assert err.splitlines() == [f"error: {IN_USE}"]
        # The first serves on, untouched.
        op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(generate_batch(3))).name)
        assert metadata_of(op).state == batch_pb2.BatchState.BATCH_STATE_SUCCEEDED
        await stubs.channel.close()
        assert await first.terminate() == 0
        # A clean stop gives the database back.
        assert await _lock_holders(pg_url) == 0
        again = ServerProcess(tmp_path / "b", extra=["--database-url", pg_url])
        try:
            await again.start()
            assert await again.terminate() == 0
        finally:
            await again.ensure_dead()
    finally:
        await first.ensure_dead()


@pytest.mark.timeout(180)
async def test_sigkill_mid_batch_then_restart_on_the_database_finishes_exactly_once(
        tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    proc = ServerProcess(tmp_path / "data", extra=["--database-url", pg_url])
    n = 3000
    try:
        stubs = Stubs.connect(await proc.start())
        name = (await stubs.batches.BatchGenerateContent(generate_batch(n, model="models/echo-slow"))).name

        async def progressed() -> int:
            got = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name))
            done = metadata_of(got).batch_stats.successful_request_count
            return done if done >= 300 else 0

        before = await eventually(progressed, within=30, what="300 requests done", every=0.05)
        assert before < n, "the batch finished before the kill: nothing left to resume"
        await stubs.channel.close()
        await proc.kill()
        # PostgreSQL ends the dead server's session (and its lock) once it sees
        # the socket closed; the restart waits for that rather than racing it.
        await eventually(lambda: _released(pg_url), within=30, what="the killed server's lock released",
                         every=0.1)

        stubs = Stubs.connect(await proc.start())
        after_restart = metadata_of(await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name)))
        assert after_restart.batch_stats.successful_request_count >= before  # nothing committed was lost
        op = await wait_done(stubs, name, within=90)
        meta = metadata_of(op)
        assert meta.state == batch_pb2.BatchState.BATCH_STATE_SUCCEEDED
        assert meta.batch_stats.successful_request_count == n
        output = batch_pb2.GenerateContentBatchOutput()
        op.response.Unpack(output)
        entries = output.inlined_responses.inlined_responses
        assert [e.metadata["i"] for e in entries] == list(range(n))
        assert all(e.response.candidates[0].content.parts[0].text == f"prompt {i}" for i, e in enumerate(entries))
        await stubs.channel.close()
        assert await proc.terminate() == 0
    finally:
        await proc.ensure_dead()
    conn = await asyncpg.connect(pg_url, timeout=5)
    try:
        # Each request has exactly one result (status 1: SUCCEEDED).
        row = await conn.fetchrow(
            "SELECT count(*) AS rows, count(DISTINCT idx) AS idxs FROM results r "
            "JOIN batches b ON b.seq = r.batch_seq WHERE b.id = $1 AND r.status = 1", name.rsplit("/", 1)[1])
        assert row is not None and (row["rows"], row["idxs"]) == (n, n)
    finally:
        await conn.close()


async def _released(url: str) -> bool:
    return await _lock_holders(url) == 0

