"""End-to-end batch behaviour against the real server (API.md sections 3, 4, 7, 8)."""

from __future__ import annotations

import math
import time

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import field_mask_pb2

from longbatch.server.domain import PendingItem
from longbatch.server.executor import Executor
from longbatch.v1 import batch_pb2

from support import Stubs, details, embed_batch, eventually, generate_batch, metadata_of, wait_done

SUCCEEDED = batch_pb2.BatchState.BATCH_STATE_SUCCEEDED
CANCELLED = batch_pb2.BatchState.BATCH_STATE_CANCELLED


async def test_generate_batch_of_100_succeeds_in_order(stubs: Stubs) -> None:
    op = await stubs.batches.BatchGenerateContent(generate_batch(100, display_name="hundred"))
    assert op.name.startswith("batches/") and not op.done
    assert metadata_of(op).state == batch_pb2.BatchState.BATCH_STATE_PENDING

    op = await wait_done(stubs, op.name)
    assert op.done and op.HasField("response") and not op.HasField("error")
    assert op.response.type_url == "type.googleapis.com/longbatch.v1.GenerateContentBatchOutput"
    assert op.metadata.type_url == "type.googleapis.com/longbatch.v1.GenerateContentBatch"
    output = batch_pb2.GenerateContentBatchOutput()
    assert op.response.Unpack(output)
    responses = output.inlined_responses.inlined_responses
    assert len(responses) == 100
    for i, r in enumerate(responses):
        assert r.metadata["i"] == i
        assert r.response.candidates[0].content.parts[0].text == f"prompt {i}"
    meta = metadata_of(op)
    assert meta.state == SUCCEEDED and meta.display_name == "hundred"
    assert meta.output == output  # the same output in metadata
    stats = meta.batch_stats
    assert (stats.request_count, stats.successful_request_count, stats.failed_request_count,
            stats.pending_request_count) == (100, 100, 0, 0)
    assert meta.end_time.ToMicroseconds() >= meta.create_time.ToMicroseconds() > 0


async def test_embed_batch_of_100_gives_unit_vectors(stubs: Stubs) -> None:
    op = await stubs.batches.AsyncBatchEmbedContent(embed_batch(100, dim=32))
    op = await wait_done(stubs, op.name)
    assert op.response.type_url == "type.googleapis.com/longbatch.v1.EmbedContentBatchOutput"
    output = batch_pb2.EmbedContentBatchOutput()
    op.response.Unpack(output)
    responses = output.inlined_responses.inlined_responses
    assert [r.metadata["i"] for r in responses] == list(range(100))
    for r in responses:
        values = r.response.embedding.values
        assert len(values) == 32
        assert math.isclose(math.sqrt(sum(v * v for v in values)), 1.0, rel_tol=1e-5)
    assert responses[0].response.embedding.values != responses[1].response.embedding.values
    # Deterministic: the same text gives the same vector in a second batch.
    again = await wait_done(stubs, (await stubs.batches.AsyncBatchEmbedContent(embed_batch(1, dim=32))).name)
    out2 = batch_pb2.EmbedContentBatchOutput()
    again.response.Unpack(out2)
    first_again = out2.inlined_responses.inlined_responses[0].response.embedding.values
    assert first_again == responses[0].response.embedding.values
    stats = metadata_of(op).batch_stats
    assert (stats.request_count, stats.successful_request_count) == (100, 100)


async def test_same_request_id_makes_one_batch(stubs: Stubs) -> None:
    first = await stubs.batches.BatchGenerateContent(generate_batch(3, request_id="req-42"))
    second = await stubs.batches.BatchGenerateContent(generate_batch(3, request_id="req-42"))
    assert first.name == second.name
    other = await stubs.batches.BatchGenerateContent(generate_batch(3, request_id="req-43"))
    assert other.name != first.name
    listed = await stubs.ops.ListOperations(operations_pb2.ListOperationsRequest(name="batches"))
    assert sorted(o.name for o in listed.operations) == sorted({first.name, other.name})


