"""Human-readable rendering of batches, files, models and results for the CLI.

Pure functions from messages to strings; the CLI decides where they go.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC
from typing import Any

import grpc
import orjson
from google.longrunning import operations_pb2
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2
from rich.console import Console
from rich.table import Table

from longbatch.client.operation import Batch, BatchOperation
from longbatch.client.progress import BatchProgress
from longbatch.v1 import batch_pb2, file_pb2, model_pb2

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def state_name(state: batch_pb2.BatchState.ValueType) -> str:
    """``BATCH_STATE_RUNNING`` → ``RUNNING``."""
    return batch_pb2.BatchState.Name(state).removeprefix("BATCH_STATE_")


def status_text(status: status_pb2.Status) -> str:
    """``CODE_NAME: message`` of a ``google.rpc.Status``."""
    return f"{code_name(int(status.code))}: {status.message}"


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
    """A compact table laid out by rich: no borders, two spaces between
    columns, each as wide as its widest cell, lines never cut (a name must
    stay whole to be copied), trailing spaces trimmed."""
    table = Table(box=None, pad_edge=False, padding=(0, 1), show_edge=False, header_style="")
    for header in headers:
        table.add_column(header, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    # A console as wide as any table, so that rich never wraps a cell; the
    # terminal wraps a line too long for it, as it would any other output.
    console = Console(file=io.StringIO(), width=1 << 16, color_system=None, highlight=False)
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


def to_json(message: Message) -> str:
    """One message as indented proto JSON."""
    return json_format.MessageToJson(message)


def to_json_array(messages: Iterable[Message]) -> str:
    """Messages as an indented JSON array of proto JSON objects."""
    return json.dumps([json_format.MessageToDict(m) for m in messages], indent=2)


def without_output(op: operations_pb2.Operation) -> operations_pb2.Operation:
    """A copy of ``op`` without its inline responses, as ``--json`` prints it
    unless given ``--output``: they are most of a done batch's bytes, twice
    (``metadata.output`` and ``response``), and ``longbatch results`` reads
    them line by line. The ``response`` stays, typed and empty, as
    ListOperations sends it; a responses file's name, a few bytes, stays."""
    handle_batch = _unpack(op.metadata, _BATCH_TYPES)
    output = _unpack(op.response, _OUTPUT_TYPES) if op.HasField("response") else None
    copy = operations_pb2.Operation()
    copy.CopyFrom(op)
    if handle_batch is not None and handle_batch.output.WhichOneof("output") == "inlined_responses":
        handle_batch.ClearField("output")
        copy.metadata.value = handle_batch.SerializeToString()
    if output is not None and output.WhichOneof("output") == "inlined_responses":
        copy.response.value = b""
    return copy


_BATCH_TYPES: dict[str, type[Batch]] = {
    "longbatch.v1.GenerateContentBatch": batch_pb2.GenerateContentBatch,
    "longbatch.v1.EmbedContentBatch": batch_pb2.EmbedContentBatch,
}
_OUTPUT_TYPES: dict[str, type[batch_pb2.GenerateContentBatchOutput | batch_pb2.EmbedContentBatchOutput]] = {
    "longbatch.v1.GenerateContentBatchOutput": batch_pb2.GenerateContentBatchOutput,
    "longbatch.v1.EmbedContentBatchOutput": batch_pb2.EmbedContentBatchOutput,
}


def _unpack(value: Any, types: Mapping[str, type[Any]]) -> Any:
    cls = types.get(str(value.type_url).rpartition("/")[2])
    return cls.FromString(value.value) if cls is not None else None


def result_json(result: batch_pb2.BatchResult) -> str:
    """One result as the results line format, the same as a results file's:
    ``{"index": 0, "key": …, ["metadata": …,] "response"|"error": …}``.

    ``index`` is a JSON number, 0 included (proto JSON would drop a zero and
    write int64 as a string); ``key`` is the input's, or the index as a
    string when it had none; metadata keys are sorted (a Struct is a map).
    """
    line: dict[str, Any] = {"index": int(result.index), "key": result.key or str(result.index)}
    if result.HasField("metadata"):
        line["metadata"] = _sorted_keys(json_format.MessageToDict(result.metadata))
    which = result.WhichOneof("result")
    if which == "error":
        line["error"] = json_format.MessageToDict(result.error)
    elif which is not None:
        line["response"] = json_format.MessageToDict(getattr(result, which))
    # orjson, as the server writes results files: the same bytes for the same line.
    return orjson.dumps(line).decode()


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def done_count(batch: Batch) -> int:
    """Requests of the batch that are finished, whatever their outcome."""
    stats = batch.batch_stats
    return stats.request_count - stats.pending_request_count


def answered_count(batch: Batch) -> int:
    """Requests of the batch that were run and answered, succeeded or failed."""
    stats = batch.batch_stats
    return stats.successful_request_count + stats.failed_request_count


def batch_progress(name: str, batch: Batch, rate: float | None = None, eta_s: float | None = None) -> BatchProgress:
    """The progress line of ``batch``; a file batch not yet read says it is validating its input."""
    total = batch.batch_stats.request_count
    validating = (
        batch.state == batch_pb2.BATCH_STATE_PENDING
        and total == 0
        and batch.input_config.WhichOneof("source") == "file_name"
    )
    return BatchProgress(name, state_name(batch.state), answered_count(batch), total, rate, eta_s, validating,
                         batch.batch_stats.failed_request_count)


def summary_line(name: str, batch: Batch, failed_by_code: Mapping[str, int] | None = None,
                 error: status_pb2.Status | None = None) -> str:
    """The one line that ends a wait, e.g. ``batches/x SUCCEEDED: 9 succeeded,
    1 failed (1 UNAVAILABLE), 0 cancelled, 0 expired``.

    Args:
        name: The batch name.
        batch: The batch as it ended.
        failed_by_code: How many failed requests had each error code, when known.
        error: The operation's error; a FAILED batch's line is its code and message.
    """
    state = state_name(batch.state)
    if batch.state == batch_pb2.BATCH_STATE_FAILED and error is not None:
        return f"{name} {state}: {status_text(error)}"
    stats = batch.batch_stats
    failed = f"{stats.failed_request_count:,} failed"
    if stats.failed_request_count and failed_by_code:
        codes = sorted(failed_by_code.items(), key=lambda item: (-item[1], item[0]))
        failed += " (" + ", ".join(f"{n:,} {code}" for code, n in codes) + ")"
    counts = [f"{stats.successful_request_count:,} succeeded", failed,
              f"{stats.cancelled_request_count:,} cancelled", f"{stats.expired_request_count:,} expired"]
    return f"{name} {state}: " + ", ".join(counts)


def code_name(code: int) -> str:
    """``14`` → ``UNAVAILABLE``."""
    return _CODE_NAMES.get(code, str(code))


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
        # Answered, not merely done: a cancelled batch must not read as complete.
        f"{answered_count(batch):,}/{total:,}",
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


MODEL_HEADERS = ("NAME", "BACKEND", "BASE URL", "CONCURRENCY", "METHODS", "DISPLAY NAME")


def model_row(model: model_pb2.Model) -> list[str]:
    """One row of the ``longbatch models`` table (see ``MODEL_HEADERS``)."""
    return [
        model.name,
        model.backend,
        model.base_url or "-",
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
