from __future__ import annotations

import io
import socket
import types
from collections.abc import AsyncIterator

import pytest
from google.longrunning import operations_pb2
from google.rpc import code_pb2, status_pb2

from longbatch.client import cli, display
from longbatch.client.operation import BatchOperation
from longbatch.client.progress import (
    LiveLine,
    RateMeter,
    format_bytes,
    format_duration,
    render_bar,
    render_progress,
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


def test_render_progress_line() -> None:
    line = render_progress("batches/x", "RUNNING", 3412, 5000, rate=1234.4, eta_s=1.6)
    assert line == "batches/x  RUNNING  [########----]  3,412/5,000  68%  1,234 req/s  ETA 2s"


def test_render_progress_without_rate() -> None:
    assert render_progress("batches/x", "PENDING", 0, 0) == "batches/x  PENDING  [------------]  0/0  0%"
    assert render_progress("batches/x", "SUCCEEDED", 5, 5).endswith("[############]  5/5  100%")


def test_render_bar_is_full_only_when_done() -> None:
    assert render_bar(999, 1000) == "[" + "#" * 11 + "-]"
    assert render_bar(1000, 1000) == "[" + "#" * 12 + "]"
    assert render_bar(1, 2, width=4) == "[##--]"


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


def test_live_line_redraws_in_place_on_a_tty() -> None:
    stream = io.StringIO()
    line = LiveLine(stream, tty=True)
    line.show("a long first line")
    line.show("short")
    line.close()
    assert stream.getvalue() == "\ra long first line" + "\rshort" + " " * 12 + "\n"


def test_live_line_writes_plain_lines_elsewhere() -> None:
    now = [0.0]
    stream = io.StringIO()
    line = LiveLine(stream, tty=False, every_s=10, clock=lambda: now[0])
    line.show("p0", key="PENDING")
    line.show("r1", key="RUNNING")  # state changed: written at once
    now[0] = 5
    line.show("r2", key="RUNNING")  # held back
    now[0] = 11
    line.show("r3", key="RUNNING")  # period passed
    now[0] = 12
    line.show("r4", key="RUNNING")  # held back, then written by close
    line.close()
    assert stream.getvalue().splitlines() == ["p0", "r1", "r3", "r4"]


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
        "3/3",
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


def test_json_line_is_one_line_proto_json() -> None:
    result = batch_pb2.BatchResult(index=4, key="k")
    assert display.to_json_line(result) == '{"index":"4","key":"k"}'


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
