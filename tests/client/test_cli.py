from __future__ import annotations

import io
import re
import socket
import types
from collections.abc import AsyncIterator

import pytest
from google.longrunning import operations_pb2
from google.rpc import code_pb2, status_pb2
from rich.console import Console

from longbatch.client import cli, display
from longbatch.client.operation import BatchOperation
from longbatch.client.progress import (
    BAR_MAX,
    BAR_MIN,
    BatchProgress,
    LiveLine,
    RateMeter,
    TransferProgress,
    format_bytes,
    format_duration,
)
from longbatch.v1 import batch_pb2, content_pb2

# Parsing.


def test_submit_prompts_and_options() -> None:
    args = cli.build_parser().parse_args(
        ["submit", "--prompt", "a", "--prompt", "b", "--priority", "5", "--request-id", "r1", "--wait"]
    )
    assert args.handler is cli.cmd_submit
    assert (args.prompt, args.priority, args.request_id, args.wait, args.embed) == (["a", "b"], 5, "r1", True, False)
    assert (args.model, args.jsonl, args.timeout) == ("models/echo", None, None)


def test_global_options_before_or_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LONGBATCH_TARGET", raising=False)
    monkeypatch.delenv("LONGBATCH_API_KEY", raising=False)
    parser = cli.build_parser()
    before = parser.parse_args(["--target", "h:1", "--api-key", "k", "--json", "get", "batches/x"])
    after = parser.parse_args(["get", "batches/x", "--target", "h:1", "--api-key", "k", "--json"])
    for args in (before, after):
        assert (args.target, args.api_key, args.json, args.name) == ("h:1", "k", True, "batches/x")
    plain = parser.parse_args(["get", "batches/x"])
    assert (plain.target, plain.api_key, plain.json) == ("127.0.0.1:50051", None, False)


def test_environment_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGBATCH_TARGET", "env-host:9")
    monkeypatch.setenv("LONGBATCH_API_KEY", "env-key")
    args = cli.build_parser().parse_args(["list", "--limit", "3"])
    assert (args.target, args.api_key, args.limit, args.filter, args.page_size) == ("env-host:9", "env-key", 3, "", 0)
    assert cli.build_parser().parse_args(["--target", "flag:1", "models"]).target == "flag:1"


def test_nested_files_commands() -> None:
    parser = cli.build_parser()
    upload = parser.parse_args(["files", "upload", "in.jsonl", "--display-name", "d", "--json"])
    assert (upload.handler, upload.path, upload.display_name, upload.json) == (
        cli.cmd_files_upload,
        "in.jsonl",
        "d",
        True,
    )
    download = parser.parse_args(["files", "download", "files/a", "-"])
    assert (download.handler, download.name, download.dest) == (cli.cmd_files_download, "files/a", "-")


