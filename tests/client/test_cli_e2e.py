"""The ``longbatch`` CLI end to end against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from fakemodel import FakeModel, FaultPlan

from longbatch.client.cli import main
from longbatch.server.config import load_config

from support import Stubs, generate_batch, metadata_of, wait_done

ROOT = Path(__file__).resolve().parents[2]


async def run_cli(capsys: pytest.CaptureFixture[str], target: str, *args: str) -> tuple[int, str, str]:
    # main() runs its own event loop, so it goes on a thread; the server keeps
    # running on this test's loop.
    code = await asyncio.to_thread(main, ["--target", target, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_submit_prompts_wait_get_list_and_delete(server, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    code, out, err = await run_cli(capsys, server.target, "submit", "--prompt", "hello there", "--prompt", "second",
                                   "--wait")
    assert code == 0, err
    answers, summary = out.splitlines()[:2], out.splitlines()[2:]
    assert answers == ["[0] hello there", "[1] second"]
    assert len(summary) == 1
    assert summary[0].endswith(" SUCCEEDED: 2 succeeded, 0 failed, 0 cancelled, 0 expired")
    assert "SUCCEEDED" in err  # the progress line's last state

    code, out, _ = await run_cli(capsys, server.target, "--json", "list")
    assert code == 0
    listed = json.loads(out)
    assert len(listed) == 1 and listed[0]["done"] is True
    name = listed[0]["name"]

    code, out, _ = await run_cli(capsys, server.target, "get", name)
    assert code == 0 and "SUCCEEDED" in out and name in out

    code, out, _ = await run_cli(capsys, server.target, "results", name)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]  # numbers, 0 included
    assert [list(r) for r in rows] == [["index", "key", "response"]] * 2

    assert (await run_cli(capsys, server.target, "delete", name))[0] == 0
    code, _, err = await run_cli(capsys, server.target, "get", name)
    assert code == 1 and "NOT_FOUND" in err and "Traceback" not in err


async def test_submit_jsonl_file_downloads_results(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(
        json.dumps({"key": f"row-{i}", "request": {"contents": [{"parts": [{"text": f"question {i}"}]}]}}) + "\n"
        for i in range(500)
    ))
    code, out, err = await run_cli(capsys, server.target, "submit", str(requests), "--model", "models/echo", "--wait")
    assert code == 0, err
    assert "uploaded" in err and "wrote" in err
    assert out.endswith(" SUCCEEDED: 500 succeeded, 0 failed, 0 cancelled, 0 expired\n")
    results = tmp_path / "requests.results.jsonl"
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x["key"] for x in lines] == [f"row-{i}" for i in range(500)]
    assert lines[7]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "question 7"


async def test_cancel_and_errors(server, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    prompts = [arg for i in range(300) for arg in ("--prompt", f"p{i}")]
    code, out, _ = await run_cli(capsys, server.target, "--json", "submit", "--model", "models/echo-slow", *prompts)
    assert code == 0
    name = json.loads(out)["name"]
    assert (await run_cli(capsys, server.target, "cancel", name))[0] == 0
    stubs = Stubs.connect(server.target)
    try:
        op = await wait_done(stubs, name)
        assert op.error.code == 1
    finally:
        await stubs.channel.close()

    code, _, err = await run_cli(capsys, server.target, "submit", "--model", "models/nope", "--prompt", "x")
    assert code == 1 and "NOT_FOUND" in err
    code, _, err = await run_cli(capsys, server.target, "list", "--filter", "state = SLEEPING")
    assert code == 1 and "INVALID_ARGUMENT" in err and "filter" in err
    assert len(err.splitlines()) == 1, err  # said once, not again as a field violation
    code, out, _ = await run_cli(capsys, server.target, "models")
    assert code == 0 and "models/echo-slow" in out


async def test_an_all_failed_batch_is_no_success(make_server, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: the only request failed; the CLI says so and exits 3."""
    fake = FakeModel(FaultPlan(rate=1.0, faults=("400",)))  # a permanent error: no retries, no outage
    await fake.start()
    try:
        config = tmp_path / "longbatch.toml"
        config.write_text(f"""
[[models]]
name = "models/picky"
backend = "gemini-http"
base_url = "{fake.url}"
""")
        server = await make_server(load_config(config))
        code, out, err = await run_cli(capsys, server.target, "submit", "--model", "models/picky", "--prompt", "hi",
                                       "--wait")
        assert code == 3, err
        [answer, summary] = out.splitlines()
        assert answer.startswith("[0] error: INVALID_ARGUMENT: ")
        assert summary.endswith(" SUCCEEDED: 0 succeeded, 1 failed (1 INVALID_ARGUMENT), 0 cancelled, 0 expired")
        assert err.splitlines()[-1].endswith("SUCCEEDED  1/1  100%  1 failed")  # answered, and how
        name = summary.split()[0]
        code, out, err = await run_cli(capsys, server.target, "wait", name)
        assert (code, out) == (3, summary + "\n")
        code, out, err = await run_cli(capsys, server.target, "--json", "wait", name)
        assert code == 3 and json.loads(out)["done"] is True and err.endswith(summary + "\n")
    finally:
        await fake.stop()


