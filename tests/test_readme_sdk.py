"""The README's "Use it from the google-genai SDK" section, run as written
(the Python example and the curl script) against a real server."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from conftest import ServerHandle

from support import run_process

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULT_URL = "http://127.0.0.1:8080"


def _section() -> str:
    text = README.read_text()
    return text[text.index("## Use it from the google-genai SDK"):text.index("## What the server promises")]


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```$", _section(), re.MULTILINE | re.DOTALL)


async def test_the_python_example_prints_what_the_readme_says(server: ServerHandle, tmp_path: Path) -> None:
    (code,) = _blocks("python")
    assert DEFAULT_URL in code
    script = tmp_path / "example.py"
    script.write_text(code.replace(DEFAULT_URL, server.http))
    status, out, err = await run_process(sys.executable, "-W", "ignore", str(script), within=60, cwd=tmp_path)
    assert status == 0, err
    printed = re.search(r"^prints\n\n```\n(.*?)^```$", _section(), re.MULTILINE | re.DOTALL)
    assert printed is not None
    assert out == printed[1]


async def test_the_curl_script_runs(server: ServerHandle, tmp_path: Path) -> None:
    (script,) = _blocks("sh")
    assert DEFAULT_URL in script
    status, out, err = await run_process("bash", "-e", "-o", "pipefail", "-c", script.replace(DEFAULT_URL, server.http),
                                         within=60, cwd=tmp_path)
    assert status == 0, err
    last = json.loads(out.splitlines()[-1])
    assert last["key"] == "a"
    assert last["response"]["candidates"][0]["content"]["parts"][0]["text"] == "from a file"
    assert '"displayName":"curl-demo"' in out  # the get and the list printed the batch
    assert '"error"' not in out
