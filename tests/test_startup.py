"""``longbatch serve`` start-up failures: one line on stderr and a non-zero exit.

Real ``longbatch serve`` processes on 127.0.0.1 port 0, with the default log
level, so stderr is what a user would see.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

from support import ServerProcess, Stubs, generate_batch, run_process, wait_done


async def serve(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Runs ``longbatch serve`` that is expected to stop on its own: exit code and stderr."""
    code, _, err = await run_process(sys.executable, "-m", "longbatch.client.cli", "serve", *args,
                                     env={**os.environ, **(env or {})}, within=30)
    return code, err


def one_line(err: str) -> str:
    """The only line of ``err``; fails on a traceback or any other line."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


async def test_a_second_server_on_a_data_dir_in_use_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ServerProcess(data)
    try:
        target = await first.start()
        assert first.proc is not None
        code, err = await serve("--port", "0", "--data-dir", str(data))
        assert code == 1
        line = one_line(err)
        assert str(data) in line and f"process {first.proc.pid}" in line, line
        # The first server is untouched and still runs batches.
        stubs = Stubs.connect(target)
        try:
            op = await stubs.batches.BatchGenerateContent(generate_batch(3))
            assert (await wait_done(stubs, op.name)).HasField("response")
        finally:
            await stubs.channel.close()
    finally:
        await first.ensure_dead()


async def test_a_killed_server_leaves_the_data_dir_free(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data)
    try:
        await server.start()
        await server.kill()  # SIGKILL: no shutdown code runs, the kernel drops the lock
        await server.start()
        assert await server.terminate() == 0
        await server.start()  # and a clean stop releases it too
    finally:
        await server.ensure_dead()


async def test_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = await serve("--port", str(port), "--data-dir", str(tmp_path / "data"))
    assert code == 1
    line = one_line(err)
    assert f"127.0.0.1:{port}" in line and "in use" in line, line


async def test_an_http_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = await serve("--port", "0", "--http-port", str(port), "--data-dir", str(tmp_path / "data"))
    assert code == 1
    line = one_line(err)
    assert f"HTTP on 127.0.0.1:{port}" in line and "in use" in line and "--http-port" in line, line
    code, err = await serve("--port", "0", "--http-port", "eighty", "--data-dir", str(tmp_path / "data"))
    assert code == 2 and "--http-port" in err and "'eighty'" in err, err


async def test_a_bad_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "longbatch.toml"
    config.write_text("[limits]\nbatch_ttl = 'soon'\n")
    code, err = await serve("--port", "0", "--data-dir", str(tmp_path / "data"), "--config", str(config))
    assert code == 2
    assert "limits.batch_ttl" in one_line(err)
    code, err = await serve("--port", "0", "--data-dir", str(tmp_path / "data"), "--config", str(tmp_path / "no"))
    assert code == 2
    assert "cannot read config" in one_line(err)
    # A backend's options are checked as the server builds it: the same one line.
    config.write_text('[[models]]\nname = "models/remote"\nbackend = "gemini-http"\n')
    code, err = await serve("--port", "0", "--data-dir", str(tmp_path / "data"), "--config", str(config))
    assert code == 2
    assert "base_url" in one_line(err)


async def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    code, err = await serve("--port", "0", "--data-dir", str(not_a_dir))
    assert code == 1
    assert f"cannot use data dir {not_a_dir}" in one_line(err)


async def test_a_damaged_database_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)  # private, so the one line is not joined by the warning about open modes
    (data / "longbatch.db").write_bytes(b"this is not a database" * 100)
    (data / "longbatch.db").chmod(0o600)
    code, err = await serve("--port", "0", "--data-dir", str(data))
    assert code == 1
    assert one_line(err).startswith("error: cannot start: ")


async def test_a_bad_port_variable_is_a_usage_error(tmp_path: Path) -> None:
    code, err = await serve("--data-dir", str(tmp_path / "data"), env={"LONGBATCH_PORT": "fifty"})
    assert code == 2
    assert "Traceback" not in err and "--port" in err


async def test_a_config_that_replaces_the_echo_models_says_so(tmp_path: Path) -> None:
    config = tmp_path / "longbatch.toml"
    config.write_text('[[models]]\nname = "models/mine"\nbackend = "echo"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "longbatch.server.main", "--port", "0", "--data-dir", str(tmp_path / "data"),
        "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.startswith(b"longbatch listening on 127.0.0.1:")
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert ("serving models/mine: a config's [[models]] replaces the built-in models/echo and models/echo-slow "
            "(list them in the config to keep them)") in err.decode()
