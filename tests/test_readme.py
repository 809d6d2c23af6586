"""The README's walk-through, run command by command against a real server.

Each ```console block of the walk-through is a transcript: ``$ command``
lines (continued while a line ends in a backslash or a quote is open), then
what the command prints on stdout. ``…`` stands for any text, ``batches/ID``
for the name the demo batch got, and runs of spaces compare equal whatever
their length (tables pad to their widest cell). ``# exit status N`` on a
command says its exit status; otherwise it is 0.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sysconfig.get_path("scripts"))


@dataclass
class Step:
    """One command of a transcript and what the README says it prints."""

    command: str
    expected: list[str]
    status: int


def walk_through() -> list[Step]:
    """The steps of every console block between "## Walk-through" and the grpcurl paragraph."""
    text = README.read_text()
    section = text[text.index("## Walk-through"):text.index("The same with [grpcurl]")]
    blocks = re.findall(r"^```console\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 2, "the walk-through and the JSONL file transcripts"
    return [step for block in blocks for step in parse(block.splitlines())]


def _complete(command: str) -> bool:
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command, comments=True)
    except ValueError:  # a quote still open: the command goes on
        return False
    return True


def parse(lines: list[str]) -> list[Step]:
    """The steps of one transcript."""
    steps: list[Step] = []
    i = 0
    while i < len(lines):
        assert lines[i].startswith("$ "), f"a transcript line outside a command's output: {lines[i]!r}"
        command = lines[i][2:]
        while not _complete(command):
            i += 1
            command += "\n" + lines[i]
        i += 1
        expected = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        status = re.search(r"# exit status (\d+)", command)
        steps.append(Step(command, expected, int(status[1]) if status else 0))
    return steps


def matches(expected: str, actual: str) -> bool:
    """Whether an output line is what the README shows: ``…`` for any text, spaces runs alike."""
    pattern = ".*?".join(re.escape(part) for part in " ".join(expected.split()).split("…"))
    return re.fullmatch(pattern, " ".join(actual.split())) is not None


def test_transcripts_parse_and_match() -> None:
    steps = parse(["$ a 'b", "c' \\", "  d", "out 1", "$ e  # exit status 4", "x"])
    assert [(s.command, s.expected, s.status) for s in steps] == [
        ("a 'b\nc' \\\n  d", ["out 1"], 0), ("e  # exit status 4", ["x"], 4)]
    assert matches("NAME   SIZE  …  DISPLAY NAME", "NAME SIZE 12 3 DISPLAY   NAME")
    assert not matches("state: RUNNING", "state: PENDING")


def test_the_readme_links_only_to_files_in_the_repository() -> None:
    for doc in (README, ROOT / "docs" / "reference.md"):
        text = doc.read_text()
        assert "../shared" not in text
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+://", target):
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, not in the repository"
    assert "](docs/reference.md" in README.read_text()


async def _run(command: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.timeout(400)
async def test_the_walk_through_prints_what_the_readme_says(tmp_path: Path) -> None:
    steps = walk_through()
    assert len(steps) >= 10
    server = await asyncio.create_subprocess_exec(
        str(BIN / "longbatch"), "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert server.stdout is not None
        listening = (await asyncio.wait_for(server.stdout.readline(), 30)).decode()
        assert re.fullmatch(r"longbatch listening on 127\.0\.0\.1:\d+\n", listening), listening
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "LONGBATCH_TARGET": listening.split()[-1]}
        env.pop("LONGBATCH_API_KEY", None)
        name: str | None = None
        for step in steps:
            command = step.command.replace("batches/ID", name or "batches/ID")
            code, out, err = await _run(command, tmp_path, env)
            assert "Traceback" not in err, (command, err)
            lines = out.splitlines()
            if name is None and any("batches/ID" in line for line in step.expected):
                # The step that makes the demo batch tells its name.
                found = re.search(r"^name:\s+(batches/\S+)$", out, re.MULTILINE)
                assert found is not None, (command, out)
                name = found[1]
            expected = [line.replace("batches/ID", name) if name else line for line in step.expected]
            assert code == step.status, (command, code, err)
            assert len(lines) == len(expected), (command, lines, expected)
            for want, got in zip(expected, lines, strict=True):
                assert matches(want, got), (command, want, got)
    finally:
        if server.returncode is None:
            server.terminate()
            await asyncio.wait_for(server.wait(), 30)
