"""Human-readable rendering of batches, files, models and results for the CLI.

Pure functions from messages to strings; the CLI decides where they go.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from longbatch.client.operation import Batch, BatchOperation
from longbatch.v1 import batch_pb2, file_pb2, model_pb2

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def state_name(state: batch_pb2.BatchState.ValueType) -> str:
    """``BATCH_STATE_RUNNING`` → ``RUNNING``."""
    return batch_pb2.BatchState.Name(state).removeprefix("BATCH_STATE_")


def status_text(status: status_pb2.Status) -> str:
    """``CODE_NAME: message`` of a ``google.rpc.Status``."""
    return f"{_CODE_NAMES.get(int(status.code), str(status.code))}: {status.message}"


def format_time(ts: timestamp_pb2.Timestamp) -> str:
    """A timestamp as ``2025-01-31 12:00:00Z`` (UTC), or ``-`` when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_fields(fields: Iterable[tuple[str, str]]) -> str:
    """Aligned ``key: value`` lines."""
    rows = list(fields)
    width = max((len(key) for key, _ in rows), default=0) + 1
    return "\n".join(f"{key + ':':<{width}}  {value}" for key, value in rows)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A compact table: columns padded to their widest cell, the last one left ragged."""
    table = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)).rstrip()
        for row in table
    )


def to_json(message: Message) -> str:
    """One message as indented proto JSON."""
    return json_format.MessageToJson(message)


def to_json_array(messages: Iterable[Message]) -> str:
    """Messages as an indented JSON array of proto JSON objects."""
    return json.dumps([json_format.MessageToDict(m) for m in messages], indent=2)


def to_json_line(message: Message) -> str:
    """One message as proto JSON on a single line."""
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":"), ensure_ascii=False)


def done_count(batch: Batch) -> int:
    """Requests of the batch that are finished, whatever their outcome."""
    stats = batch.batch_stats
    return stats.request_count - stats.pending_request_count


def batch_fields(op: BatchOperation) -> list[tuple[str, str]]:
    """The ``key: value`` description of a batch, as ``longbatch get`` prints it."""
    fields = [("name", op.name)]
    batch = op.metadata
    if batch is None:
        return [*fields, ("done", str(op.done).lower())]
    stats = batch.batch_stats
    counts = (
        ("succeeded", stats.successful_request_count),
        ("failed", stats.failed_request_count),
        ("pending", stats.pending_request_count),
        ("cancelled", stats.cancelled_request_count),
        ("expired", stats.expired_request_count),
    )
    fields += [
        ("kind", op.kind),
        ("model", batch.model),
        ("display name", batch.display_name or "-"),
        ("state", state_name(batch.state)),
        ("priority", str(batch.priority)),
        ("requests", f"{stats.request_count:,}"),
        ("progress", ", ".join(f"{n:,} {label}" for label, n in counts if n) or "-"),
    ]
    if batch.input_config.WhichOneof("source") == "file_name":
        fields.append(("input", batch.input_config.file_name))
    else:
        # The server does not echo inlined requests back; the count is in the stats.
        fields.append(("input", f"{batch.batch_stats.request_count:,} inline requests"))
    which = batch.output.WhichOneof("output")
    if which == "responses_file":
        fields.append(("output", batch.output.responses_file))
    elif which == "inlined_responses":
        fields.append(("output", f"{len(batch.output.inlined_responses.inlined_responses):,} inline responses"))
    fields += [
        ("created", format_time(batch.create_time)),
        ("updated", format_time(batch.update_time)),
        ("ended", format_time(batch.end_time)),
    ]
    if op.operation.HasField("error"):
        fields.append(("error", status_text(op.operation.error)))
    return fields


def batch_row(op: BatchOperation) -> list[str]:
    """One row of the ``longbatch list`` table (see ``BATCH_HEADERS``)."""
    batch = op.metadata
    if batch is None:
        return [op.name, "", "DONE" if op.done else "?", "", "", "", ""]
    total = batch.batch_stats.request_count
    return [
        op.name,
        op.kind,
        state_name(batch.state),
        f"{done_count(batch):,}/{total:,}",
        batch.model,
        format_time(batch.create_time),
        batch.display_name,
    ]


BATCH_HEADERS = ("NAME", "KIND", "STATE", "DONE", "MODEL", "CREATED", "DISPLAY NAME")


def file_fields(file: file_pb2.File) -> list[tuple[str, str]]:
    """The ``key: value`` description of a file."""
    fields = [
        ("name", file.name),
        ("display name", file.display_name or "-"),
        ("mime type", file.mime_type or "-"),
        ("size", f"{file.size_bytes:,} bytes"),
        ("sha256", file.sha256_hash.hex() or "-"),
        ("state", file_pb2.File.State.Name(file.state).removeprefix("STATE_")),
        ("source", file_pb2.File.Source.Name(file.source).removeprefix("SOURCE_")),
        ("created", format_time(file.create_time)),
        ("expires", format_time(file.expiration_time)),
    ]
    if file.HasField("error"):
        fields.append(("error", status_text(file.error)))
    return fields


FILE_HEADERS = ("NAME", "SIZE", "STATE", "SOURCE", "CREATED", "EXPIRES", "DISPLAY NAME")


def file_row(file: file_pb2.File) -> list[str]:
    """One row of the ``longbatch files list`` table (see ``FILE_HEADERS``)."""
    return [
        file.name,
        f"{file.size_bytes:,}",
        file_pb2.File.State.Name(file.state).removeprefix("STATE_"),
        file_pb2.File.Source.Name(file.source).removeprefix("SOURCE_"),
        format_time(file.create_time),
        format_time(file.expiration_time),
        file.display_name,
    ]


MODEL_HEADERS = ("NAME", "BACKEND", "CONCURRENCY", "METHODS", "DISPLAY NAME")


def model_row(model: model_pb2.Model) -> list[str]:
    """One row of the ``longbatch models`` table (see ``MODEL_HEADERS``)."""
    return [
        model.name,
        model.backend,
        str(model.max_concurrency),
        ",".join(model.supported_methods),
        model.display_name,
    ]


def result_line(result: batch_pb2.BatchResult) -> str:
    """One result as a short human line: ``[3] text…``, ``[4] error: CODE: message``."""
    label = f"[{result.index}{' ' + result.key if result.key else ''}]"
    which = result.WhichOneof("result")
    if which == "generate_content_response":
        response = result.generate_content_response
        texts = [
            part.text
            for candidate in response.candidates[:1]
            for part in candidate.content.parts
            if part.WhichOneof("data") == "text"
        ]
        return f"{label} " + " ".join("".join(texts).split())
    if which == "embed_content_response":
        values = result.embed_content_response.embedding.values
        head = ", ".join(f"{v:.4f}" for v in values[:4])
        return f"{label} embedding ({len(values)} dims): [{head}{', …' if len(values) > 4 else ''}]"
    if which == "error":
        return f"{label} error: {status_text(result.error)}"
    return f"{label} (empty)"
