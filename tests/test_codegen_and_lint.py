"""Repository checks: generated code is current, buf lint, ruff and mypy pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import tool

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_generated_code_is_current() -> None:
    result = _run(sys.executable, "tools/genproto.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint() -> None:
    buf = tool("buf")
    assert buf, "buf is missing: pip install -e '.[dev]' (buf-bin)"
    assert _run(sys.executable, "tools/genproto.py", "--buf-deps").returncode == 0
    result = _run(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff() -> None:
    result = _run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_mypy_strict() -> None:
    result = _run(sys.executable, "tools/typecheck.py")
    assert result.returncode == 0, result.stdout + result.stderr