async def test_cancelled_and_timed_out_waits_have_their_exit_codes(server, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    prompts = [arg for i in range(2000) for arg in ("--prompt", f"p{i}")]
    code, out, _ = await run_cli(capsys, server.target, "--json", "submit", "--model", "models/echo-slow", *prompts)
    name = json.loads(out)["name"]
    code, out, err = await run_cli(capsys, server.target, "wait", name, "--timeout", "0.3")
    assert code == 5 and out == ""
    assert err.splitlines()[-1] == f"error: timed out after 0.3 s; {name} is still RUNNING and keeps running"
    assert (await run_cli(capsys, server.target, "cancel", name))[0] == 0
    code, out, err = await run_cli(capsys, server.target, "wait", name)
    assert code == 4, err
    assert out.startswith(f"{name} CANCELLED: ") and out.endswith(" cancelled, 0 expired\n")
    assert " 0 failed, " in out  # cancelled requests are no failures
    last_progress = err.splitlines()[-1]
    assert "CANCELLED" in last_progress and "%" not in last_progress


async def test_json_leaves_the_output_out_unless_asked(server, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """get/wait --json of an 8,000-request batch: a few hundred bytes, not megabytes."""
    prompts = [arg for i in range(8000) for arg in ("--prompt", f"question number {i}")]
    code, out, err = await run_cli(capsys, server.target, "--json", "submit", "--wait", *prompts)
    assert code == 0, err
    submitted = json.loads(out)
    assert len(out) < 2000 and "inlinedResponses" not in out
    name = submitted["name"]
    for command in ("get", "wait"):
        code, out, _ = await run_cli(capsys, server.target, "--json", command, name)
        assert code == 0
        op = json.loads(out)
        assert len(out) < 2000, len(out)
        assert op["done"] is True and op["metadata"]["batchStats"]["successfulRequestCount"] == "8000"
        assert op["response"] == {"@type": "type.googleapis.com/longbatch.v1.GenerateContentBatchOutput"}
        assert "output" not in op["metadata"]
        code, out, _ = await run_cli(capsys, server.target, "--json", command, name, "--output")
        assert code == 0 and len(out) > 1_000_000
        assert len(json.loads(out)["response"]["inlinedResponses"]["inlinedResponses"]) == 8000
    code, out, _ = await run_cli(capsys, server.target, "get", name)
    assert "output:        8,000 inline responses" in out and len(out) < 1000


async def test_results_lines_are_the_same_from_the_cli_and_in_the_results_file(  # type: ignore[no-untyped-def]
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One results line format: `longbatch results`, the results file and docs/reference.md."""
    requests = tmp_path / "requests.jsonl"
    lines = [json.dumps({"key": f"row-{i}", "request": {"contents": [{"parts": [{"text": f"q {i} é"}]}]}})
             for i in range(300)]
    lines[7] = json.dumps({"request": {"contents": [{"parts": [{"text": "no key"}]}]}})
    requests.write_text("\n".join(lines) + "\n")
    # Cancelled while it runs: successes and errors both.
    code, out, err = await run_cli(capsys, server.target, "--json", "submit", str(requests),
                                   "--model", "models/echo-slow")
    assert code == 0, err
    name = json.loads(out)["name"]
    stubs = Stubs.connect(server.target)
    try:
        for _ in range(200):
            if (await run_cli(capsys, server.target, "results", name))[1].count("\n") >= 20:
                break
            await asyncio.sleep(0.05)
        assert (await run_cli(capsys, server.target, "cancel", name))[0] == 0
        op = await wait_done(stubs, name)
    finally:
        await stubs.channel.close()
    responses_file = metadata_of(op).output.responses_file
    assert responses_file
    code, from_cli, _ = await run_cli(capsys, server.target, "results", name)
    assert code == 0
    dest = tmp_path / "results.jsonl"
    assert (await run_cli(capsys, server.target, "files", "download", responses_file, str(dest)))[0] == 0
    in_file = dest.read_text()
    assert from_cli == in_file  # byte for byte
    rows = [json.loads(line) for line in in_file.splitlines()]
    assert [r["index"] for r in rows] == list(range(300))
    assert rows[7]["key"] == "7" and rows[8]["key"] == "row-8"
    assert {"response", "error"} <= {list(r)[2] for r in rows}
    assert all(list(r)[:2] == ["index", "key"] and list(r)[2:] in (["response"], ["error"]) for r in rows)
    # The reference shows the same line shapes.
    documented = [json.loads(line) for line in (ROOT / "docs" / "reference.md").read_text().splitlines()
                  if line.startswith('{"index": ')]
    assert len(documented) >= 2
    assert {tuple(d) for d in documented} == {("index", "key", "response"), ("index", "key", "error")}
    assert all(isinstance(d["index"], int) for d in documented)


async def test_ctrl_c_during_wait_says_the_batch_keeps_running(server) -> None:  # type: ignore[no-untyped-def]
    stubs = Stubs.connect(server.target)
    try:
        op = await stubs.batches.BatchGenerateContent(generate_batch(2000, model="models/echo-slow"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "longbatch.client.cli", "--target", server.target, "wait", op.name,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ},
        )
        assert proc.stderr is not None
        first = await asyncio.wait_for(proc.stderr.readline(), 30)  # waiting, with its first progress line
        assert op.name.encode() in first
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 130
        assert "Traceback" not in err.decode() and out == b""
        assert err.decode().splitlines()[-1] == (
            f"interrupted: {op.name} keeps running on the server; `longbatch wait {op.name}` follows it again, "
            f"`longbatch cancel {op.name}` stops it"
        )
        done = await wait_done(stubs, op.name, within=60)
        assert not done.HasField("error")  # it ran to the end
    finally:
        await stubs.channel.close()


async def test_an_empty_file_is_refused_in_plain_words(server, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    code, _, err = await run_cli(capsys, server.target, "submit", str(empty))
    assert (code, err) == (1, f"error: {empty} is empty: a batch file holds one JSON request per line\n")
    code, _, err = await run_cli(capsys, server.target, "files", "upload", str(empty))
    assert (code, err) == (1, f"error: {empty} is empty: there is nothing to upload\n")


async def test_unknown_model_points_at_longbatch_models(server, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    code, _, err = await run_cli(capsys, server.target, "submit", "--model", "models/nope", "--prompt", "x")
    assert code == 1 and "not found; see `longbatch models`" in err and "ListModels" not in err


async def test_a_file_batch_says_it_is_validating_before_it_runs(server, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    requests = tmp_path / "big.jsonl"
    requests.write_text("".join(
        json.dumps({"request": {"contents": [{"parts": [{"text": f"q{i}"}]}]}}) + "\n" for i in range(100_000)))
    code, _, err = await run_cli(capsys, server.target, "submit", str(requests), "--wait")
    assert code == 0, err
    progress = [line for line in err.splitlines() if line.startswith("batches/")]
    assert "0/0" not in err
    if progress[0].split()[1] == "PENDING":  # caught before the input was read
        assert progress[0].endswith("PENDING  validating input"), progress


async def test_a_failed_file_batch_says_why_once(server, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "a", "request": {"contents": [{"parts": [{"text": "x"}]}]}}\n'
                   '{"key": "b", "request": {"bogus": 1}}\nnot json\n')
    code, out, err = await run_cli(capsys, server.target, "submit", str(bad), "--wait")
    assert code == 4
    [summary] = out.splitlines()
    assert " FAILED: INVALID_ARGUMENT: " in summary and 'line 2: request: unknown field "bogus"' in summary
    violations = [line for line in err.splitlines() if line.startswith("  ")]
    assert len(violations) == 1 and "line 3: not valid JSON" in violations[0]  # line 2 is in the summary already
    assert err.splitlines()[-2].endswith("  FAILED")
