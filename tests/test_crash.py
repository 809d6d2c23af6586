"""A server killed with SIGKILL mid-batch and restarted finishes every request once."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from google.longrunning import operations_pb2

from longbatch.v1 import batch_pb2

from support import ServerProcess, Stubs, generate_batch, metadata_of, wait_done


@pytest.mark.timeout(120)
async def test_sigkill_mid_batch_then_restart_finishes_exactly_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = ServerProcess(data)
    try:
        stubs = Stubs.connect(await proc.start())
        op = await stubs.batches.BatchGenerateContent(generate_batch(3000, model="models/echo-slow"))
        name = op.name
        # Kill while the batch is clearly mid-way.
        for _ in range(100):
            await asyncio.sleep(0.1)
            got = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name))
            if metadata_of(got).batch_stats.successful_request_count >= 300:
                break
        before = metadata_of(got).batch_stats.successful_request_count
        assert 0 < before < 3000
        await stubs.channel.close()
        await proc.kill()

        stubs = Stubs.connect(await proc.start())
        after_restart = metadata_of(await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name)))
        # Nothing persisted was lost.
        assert after_restart.batch_stats.successful_request_count >= before
        op = await wait_done(stubs, name, within=60)
        meta = metadata_of(op)
        assert meta.state == batch_pb2.BatchState.BATCH_STATE_SUCCEEDED
        assert meta.batch_stats.successful_request_count == 3000
        output = batch_pb2.GenerateContentBatchOutput()
        op.response.Unpack(output)
        entries = output.inlined_responses.inlined_responses
        assert [e.metadata["i"] for e in entries] == list(range(3000))
        assert all(e.response.candidates[0].content.parts[0].text == f"prompt {i}" for i, e in enumerate(entries))
        await stubs.channel.close()
        assert await proc.terminate() == 0
    finally:
        await proc.ensure_dead()
    db = sqlite3.connect(data / "longbatch.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT idx) FROM results WHERE status = 1").fetchone() == (
            3000, 3000)
    finally:
        db.close()