async def test_cancel_running_batch_keeps_finished_results(stubs: Stubs) -> None:
    op = await stubs.batches.BatchGenerateContent(generate_batch(5000, model="models/echo-slow"))

    async def some_finished() -> bool:
        got = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
        assert not got.done, "5000 slow requests finished before the cancel"
        return metadata_of(got).batch_stats.successful_request_count > 0

    await eventually(some_finished, within=15, what="some requests finished")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stubs.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(e.value).reason == "BATCH_NOT_DONE"

    started = time.monotonic()
    await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
    op = await wait_done(stubs, op.name, within=2.0)
    assert time.monotonic() - started < 2.0
    assert op.done and op.error.code == 1 and not op.HasField("response")
    meta = metadata_of(op)
    assert meta.state == CANCELLED
    stats = meta.batch_stats
    assert stats.successful_request_count > 0 and stats.cancelled_request_count > 0
    assert stats.successful_request_count + stats.cancelled_request_count == 5000
    assert stats.pending_request_count == 0
    # Finished results are readable in metadata.output and by streaming.
    entries = meta.output.inlined_responses.inlined_responses
    assert len(entries) == 5000
    ok = [i for i, r in enumerate(entries) if r.HasField("response")]
    assert len(ok) == stats.successful_request_count
    assert all(entries[i].error.code == 1 for i in range(5000) if i not in set(ok))
    streamed = [r async for r in stubs.batches.StreamBatchResults(batch_pb2.StreamBatchResultsRequest(name=op.name))]
    assert [r.index for r in streamed] == list(range(5000))
    assert sum(r.HasField("generate_content_response") for r in streamed) == len(ok)

    # Cancel again: OK, no change.
    await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
    again = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
    assert metadata_of(again).state == CANCELLED

    await stubs.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name))
    for call in (stubs.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name)),
                 stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_wait_returns_promptly_on_completion(stubs: Stubs) -> None:
    # 64 requests x 50 ms over 16 workers ≈ 0.2 s.
    op = await stubs.batches.BatchGenerateContent(generate_batch(64, model="models/echo-slow"))
    req = operations_pb2.WaitOperationRequest(name=op.name)
    req.timeout.FromSeconds(20)
    waited = await stubs.ops.WaitOperation(req)
    returned = time.time()
    assert waited.done
    end = metadata_of(waited).end_time.ToMicroseconds() / 1e6
    assert returned - end < 0.1, f"Wait returned {returned - end:.3f}s after completion"


async def test_wait_times_out_with_done_false(stubs: Stubs) -> None:
    op = await stubs.batches.BatchGenerateContent(generate_batch(2000, model="models/echo-slow"))
    req = operations_pb2.WaitOperationRequest(name=op.name)
    req.timeout.FromSeconds(1)
    started = time.monotonic()
    waited = await stubs.ops.WaitOperation(req)
    elapsed = time.monotonic() - started
    assert not waited.done
    assert 0.9 <= elapsed < 1.6
    req.timeout.FromSeconds(0)
    started = time.monotonic()
    assert not (await stubs.ops.WaitOperation(req)).done
    assert time.monotonic() - started < 0.3
    # The client's deadline, shorter than the timeout, wins: OK with done=false.
    req.timeout.FromSeconds(30)
    started = time.monotonic()
    waited = await stubs.ops.WaitOperation(req, timeout=0.8)
    assert not waited.done and time.monotonic() - started < 0.8
    await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))


async def test_higher_priority_batch_runs_first(stubs: Stubs) -> None:
    low = await stubs.batches.BatchGenerateContent(generate_batch(400, model="models/echo-slow", priority=0))
    high = await stubs.batches.BatchGenerateContent(generate_batch(64, model="models/echo-slow", priority=10))
    high_done = await wait_done(stubs, high.name)
    low_now = metadata_of(await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=low.name)))
    assert metadata_of(high_done).state == SUCCEEDED
    assert low_now.batch_stats.pending_request_count > 0, "the low-priority batch finished first"
    await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=low.name))