def test_wait_and_results_arguments() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["wait", "batches/x", "--timeout", "2.5"]).timeout == 2.5
    assert parser.parse_args(["results", "batches/x", "--start", "7"]).start == 7


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["get"], ["wait", "batches/x", "--timeout", "-1"], ["list", "--limit", "x"], ["files"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "submit" in capsys.readouterr().out


def test_submit_needs_prompts_or_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["submit", "--target", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith("error: give either --prompt")


def test_serve_is_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setitem(__import__("sys").modules, "longbatch.server.main", types.SimpleNamespace(main=fake_main))
    assert cli.main(["serve", "--port", "0", "--allow-open"]) == 7
    assert seen == [["--port", "0", "--allow-open"]]


def test_unreachable_server_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert cli.main(["get", "batches/x", "--target", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: ")
    assert f"127.0.0.1:{port}" in err
    assert "Traceback" not in err


def test_print_error_lists_field_violations() -> None:
    from longbatch.client.errors import InvalidArgument

    stream = io.StringIO()
    cli.print_error(InvalidArgument("bad batch", field_violations=[("batch.model", "required")]), stream)
    assert stream.getvalue() == "error: INVALID_ARGUMENT: bad batch\n  batch.model: required\n"


def test_prompts_become_requests() -> None:
    [generate] = cli.generate_requests(["hi"])
    assert generate.contents[0].role == "user" and generate.contents[0].parts[0].text == "hi"
    [embed] = cli.embed_requests(["hi"])
    assert embed.content.parts[0].text == "hi"


# Progress rendering.

NAME = "batches/lmjecex1l7qdgtztlsy69a"  # as long as a real one
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def rendered(line: object, width: int) -> str:
    """``line`` as a terminal of ``width`` columns shows it (without colours)."""
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    console.print(line)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert out.endswith("\n") and out.count("\n") == 1, repr(out)  # one line, never wrapped
    return str(out[:-1])


def test_progress_line_at_80_columns_keeps_counts_rate_and_eta() -> None:
    line = rendered(BatchProgress(NAME, "RUNNING", 3412, 5000, rate=1234.4, eta_s=1.6), 80)
    assert len(line) <= 80
    # The name goes first (the summary names the batch); the bar takes what is left.
    assert re.fullmatch(r"RUNNING  [━╸╺]+ *  3,412/5,000  68%  1,234 req/s  ETA 2s", line), line
    assert line.count("━") >= 10


def test_progress_line_at_60_columns() -> None:
    line = rendered(BatchProgress(NAME, "RUNNING", 3412, 5000, rate=1234.4, eta_s=1.6), 60)
    assert len(line) <= 60
    assert re.fullmatch(r"RUNNING  [━╸╺]+ *  3,412/5,000  68%  1,234 req/s  ETA 2s", line), line
    # Larger counts: the rate goes before the bar, the ETA and the percentage.
    line = rendered(BatchProgress(NAME, "RUNNING", 412_345, 1_000_000, rate=12_345.6, eta_s=65), 60)
    assert len(line) <= 60
    match = re.fullmatch(r"RUNNING  (.+)  412,345/1,000,000  41%  ETA 1m05s", line)
    assert match is not None, line
    assert len(match[1]) >= BAR_MIN and not match[1].strip("━╸╺ ")  # the bar, drawn and not


def test_progress_line_on_a_wide_terminal_has_everything() -> None:
    line = rendered(BatchProgress(NAME, "RUNNING", 3412, 5000, rate=1234.4, eta_s=1.6), 160)
    assert line.startswith(f"{NAME}  RUNNING  ━")
    assert line.endswith("3,412/5,000  68%  1,234 req/s  ETA 2s")
    assert len(line) <= NAME.__len__() + 2 + 7 + 2 + BAR_MAX + 2 + 11 + 2 + 3 + 2 + 11 + 2 + 6


@pytest.mark.parametrize("width", [20, 30, 40])
def test_progress_line_on_a_narrow_terminal_keeps_state_and_counts(width: int) -> None:
    line = rendered(BatchProgress(NAME, "RUNNING", 3412, 5000, rate=1234.4, eta_s=1.6), width)
    assert len(line) <= width and line.startswith("RUNNING  3,412/5,000"), line


def test_plain_progress_line() -> None:
    progress = BatchProgress("batches/x", "RUNNING", 3412, 5000, rate=1234.4, eta_s=1.6)
    assert progress.plain() == "batches/x  RUNNING  3,412/5,000  68%  1,234 req/s  ETA 2s"
    assert BatchProgress("batches/x", "SUCCEEDED", 5, 5).plain() == "batches/x  SUCCEEDED  5/5  100%"
    assert BatchProgress("b", "SUCCEEDED", 1, 1, failed=1).plain() == "b  SUCCEEDED  1/1  100%  1 failed"
    assert BatchProgress("b", "CANCELLED", 3, 9, failed=2).plain() == "b  CANCELLED  3/9 finished  2 failed"


def test_a_cancelled_batch_never_shows_a_percentage_or_a_bar() -> None:
    # Every request is done (answered or cancelled), but not all were answered.
    cancelled = BatchProgress("batches/x", "CANCELLED", 160, 500)
    assert cancelled.plain() == "batches/x  CANCELLED  160/500 finished"
    for width in (60, 80):
        line = rendered(cancelled, width)
        assert "%" not in line and "━" not in line
    assert "%" not in BatchProgress("batches/x", "EXPIRED", 500, 500).plain()
    assert BatchProgress("batches/x", "FAILED", 0, 0).plain() == "batches/x  FAILED"  # failed before it was read


def test_a_file_batch_being_read_says_so() -> None:
    progress = BatchProgress("batches/x", "PENDING", 0, 0, validating=True)
    assert progress.plain() == "batches/x  PENDING  validating input"
    assert rendered(progress, 60) == "batches/x  PENDING  validating input"  # the name fits


def test_transfer_progress() -> None:
    assert TransferProgress("uploading a.jsonl", 1536, 3072).plain() == "uploading a.jsonl  1.5 KiB/3.0 KiB  50%"
    assert TransferProgress("downloading files/x", 512).plain() == "downloading files/x  512 B"
    line = rendered(TransferProgress("uploading a.jsonl", 1536, 3072), 60)
    assert len(line) <= 60 and line.startswith("uploading a.jsonl  ━") and line.endswith("1.5 KiB/3.0 KiB  50%")


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (185, "3m05s"), (7620, "2h07m"), (-3, "0s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 B"), (512, "512 B"), (1536, "1.5 KiB"), (12_900_000, "12.3 MiB"), (3 << 40, "3072.0 GiB")]
)
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


def test_rate_meter_uses_a_sliding_window() -> None:
    meter = RateMeter(window_s=10)
    assert meter.rate() is None
    meter.add(0.0, 0)
    meter.add(0.2, 50)
    assert meter.rate() is None  # too short a span to tell
    meter.add(1.0, 100)
    assert meter.rate() == pytest.approx(100.0)
    for t in range(2, 30):
        meter.add(float(t), 100 + (t - 1) * 10)  # slows to 10/s
    assert meter.rate() == pytest.approx(10.0)


@pytest.mark.parametrize("width", [60, 80])
def test_live_line_redraws_one_line_in_place_on_a_terminal(width: int) -> None:
    stream = io.StringIO()
    console = Console(file=stream, width=width, force_terminal=True, color_system=None)
    line = LiveLine(stream, live=True, console=console)
    for done in (0, 1200, 3412, 5000):
        line.show(BatchProgress(NAME, "RUNNING", done, 5000, rate=1234.4, eta_s=(5000 - done) / 1234.4))
    line.close()
    out = stream.getvalue()
    # Each redraw returns to the start of the line and clears it; none moves
    # down a line, so nothing is left behind, and close() clears the last.
    frames = [ANSI.sub("", frame) for frame in out.split("\r")]
    drawn = [f for f in frames if f.strip()]
    assert len(drawn) == 5  # the four, and the last again as it stops
    assert all(len(f.rstrip("\n")) <= width for f in drawn)
    assert all("\n" not in f for f in drawn[:-1])
    assert "5,000/5,000  100%" in drawn[-1]
    # Stopping moves back up over the line and clears it: the summary takes its place.
    assert out.endswith("\n\x1b[?25h\r\x1b[1A\x1b[2K")


def test_live_line_writes_plain_lines_elsewhere() -> None:
    now = [0.0]
    stream = io.StringIO()
    line = LiveLine(stream, live=False, every_s=10, clock=lambda: now[0])

    def show(done: int, state: str = "RUNNING") -> None:
        line.show(BatchProgress("b", state, done, 9), key=state)

    show(0, "PENDING")
    show(1)  # state changed: written at once
    now[0] = 5
    show(2)  # held back
    now[0] = 11
    show(3)  # period passed
    now[0] = 12
    show(4)  # held back, then written by close
    line.close()
    assert stream.getvalue().splitlines() == [
        "b  PENDING  0/9  0%", "b  RUNNING  1/9  11%", "b  RUNNING  3/9  33%", "b  RUNNING  4/9  44%"
    ]


def test_live_line_is_plain_when_the_stream_is_no_terminal() -> None:
    stream = io.StringIO()
    line = LiveLine(stream)
    line.show(BatchProgress("b", "RUNNING", 1, 2))
    line.close()
    assert stream.getvalue() == "b  RUNNING  1/2  50%\n"


# Human output.


def _op() -> BatchOperation:
    batch = batch_pb2.GenerateContentBatch(
        name="batches/x", model="models/echo", display_name="demo", state=batch_pb2.BATCH_STATE_CANCELLED
    )
    batch.batch_stats.request_count = 3
    batch.batch_stats.successful_request_count = 2
    batch.batch_stats.cancelled_request_count = 1
    batch.input_config.requests.requests.add().request.CopyFrom(content_pb2.GenerateContentRequest())
    batch.create_time.FromSeconds(1_700_000_000)
    op = operations_pb2.Operation(
        name="batches/x", done=True, error=status_pb2.Status(code=code_pb2.CANCELLED, message="by user")
    )
    op.metadata.Pack(batch)

    async def never() -> operations_pb2.Operation:
        raise AssertionError

    async def nothing() -> None:
        return None

    return BatchOperation(op, refresh=never, wait=None, cancel=nothing)


def test_batch_fields() -> None:
    fields = dict(display.batch_fields(_op()))
    assert fields["state"] == "CANCELLED"
    assert fields["kind"] == "generate"
    assert fields["progress"] == "2 succeeded, 1 cancelled"
    assert fields["input"] == "3 inline requests"  # counted from the stats: requests are not echoed back
    assert fields["created"] == "2023-11-14 22:13:20Z"
    assert fields["ended"] == "-"
    assert fields["error"] == "CANCELLED: by user"


def test_batch_row_and_table() -> None:
    table = display.format_table(display.BATCH_HEADERS, [display.batch_row(_op())])
    header, row = table.splitlines()
    assert header.split() == ["NAME", "KIND", "STATE", "DONE", "MODEL", "CREATED", "DISPLAY", "NAME"]
    assert row.split() == [
        "batches/x",
        "generate",
        "CANCELLED",
        "2/3",  # answered; the third was cancelled
        "models/echo",
        "2023-11-14",
        "22:13:20Z",
        "demo",
    ]
    assert header.index("STATE") == row.index("CANCELLED")


def test_format_fields_aligns() -> None:
    assert display.format_fields([("a", "1"), ("long", "2")]) == "a:     1\nlong:  2"


def test_result_lines() -> None:
    generate = batch_pb2.BatchResult(index=0, key="k1")
    generate.generate_content_response.candidates.add().content.parts.add(text="hello\nworld")
    assert display.result_line(generate) == "[0 k1] hello world"
    embed = batch_pb2.BatchResult(index=1)
    embed.embed_content_response.embedding.values.extend([0.5, -0.25, 0, 1, 2])
    assert display.result_line(embed) == "[1] embedding (5 dims): [0.5000, -0.2500, 0.0000, 1.0000, …]"
    failed = batch_pb2.BatchResult(index=2, error=status_pb2.Status(code=code_pb2.CANCELLED, message="not run"))
    assert display.result_line(failed) == "[2] error: CANCELLED: not run"


def test_results_line_format() -> None:
    first = batch_pb2.BatchResult(index=0)
    first.generate_content_response.candidates.add().content.parts.add(text="hi")
    first.metadata.update({"z": 1, "a": {"y": 2, "b": 3}})
    assert display.result_json(first) == (
        '{"index":0,"key":"0","metadata":{"a":{"b":3.0,"y":2.0},"z":1.0},'  # a Struct's numbers are doubles
        '"response":{"candidates":[{"content":{"parts":[{"text":"hi"}]}}]}}'
    )
    failed = batch_pb2.BatchResult(index=12, key="row-12",
                                   error=status_pb2.Status(code=code_pb2.UNAVAILABLE, message="down"))
    assert display.result_json(failed) == '{"index":12,"key":"row-12","error":{"code":14,"message":"down"}}'
    embed = batch_pb2.BatchResult(index=3)
    embed.embed_content_response.embedding.values.extend([0.5, -0.25])
    assert display.result_json(embed) == '{"index":3,"key":"3","response":{"embedding":{"values":[0.5,-0.25]}}}'


def _done_op(state: int, *, succeeded: int = 0, failed: int = 0, cancelled: int = 0, expired: int = 0,
             inline: int = 0) -> operations_pb2.Operation:
    batch = batch_pb2.GenerateContentBatch(name="batches/x", model="models/echo", state=state)  # type: ignore[arg-type]
    stats = batch.batch_stats
    stats.request_count = succeeded + failed + cancelled + expired
    stats.successful_request_count, stats.failed_request_count = succeeded, failed
    stats.cancelled_request_count, stats.expired_request_count = cancelled, expired
    output = batch_pb2.GenerateContentBatchOutput()
    for i in range(inline):
        output.inlined_responses.inlined_responses.add().response.candidates.add().content.parts.add(text=f"a{i}")
    if inline:
        batch.output.CopyFrom(output)
    op = operations_pb2.Operation(name="batches/x", done=True)
    op.metadata.Pack(batch)
    op.response.Pack(output)
    return op


def test_summary_lines() -> None:
    def summary(op: operations_pb2.Operation, codes: dict[str, int] | None = None) -> str:
        return display.summary_line("batches/x", display._unpack(op.metadata, display._BATCH_TYPES), codes)

    assert summary(_done_op(batch_pb2.BATCH_STATE_SUCCEEDED, succeeded=2)) == (
        "batches/x SUCCEEDED: 2 succeeded, 0 failed, 0 cancelled, 0 expired"
    )
    assert summary(_done_op(batch_pb2.BATCH_STATE_SUCCEEDED, succeeded=1000, failed=3),
                   {"INVALID_ARGUMENT": 1, "UNAVAILABLE": 2}) == (
        "batches/x SUCCEEDED: 1,000 succeeded, 3 failed (2 UNAVAILABLE, 1 INVALID_ARGUMENT), 0 cancelled, 0 expired"
    )
    assert summary(_done_op(batch_pb2.BATCH_STATE_CANCELLED, succeeded=160, cancelled=340)) == (
        "batches/x CANCELLED: 160 succeeded, 0 failed, 340 cancelled, 0 expired"
    )
    failed = _done_op(batch_pb2.BATCH_STATE_FAILED)
    batch = display._unpack(failed.metadata, display._BATCH_TYPES)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="2 bad lines")
    assert display.summary_line("batches/x", batch, None, status) == "batches/x FAILED: INVALID_ARGUMENT: 2 bad lines"


def test_json_leaves_inline_responses_out() -> None:
    op = _done_op(batch_pb2.BATCH_STATE_SUCCEEDED, succeeded=3, inline=3)
    slim = display.without_output(op)
    assert slim.response.type_url == op.response.type_url and slim.response.value == b""  # as List sends it
    batch = display._unpack(slim.metadata, display._BATCH_TYPES)
    assert not batch.HasField("output") and batch.batch_stats.successful_request_count == 3
    assert op.response.value  # the original is untouched
    # A responses file's name is no output to leave out.
    file_op = _done_op(batch_pb2.BATCH_STATE_SUCCEEDED, succeeded=3)
    output = batch_pb2.GenerateContentBatchOutput(responses_file="files/r")
    file_op.response.Pack(output)
    assert display.without_output(file_op) == file_op


def test_print_error_does_not_repeat_what_the_message_says() -> None:
    from longbatch.client.errors import InvalidArgument

    stream = io.StringIO()
    message = 'invalid filter: unknown value "SLEEPING" for field "state"'
    violation = ("filter", 'unknown value "SLEEPING" for field "state"')
    cli.print_error(InvalidArgument(message, field_violations=[violation]), stream)
    assert stream.getvalue() == f"error: INVALID_ARGUMENT: {message}\n"


def test_help_lists_serve_and_files_take_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert re.search(r"^ +serve +run a longbatch server", capsys.readouterr().out, re.MULTILINE)
    for argv in (["files", "--json", "list"], ["--json", "files", "list"], ["files", "list", "--json"]):
        assert cli.build_parser().parse_args(argv).json is True
    assert cli.main(["--json", "serve"]) == 2
    assert "longbatch serve" in capsys.readouterr().err


def test_get_and_wait_take_output() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["get", "batches/x"]).with_output is False
    assert parser.parse_args(["get", "batches/x", "--output"]).with_output is True
    assert parser.parse_args(["wait", "batches/x", "--output", "--json"]).with_output is True


async def test_take_stops_at_the_limit() -> None:
    pulled: list[int] = []

    async def numbers() -> AsyncIterator[int]:
        for n in range(10):
            pulled.append(n)
            yield n

    assert await cli._take(numbers(), 3) == [0, 1, 2]
    assert pulled == [0, 1, 2]  # nothing read past the limit
    assert await cli._take(numbers(), None) == list(range(10))
    assert await cli._take(numbers(), 0) == []
