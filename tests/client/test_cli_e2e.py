"""The ``longbatch`` CLI end to end against a real server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from longbatch.client.cli import main

from support import Stubs, wait_done


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
    assert "hello there" in out and "second" in out
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
    assert [int(r.get("index", 0)) for r in rows] == [0, 1]  # proto JSON: int64 as a string, 0 omitted

    assert (await run_cli(capsys, server.target, "delete", name))[0] == 0
    code, _, err = await run_cli(capsys, server.target, "get", name)
    assert code == 1 and "NOT_FOUND" in err and "Traceback" not in err


async def test_submit_jsonl_file_downloads_results(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(
        json.dumps({"key": f"row-{i}", "request": {"contents": [{"parts": [{"text": f"question {i}"}]}]}}) + "\n"
        for i in range(500)
    ))
    code, _, err = await run_cli(capsys, server.target, "submit", str(requests), "--model", "models/echo", "--wait")
    assert code == 0, err
    assert "uploaded" in err and "wrote" in err
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
    code, out, _ = await run_cli(capsys, server.target, "models")
    assert code == 0 and "models/echo-slow" in out
