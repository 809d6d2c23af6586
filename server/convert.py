"""Conversions between domain objects and protobuf messages.

The one place where protobuf shapes meet the store's rows. Stored results are
already serialized messages, so outputs are assembled at the wire level
(length-delimited fields concatenated) instead of parsing every result.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.longrunning import operations_pb2
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import status_pb2

from longbatch.v1 import batch_pb2

from .domain import Batch, BatchKind, ItemStatus, ResultRow, State
from .wire import length_delimited

BatchMessage = batch_pb2.GenerateContentBatch | batch_pb2.EmbedContentBatch
_TYPE_PREFIX = "type.googleapis.com/"
_BATCH_TYPES: dict[BatchKind, type[BatchMessage]] = {
    BatchKind.GENERATE: batch_pb2.GenerateContentBatch,
    BatchKind.EMBED: batch_pb2.EmbedContentBatch,
}
_OUTPUT_TYPES = {
    BatchKind.GENERATE: batch_pb2.GenerateContentBatchOutput.DESCRIPTOR.full_name,
    BatchKind.EMBED: batch_pb2.EmbedContentBatchOutput.DESCRIPTOR.full_name,
}
_RESULT_FIELD = {BatchKind.GENERATE: "generate_content_response", BatchKind.EMBED: "embed_content_response"}

# Field numbers shared by the generate and embed twins (see batch.proto).
_OUTPUT_RESPONSES_FILE = 1
_OUTPUT_INLINED = 2
_INLINED_ENTRY = 1
_ENTRY_ERROR = 1
_ENTRY_RESPONSE = 2
_ENTRY_METADATA = 3


def timestamp(us: int | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp from integer microseconds, or None."""
    if us is None:
        return None
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def batch_message(batch: Batch, output: bytes | None = None, waiting_reason: str = "") -> BatchMessage:
    """The GenerateContentBatch or EmbedContentBatch for a stored batch.

    ``output`` is the serialized batch output, set once the batch is done;
    ``waiting_reason`` why its requests are not running now (the executor's
    word, kept off done batches).
    """
    msg = _BATCH_TYPES[batch.kind](
        model=batch.model,
        name=batch.name,
        display_name=batch.display_name,
        create_time=timestamp(batch.create_time_us),
        update_time=timestamp(batch.update_time_us),
        end_time=timestamp(batch.end_time_us),
        state=int(batch.state),  # type: ignore[arg-type]
        priority=batch.priority,
        waiting_reason="" if batch.done else waiting_reason,
    )
    if batch.input_file:
        msg.input_config.file_name = f"files/{batch.input_file}"
    else:
        # Inlined requests are not echoed back (they can be 20 MiB); an empty
        # `requests` still tells the client which kind of input it was.
        msg.input_config.requests.SetInParent()
    stats = msg.batch_stats
    stats.request_count = batch.request_count
    stats.successful_request_count = batch.succeeded
    stats.failed_request_count = batch.failed
    stats.pending_request_count = batch.pending
    stats.cancelled_request_count = batch.cancelled
    stats.expired_request_count = batch.expired
    if batch.webhook:
        msg.webhook_config.MergeFromString(batch.webhook)
    if output is not None:
        msg.output.MergeFromString(output)
    return msg


def operation(batch: Batch, output: bytes | None = None, waiting_reason: str = "") -> operations_pb2.Operation:
    """The google.longrunning.Operation for a batch.

    A done batch carries ``response`` (SUCCEEDED) or ``error`` (every other
    terminal state), never neither; ``output`` and ``waiting_reason`` go
    into the metadata (see batch_message).
    """
    meta = batch_message(batch, output, waiting_reason)
    op = operations_pb2.Operation(name=batch.name, done=batch.done)
    op.metadata.Pack(meta)
    if not batch.done:
        return op
    if batch.state is State.SUCCEEDED:
        op.response.CopyFrom(any_pb2.Any(type_url=_TYPE_PREFIX + _OUTPUT_TYPES[batch.kind], value=output or b""))
    elif batch.error:
        op.error.MergeFromString(batch.error)
    else:  # never expected: a done batch always has one of the two
        op.error.CopyFrom(status_pb2.Status(code=13, message="batch ended without a recorded error"))
    return op


def _entry(row: ResultRow) -> bytes:
    body = length_delimited(_ENTRY_METADATA, row.metadata) if row.metadata is not None else b""
    body += length_delimited(_ENTRY_RESPONSE if row.status is ItemStatus.SUCCEEDED else _ENTRY_ERROR, row.result)
    return length_delimited(_INLINED_ENTRY, body)


def inline_output(rows: Iterable[ResultRow]) -> bytes:
    """Serialized ``…BatchOutput{inlined_responses}`` from result rows in order."""
    return length_delimited(_OUTPUT_INLINED, b"".join(_entry(r) for r in rows))


def file_output(file_id: str) -> bytes:
    """Serialized ``…BatchOutput{responses_file}``."""
    return length_delimited(_OUTPUT_RESPONSES_FILE, f"files/{file_id}".encode())


def batch_result(kind: BatchKind, row: ResultRow) -> batch_pb2.BatchResult:
    """The BatchResult streamed for one finished request."""
    msg = batch_pb2.BatchResult(index=row.idx, key=row.key)
    if row.metadata is not None:
        msg.metadata.MergeFromString(row.metadata)
    if row.status is ItemStatus.SUCCEEDED:
        getattr(msg, _RESULT_FIELD[kind]).MergeFromString(row.result)
    else:
        msg.error.MergeFromString(row.result)
    return msg


_CLOSED_ITEMS = {
    State.CANCELLED: (ItemStatus.CANCELLED, status_pb2.Status(
        code=1, message="batch was cancelled before this request ran").SerializeToString()),
    State.EXPIRED: (ItemStatus.EXPIRED, status_pb2.Status(
        code=4, message="batch expired before this request finished").SerializeToString()),
}
_CLOSED_OTHER = (ItemStatus.CANCELLED, _CLOSED_ITEMS[State.CANCELLED][1])


def closed_item(state: State) -> tuple[ItemStatus, bytes]:
    """What an unfinished request of a batch closed in ``state`` counts and
    reads as: CANCELLED (code 1) or, for EXPIRED, DEADLINE_EXCEEDED (code 4)."""
    return _CLOSED_ITEMS.get(state, _CLOSED_OTHER)
