"""The ``longbatch`` command line: submit, inspect and wait for batches; serve.

Exit codes (``submit --wait`` and ``wait`` end with a one-line summary):

- 0: done, and every request of the batch succeeded (other commands: done);
- 1: a call failed, or something else went wrong (told on stderr);
- 2: bad usage;
- 3: the batch SUCCEEDED but some of its requests failed;
- 4: the batch ended FAILED, CANCELLED or EXPIRED;
- 5: ``--timeout`` passed first; the batch keeps running;
- 130: interrupted (Ctrl-C); a batch being waited for keeps running;
- 141: the reader of stdout went away (``longbatch results … | head``).

Errors go to stderr as ``error: CODE_NAME: message``, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TextIO, TypeVar

from longbatch.client import display
from longbatch.client.client import DEFAULT_TARGET, Client, TlsOptions
from longbatch.client.errors import BatchFailed, LongbatchError, Unimplemented
from longbatch.client.operation import BatchOperation
from longbatch.client.progress import LiveLine, RateMeter, TransferProgress
from longbatch.v1 import batch_pb2, content_pb2, file_pb2

EXIT_OK = 0
"""Done; after a wait, every request of the batch succeeded."""
EXIT_FAILURE = 1
"""A call failed, or something else went wrong."""
EXIT_USAGE = 2
"""Bad usage."""
EXIT_REQUESTS_FAILED = 3
"""The batch SUCCEEDED, but some of its requests failed."""
EXIT_BATCH_NOT_SUCCEEDED = 4
"""The batch ended FAILED, CANCELLED or EXPIRED."""
EXIT_TIMEOUT = 5
"""``--timeout`` passed before the batch was done."""
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

SUMMARY_SCAN_LIMIT = 100_000
"""Largest batch whose failed requests a wait counts by error code (it reads
every result to do so); a larger one's summary gives the count alone."""


class UsageError(Exception):
    """Arguments that parse but do not make sense together (exit code 2)."""


class CommandFailed(Exception):
    """A command failed for a reason best told in plain words (exit code 1)."""


class WaitTimedOut(CommandFailed):
    """``--timeout`` passed before the batch was done (exit code 5)."""


_T = TypeVar("_T")
Command = Callable[[Client, argparse.Namespace, TextIO, TextIO], Awaitable[int]]


# Commands. Each prints to `out` (results) and `err` (progress, notes) and
# returns the exit code; errors propagate to main().


def generate_requests(prompts: Sequence[str]) -> list[content_pb2.GenerateContentRequest]:
    """One single-turn user request per prompt."""
    return [
        content_pb2.GenerateContentRequest(
            contents=[content_pb2.Content(role="user", parts=[content_pb2.Part(text=p)])]
        )
        for p in prompts
    ]


def embed_requests(prompts: Sequence[str]) -> list[content_pb2.EmbedContentRequest]:
    """One embedding request per prompt."""
    return [
        content_pb2.EmbedContentRequest(content=content_pb2.Content(parts=[content_pb2.Part(text=p)])) for p in prompts
    ]


async def _upload(
    client: Client,
    path: str,
    err: TextIO,
    display_name: str | None = None,
    mime_type: str = "application/jsonl",
    *,
    empty: str = "there is nothing to upload",
) -> file_pb2.File:
    size = await asyncio.to_thread(os.path.getsize, path)
    if size == 0:
        # Said here in a user's words; the server's refusal speaks of the API's messages.
        raise CommandFailed(f"{path} is empty: {empty}")
    line = LiveLine(err, every_s=10.0)
    try:
        uploaded = await client.upload_file(
            path,
            display_name=display_name,
            mime_type=mime_type,
            progress=lambda sent: line.show(TransferProgress(f"uploading {path}", sent, size)),
        )
    except Unimplemented as exc:
        raise CommandFailed(
            "this server does not accept files (UNIMPLEMENTED); send inline requests with --prompt instead"
        ) from exc
    finally:
        line.close()
    return uploaded