async def test_update_display_name_and_priority(stubs: Stubs) -> None:
    op = await stubs.batches.BatchGenerateContent(generate_batch(500, model="models/echo-slow"))
    updated = await stubs.batches.UpdateGenerateContentBatch(batch_pb2.UpdateGenerateContentBatchRequest(
        batch=batch_pb2.GenerateContentBatch(name=op.name, display_name="renamed", priority=7),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "priority"]),
    ))
    assert (updated.display_name, updated.priority) == ("renamed", 7)
    await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
    done = await wait_done(stubs, op.name)
    # display_name may change after done; priority may not.
    renamed = await stubs.batches.UpdateGenerateContentBatch(batch_pb2.UpdateGenerateContentBatchRequest(
        batch=batch_pb2.GenerateContentBatch(name=done.name, display_name="after"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    ))
    assert renamed.display_name == "after" and renamed.state == CANCELLED


async def test_stream_results_from_start_index(stubs: Stubs) -> None:
    op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(generate_batch(30))).name)
    results = [r async for r in stubs.batches.StreamBatchResults(
        batch_pb2.StreamBatchResultsRequest(name=op.name, start_index=25))]
    assert [r.index for r in results] == [25, 26, 27, 28, 29]
    assert [r.metadata["i"] for r in results] == [25, 26, 27, 28, 29]
    assert results[0].generate_content_response.candidates[0].content.parts[0].text == "prompt 25"
    past_end = [r async for r in stubs.batches.StreamBatchResults(
        batch_pb2.StreamBatchResultsRequest(name=op.name, start_index=1000))]
    assert past_end == []


async def test_large_output_goes_to_a_responses_file(make_server) -> None:  # type: ignore[no-untyped-def]
    from longbatch.server.config import Limits, ServerConfig

    handle = await make_server(ServerConfig(limits=Limits(max_inline_output=200_000)))
    stubs = Stubs.connect(handle.target)
    try:
        op = await wait_done(stubs, (await stubs.batches.BatchGenerateContent(generate_batch(2000))).name)
        output = batch_pb2.GenerateContentBatchOutput()
        op.response.Unpack(output)
        assert output.WhichOneof("output") == "responses_file"
        assert op.ByteSize() < 200_000
        file_id = output.responses_file.removeprefix("files/")
        lines = (handle.data_dir / "files" / file_id).read_bytes().splitlines()
        assert len(lines) == 2000
        import json

        first = json.loads(lines[0])
        assert first["metadata"] == {"i": 0.0}
        assert first["response"]["candidates"][0]["content"]["parts"][0]["text"] == "prompt 0"
        await stubs.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name))
        assert not (handle.data_dir / "files" / file_id).exists()
    finally:
        await stubs.channel.close()


async def test_a_worker_killed_by_a_fault_of_ours_restarts_and_the_batch_completes(
    stubs: Stubs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A bug that escapes a worker (here: persisting its answers raises) must
    # not leave the batch waiting forever for the requests that worker held.
    real = Executor._persist_answers
    faults = 3

    async def faulty(self: Executor, batch_id: str, items: list[PendingItem], answers: list[bytes]) -> None:
        nonlocal faults
        if faults:
            faults -= 1
            raise RuntimeError("injected fault")
        await real(self, batch_id, items, answers)

    monkeypatch.setattr(Executor, "_persist_answers", faulty)
    op = await stubs.batches.BatchGenerateContent(generate_batch(3000), timeout=10)
    stats = metadata_of(await wait_done(stubs, op.name, within=30)).batch_stats
    assert faults == 0
    assert (stats.successful_request_count, stats.failed_request_count) == (3000, 0)
    assert caplog.text.count("restarting it") == 3
