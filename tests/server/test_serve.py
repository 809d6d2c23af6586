"""``longbatch serve``: loopback-only when open, the listening line, clean SIGTERM and Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
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


def _worker_children(pid: int) -> list[str]:
    """The pids of ``pid``'s children that are multiprocessing workers."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [c for c in children if _alive(c) and b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _ignores_sigint(pid: str) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


def _alive(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_ctrl_c_to_the_process_group_stops_server_and_workers_quietly(tmp_path: Path) -> None:
    """Ctrl-C signals the whole foreground group: the server shuts down in
    order, and its worker processes neither die with a traceback nor linger."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "longbatch.server.main", "--port", "0", "--data-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.startswith(b"longbatch listening on 127.0.0.1:")
        # The workers start at boot; wait until both are up, past their
        # initializer (bounded). A Ctrl-C while one is still importing is
        # out of reach: its traceback would come from multiprocessing itself.
        for _ in range(200):
            children = _worker_children(proc.pid)
            if len(children) >= 2 and all(_ignores_sigint(c) for c in children):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"worker processes did not start: children {children}")
        os.killpg(proc.pid, signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        assert "Traceback" not in err.decode() and "KeyboardInterrupt" not in err.decode()
        for _ in range(50):  # the pool was shut down before the server exited; allow the reaping
            if not any(_alive(child) for child in children):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"worker processes outlived the server: {children}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