async def cmd_submit(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    prompts: list[str] = args.prompt or []
    if bool(prompts) == bool(args.jsonl):
        raise UsageError("give either --prompt (one or more) or a JSONL file, not both or neither")
    file_name = (
        (await _upload(client, args.jsonl, err, empty="a batch file holds one JSON request per line")).name
        if args.jsonl
        else None
    )
    if file_name is not None:
        err.write(f"uploaded {args.jsonl} as {file_name}\n")
    if args.embed:
        op = await client.create_embed_batch(
            args.model,
            embed_requests(prompts) if prompts else None,
            file_name=file_name,
            display_name=args.display_name,
            priority=args.priority,
            request_id=args.request_id,
        )
    else:
        op = await client.create_generate_batch(
            args.model,
            generate_requests(prompts) if prompts else None,
            file_name=file_name,
            display_name=args.display_name,
            priority=args.priority,
            request_id=args.request_id,
        )
    if not args.wait:
        _print_batch(op, args, out)
        return 0
    if args.jsonl:
        # A file batch's results come back as a file: fetch it rather than
        # streaming a million lines to the terminal. A cancelled or expired
        # batch has one too, with what finished.
        await wait_with_progress(op, args.timeout, err, args)
        batch = op.metadata
        if batch is not None and batch.output.WhichOneof("output") == "responses_file":
            dest = args.output or f"{os.path.splitext(args.jsonl)[0]}.results.jsonl"
            await _download(client, batch.output.responses_file, dest, err)
        if args.json:
            _print_batch(op, args, out)
        return _conclude(op, await _failure_codes(client, op), args, out, err)
    return await _finish(client, op, args, out, err, print_results=True)


async def _download(client: Client, name: str, dest: str, err: TextIO) -> None:
    line = LiveLine(err, every_s=10.0)
    try:
        size = await client.download_file(
            name, dest, progress=lambda n: line.show(TransferProgress(f"downloading {name}", n))
        )
    finally:
        line.close()
    err.write(f"wrote {size:,} bytes to {dest}\n")


async def _finish(
    client: Client, op: BatchOperation, args: argparse.Namespace, out: TextIO, err: TextIO, *, print_results: bool
) -> int:
    """Waits with progress, prints the results (``print_results``, human
    output, SUCCEEDED) or the batch (``--json``), then the summary; returns
    the exit code the summary calls for."""
    await wait_with_progress(op, args.timeout, err, args)
    if print_results and not args.json and op.state == batch_pb2.BATCH_STATE_SUCCEEDED:
        codes: Counter[str] = Counter()
        async for result in client.stream_results(op.name):
            out.write(display.result_line(result) + "\n")
            if result.WhichOneof("result") == "error":
                codes[display.code_name(result.error.code)] += 1
        failed_by_code: Counter[str] | None = codes
    else:
        if args.json:
            _print_batch(op, args, out)
        failed_by_code = await _failure_codes(client, op)
    return _conclude(op, failed_by_code, args, out, err)


async def _failure_codes(client: Client, op: BatchOperation) -> Counter[str] | None:
    """How many failed requests of the done batch had each error code; None
    when none failed or the batch is too large to read for it."""
    stats = op.stats
    if stats is None or not stats.failed_request_count or stats.request_count > SUMMARY_SCAN_LIMIT:
        return None
    codes: Counter[str] = Counter()
    async for result in client.stream_results(op.name):
        if result.WhichOneof("result") == "error":
            codes[display.code_name(result.error.code)] += 1
    return codes


def _conclude(
    op: BatchOperation, failed_by_code: Counter[str] | None, args: argparse.Namespace, out: TextIO, err: TextIO
) -> int:
    """Prints the summary of a done batch (to stdout, or stderr when stdout
    carries JSON) and returns the exit code it calls for."""
    batch = op.metadata
    if batch is None:
        raise CommandFailed(f"{op.name} is done but the server sent no batch with it")
    error = op.operation.error if op.operation.HasField("error") else None
    if failed_by_code is not None:
        # Results of requests cancelled or expired read as errors too; they
        # are counted apart, not as failures.
        failed_by_code = failed_by_code.copy()
        failed_by_code.subtract({"CANCELLED": batch.batch_stats.cancelled_request_count,
                                 "DEADLINE_EXCEEDED": batch.batch_stats.expired_request_count})
        failed_by_code = +failed_by_code
    summary = display.summary_line(op.name, batch, failed_by_code, error)
    (err if args.json else out).write(summary + "\n")
    if batch.state == batch_pb2.BATCH_STATE_FAILED and error is not None:
        for field, description in BatchFailed(error, batch).field_violations:
            if description not in summary:
                err.write(f"  {field}: {description}\n")
    if batch.state != batch_pb2.BATCH_STATE_SUCCEEDED:
        return EXIT_BATCH_NOT_SUCCEEDED
    return EXIT_REQUESTS_FAILED if batch.batch_stats.failed_request_count else EXIT_OK


async def wait_with_progress(
    op: BatchOperation, limit_s: float | None, err: TextIO, args: argparse.Namespace | None = None
) -> None:
    """Waits for ``op`` to be done, showing a progress line on ``err``.

    ``args.waiting_for`` names the batch while the wait lasts, so that an
    interrupt can say which batch keeps running.

    Raises:
        WaitTimedOut: ``limit_s`` seconds passed first.
    """
    line = LiveLine(err)
    meter = RateMeter()
    loop = asyncio.get_running_loop()
    if args is not None:
        args.waiting_for = op.name
    try:
        async with asyncio.timeout(limit_s):
            async for batch in op.watch(interval=1.0):
                finished, total = display.answered_count(batch), batch.batch_stats.request_count
                meter.add(loop.time(), finished)
                rate = meter.rate() if batch.state == batch_pb2.BATCH_STATE_RUNNING else None
                eta = (total - finished) / rate if rate else None
                progress = display.batch_progress(op.name, batch, rate, eta)
                line.show(progress, key=(progress.state, progress.validating))
    except TimeoutError as exc:
        state = display.state_name(op.state)
        raise WaitTimedOut(f"timed out after {limit_s:g} s; {op.name} is still {state} and keeps running") from exc
    finally:
        line.close()
    if args is not None:
        args.waiting_for = None


async def cmd_wait(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return await _finish(client, await client.get_operation(args.name), args, out, err, print_results=False)


def _op_json(op: BatchOperation, args: argparse.Namespace) -> str:
    """The operation as proto JSON, its inline responses left out unless ``--output``."""
    with_output = getattr(args, "with_output", False)  # submit has no such flag
    return display.to_json(op.operation if with_output else display.without_output(op.operation))


def _print_batch(op: BatchOperation, args: argparse.Namespace, out: TextIO) -> None:
    out.write((_op_json(op, args) if args.json else display.format_fields(display.batch_fields(op))) + "\n")


async def cmd_get(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    op = await client.get_operation(args.name)
    _print_batch(op, args, out)
    if args.with_output and not args.json and op.done:
        async for result in client.stream_results(op.name):
            out.write(display.result_line(result) + "\n")
    return 0


async def _take(items: AsyncIterator[_T], limit: int | None) -> list[_T]:
    """The first ``limit`` items (all when None), fetching no page beyond them."""
    taken: list[_T] = []
    if limit == 0:
        return taken
    async for item in items:
        taken.append(item)
        if len(taken) == limit:
            break
    return taken


async def cmd_list(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    page_size = args.page_size or min(args.limit or 0, 1000)  # don't fetch 50 to show 3
    ops = await _take(client.list_operations(filter=args.filter, page_size=page_size), args.limit)
    if args.json:
        out.write(display.to_json_array(op.operation for op in ops) + "\n")
    elif ops:
        out.write(display.format_table(display.BATCH_HEADERS, (display.batch_row(op) for op in ops)) + "\n")
    else:
        err.write("no batches\n")
    return 0


async def cmd_cancel(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    await client.cancel_operation(args.name)
    op = await client.get_operation(args.name)
    if args.json:
        out.write(_op_json(op, args) + "\n")
    else:
        out.write(f"cancel requested: {op.name} (state: {display.state_name(op.state)})\n")
    return 0


async def cmd_delete(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    await client.delete_operation(args.name)
    out.write("{}\n" if args.json else f"deleted {args.name}\n")
    return 0


async def cmd_update(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.display_name is None and args.priority is None:
        raise UsageError("give --display-name and/or --priority")
    batch = await client.update_batch(args.name, display_name=args.display_name, priority=args.priority)
    if args.json:
        out.write(display.to_json(batch) + "\n")
    else:
        out.write(
            display.format_fields(
                [
                    ("name", batch.name),
                    ("display name", batch.display_name or "-"),
                    ("priority", str(batch.priority)),
                ]
            )
            + "\n"
        )
    return 0


async def cmd_results(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    async for result in client.stream_results(args.name, start_index=args.start):
        out.write(display.result_json(result) + "\n")
    return 0


async def cmd_models(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    models = await client.list_models()
    if args.json:
        out.write(display.to_json_array(models) + "\n")
    else:
        out.write(display.format_table(display.MODEL_HEADERS, (display.model_row(m) for m in models)) + "\n")
    return 0


async def cmd_usage(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    usage = await client.get_usage()
    if args.json:
        out.write(display.to_json(usage) + "\n")
        return 0
    rows = []
    for q in usage.quotas:
        limit = "unlimited" if q.unlimited else f"{q.limit:,}"
        if q.HasField("window"):
            limit += f" per {q.window.ToTimedelta().total_seconds():g}s"
        rows.append([q.name, f"{q.used:,}", limit, q.description])
    out.write(f"tenant: {usage.tenant}\n")
    out.write(display.format_table(("QUOTA", "USED", "LIMIT", "WHAT"), rows) + "\n")
    return 0


async def cmd_files_upload(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    _print_file(await _upload(client, args.path, err, args.display_name, args.mime_type), args, out)
    return 0


def _print_file(file: file_pb2.File, args: argparse.Namespace, out: TextIO) -> None:
    out.write((display.to_json(file) if args.json else display.format_fields(display.file_fields(file))) + "\n")


async def cmd_files_get(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    _print_file(await client.get_file(args.name), args, out)
    return 0


async def cmd_files_list(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    page_size = args.page_size or min(args.limit or 0, 1000)
    files = await _take(client.list_files(page_size=page_size), args.limit)
    if args.json:
        out.write(display.to_json_array(files) + "\n")
    elif files:
        out.write(display.format_table(display.FILE_HEADERS, (display.file_row(f) for f in files)) + "\n")
    else:
        err.write("no files\n")
    return 0


async def cmd_files_delete(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    await client.delete_file(args.name)
    out.write("{}\n" if args.json else f"deleted {args.name}\n")
    return 0


async def cmd_files_download(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.dest == "-":
        out.flush()
        async for chunk in client.iter_file(args.name):
            out.buffer.write(chunk)
        out.buffer.flush()
        return 0
    await _download(client, args.name, args.dest, err)
    return 0


# Argument parsing.


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Adds --target, the credentials and TLS options, and --json; without
    defaults for subcommands, so that the options work before or after the
    subcommand name."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    def shown(text: str) -> str:
        return text if defaults else argparse.SUPPRESS

    env = os.environ.get
    parser.add_argument(
        "--target",
        default=default(env("LONGBATCH_TARGET") or DEFAULT_TARGET),
        help=shown("server host:port (env LONGBATCH_TARGET, default %(default)s)"),
    )
    parser.add_argument(
        "--api-key",
        default=default(env("LONGBATCH_API_KEY")),
        help=shown("API key sent as x-goog-api-key (env LONGBATCH_API_KEY); on the command line other local "
                   "users can read it (ps): prefer the variable or --api-key-file"),
    )
    parser.add_argument(
        "--api-key-file",
        default=default(env("LONGBATCH_API_KEY_FILE")),
        metavar="PATH",
        help=shown("read the API key from this file (env LONGBATCH_API_KEY_FILE)"),
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=default(env("LONGBATCH_TLS", "") in ("1", "true")),
        help=shown("connect over TLS, trusting the system's CAs (env LONGBATCH_TLS=1); --ca, --cert and --key "
                   "imply it"),
    )
    parser.add_argument(
        "--ca",
        default=default(env("LONGBATCH_CA")),
        metavar="PEM",
        help=shown("trust this CA for the server's certificate (env LONGBATCH_CA)"),
    )
    parser.add_argument(
        "--cert",
        default=default(env("LONGBATCH_CERT")),
        metavar="PEM",
        help=shown("client certificate, for a server that requires mTLS (env LONGBATCH_CERT)"),
    )
    parser.add_argument(
        "--key",
        default=default(env("LONGBATCH_KEY")),
        metavar="PEM",
        help=shown("the client certificate's private key (env LONGBATCH_KEY)"),
    )
    parser.add_argument(
        "--tls-server-name",
        default=default(env("LONGBATCH_TLS_SERVER_NAME")),
        metavar="NAME",
        help=shown("check the server's certificate for NAME instead of the target's host "
                   "(env LONGBATCH_TLS_SERVER_NAME)"),
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON for scripts (proto JSON; results as JSON lines)" if defaults else argparse.SUPPRESS,
    )


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Builds the ``longbatch`` argument parser (``serve`` is dispatched before it)."""
    parser = argparse.ArgumentParser(
        prog="longbatch",
        description="Submit and follow model request batches on a longbatch server. "
        "`longbatch serve --help` runs a server.",
    )
    _global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str,
        handler: Command,
        summary: str,
        into: argparse._SubParsersAction[argparse.ArgumentParser] = commands,
    ) -> argparse.ArgumentParser:
        sub = into.add_parser(name, parents=[common], help=summary, description=summary)
        sub.set_defaults(handler=handler)
        return sub

    def waiting(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--timeout",
            type=_positive_float,
            default=None,
            metavar="S",
            help="give up after S seconds (exit 5; the batch keeps running); default: wait as long as it takes",
        )

    def with_output(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--output",
            dest="with_output",
            action="store_true",
            help="include the batch's inline responses (left out by default; `results` reads them line by line)",
        )

    submit = command("submit", cmd_submit, "create a batch from prompts or a JSONL file")
    submit.add_argument("jsonl", nargs="?", help='JSONL file of {"key", "request"} lines, uploaded first')
    submit.add_argument("--model", default="models/echo", help="model to run (default %(default)s)")
    submit.add_argument("--prompt", action="append", metavar="TEXT", help="one request per --prompt")
    submit.add_argument("--embed", action="store_true", help="make an embedding batch")
    submit.add_argument("--display-name", default="")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    submit.add_argument("--request-id", default="", help="idempotency key: resubmitting returns the same batch")
    submit.add_argument(
        "--wait", action="store_true", help="wait with progress, then print the results and a summary (exit codes 3-5)"
    )
    submit.add_argument(
        "--output", metavar="PATH", help="with a JSONL file and --wait: where to download the results "
        "(default: next to the input, as NAME.results.jsonl)"
    )
    waiting(submit)

    get = command("get", cmd_get, "show a batch")
    get.add_argument("name", help="batches/{id}")
    with_output(get)

    listing = command("list", cmd_list, "list batches, newest first")
    listing.add_argument("--filter", default="", help="AIP-160 filter, e.g. 'state = BATCH_STATE_RUNNING'")
    listing.add_argument("--page-size", type=_non_negative_int, default=0, metavar="N")
    listing.add_argument("--limit", type=_non_negative_int, default=None, metavar="N", help="show at most N")

    wait = command("wait", cmd_wait, "wait for a batch with a live progress bar, then print a summary")
    wait.add_argument("name", help="batches/{id}")
    waiting(wait)
    with_output(wait)

    command("cancel", cmd_cancel, "cancel a pending or running batch").add_argument("name", help="batches/{id}")
    command("delete", cmd_delete, "delete a finished batch and its results").add_argument("name", help="batches/{id}")

    update = command("update", cmd_update, "change a batch's display name or priority")
    update.add_argument("name", help="batches/{id}")
    update.add_argument("--display-name", default=None)
    update.add_argument("--priority", type=int, default=None)

    results = command(
        "results", cmd_results, 'print finished results as JSON lines {"index", "key", "response"|"error"}, in order'
    )
    results.add_argument("name", help="batches/{id}")
    results.add_argument("--start", type=_non_negative_int, default=0, metavar="N", help="first input index")

    command("models", cmd_models, "list the models the server serves")
    command("usage", cmd_usage, "show your quotas and what you use of them")

    files = commands.add_parser(
        "files",
        parents=[common],
        help="upload, list, get, delete and download files",
        description="upload, list, get, delete and download files",
    )
    file_commands = files.add_subparsers(dest="files_command", metavar="COMMAND", required=True)
    upload = command("upload", cmd_files_upload, "upload a file", file_commands)
    upload.add_argument("path")
    upload.add_argument("--display-name", default=None, help="default: the file's base name")
    upload.add_argument("--mime-type", default="application/jsonl")
    files_list = command("list", cmd_files_list, "list files, newest first", file_commands)
    files_list.add_argument("--page-size", type=_non_negative_int, default=0, metavar="N")
    files_list.add_argument("--limit", type=_non_negative_int, default=None, metavar="N", help="show at most N")
    command("get", cmd_files_get, "show a file", file_commands).add_argument("name", help="files/{id}")
    command("delete", cmd_files_delete, "delete a file", file_commands).add_argument("name", help="files/{id}")
    download = command("download", cmd_files_download, "download a file", file_commands)
    download.add_argument("name", help="files/{id}")
    download.add_argument("dest", help="local path, or - for stdout")

    # Dispatched by main() before parsing; listed here so that --help shows it.
    commands.add_parser(
        "serve", help="run a longbatch server (`longbatch serve --help` lists its options)", add_help=False
    ).set_defaults(handler=None)
    return parser


# Entry point.


def print_error(
    error: LongbatchError, err: TextIO, *, target: str = "", api_key: str | None = None, tls: bool = False
) -> None:
    """Prints ``error: CODE: message``, the field violations and a hint where one helps."""
    err.write(f"error: {error}\n")
    for field, description in error.field_violations:
        if description not in str(error):  # the message often says it already (a filter error, say)
            err.write(f"  {field}: {description}\n")
    text = str(error).lower()
    if error.code.name == "UNAVAILABLE" and any(word in text for word in ("ssl", "handshake", "certificate", "tls")):
        err.write("  (the TLS handshake failed: check --ca, and --cert/--key if the server requires mTLS)\n")
    elif error.code.name == "UNAVAILABLE" and target:
        hint = "" if tls else "; if it serves TLS, pass --tls or --ca"
        err.write(f"  (is a longbatch server running at {target}?{hint})\n")
    elif error.code.name == "UNAUTHENTICATED" and not api_key:
        err.write("  (pass --api-key-file, or set LONGBATCH_API_KEY)\n")


async def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    handler: Command | None = args.handler
    if handler is None:
        raise UsageError("serve takes its own options and comes first: longbatch serve [--port N] …")
    api_key = _api_key(args)
    args.api_key = api_key  # for the hints of print_error
    async with Client(args.target, api_key=api_key, tls=_tls(args)) as client:
        return await handler(client, args, out, err)


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key or --api-key-file (one of them)."""
    if args.api_key_file is None:
        return args.api_key or None
    if args.api_key:
        raise UsageError("give --api-key or --api-key-file, not both (LONGBATCH_API_KEY counts as --api-key)")
    try:
        with open(args.api_key_file, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CommandFailed(f"cannot read the API key file {args.api_key_file}: {getattr(e, 'strerror', None) or e}"
                            ) from e
    if not key:
        raise CommandFailed(f"the API key file {args.api_key_file} is empty")
    return key


def _tls(args: argparse.Namespace) -> bool | TlsOptions:
    """TLS as the options ask: off, the system's roots, or files."""
    if (args.cert is None) != (args.key is None):
        raise UsageError("--cert and --key go together: give both or neither")
    if args.ca is None and args.cert is None and args.tls_server_name is None:
        return bool(args.tls)
    return TlsOptions(ca=args.ca, cert=args.cert, key=args.key, server_name=args.tls_server_name)


def _serve(argv: list[str]) -> int:
    # Imported late: the client must work where only the client is installed.
    try:
        server = importlib.import_module("longbatch.server.main")
    except ModuleNotFoundError as exc:
        if exc.name not in ("longbatch.server", "longbatch.server.main"):
            raise
        sys.stderr.write("error: the longbatch server is not installed here\n")
        return EXIT_FAILURE
    return int(server.main(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``longbatch`` command line and returns its exit code.

    Args:
        argv: The arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    out, err = sys.stdout, sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return asyncio.run(_run(args, out, err))
    except KeyboardInterrupt:
        if (name := getattr(args, "waiting_for", None)) is not None:
            err.write(f"interrupted: {name} keeps running on the server; `longbatch wait {name}` follows it "
                      f"again, `longbatch cancel {name}` stops it\n")
        return EXIT_INTERRUPTED
    except WaitTimedOut as error:
        err.write(f"error: {error}\n")
        return EXIT_TIMEOUT
    except LongbatchError as error:
        print_error(error, err, target=args.target, api_key=args.api_key,
                    tls=bool(args.tls or args.ca or args.cert))
    except UsageError as error:
        err.write(f"error: {error}\n")
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`longbatch results x | head`): stop quietly, and
        # point stdout at devnull so the interpreter's final flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (CommandFailed, OSError, ValueError) as error:
        err.write(f"error: {error}\n")
    return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
