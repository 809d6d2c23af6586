"""``longbatch serve``: loopback-only when open, the listening line, clean SIGTERM."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from longbatch.server.main import is_loopback

from support import ServerProcess


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.com", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def _serve(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "longbatch.server.main", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_open_server_refuses_a_non_loopback_host(tmp_path: Path) -> None:
    # Nothing binds: the check comes before listening, so no traffic leaves loopback.
    code, err = await _serve("--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path))
    assert code == 2
    assert "--allow-open" in err and "api_keys" in err


async def test_listening_line_and_clean_sigterm(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    try:
        target = await server.start()
        assert target.startswith("127.0.0.1:")
        assert await server.terminate() == 0
    finally:
        await server.ensure_dead()
