"""Private data on disk: the data dir 0700, everything in it 0600.

The data dir holds every tenant's prompts and outputs and the page-token
key. Checked in process (under the test process's own umask, so the modes
come from the server, not from a umask) and on a real ``longbatch serve``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MakeServer

from longbatch.client import Client
from longbatch.server.config import load_config
from longbatch.server.datadir import secure_data_dir
from longbatch.server.main import config_file_note

from support import ServerProcess


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """The usual 022, so a file made without an explicit mode would be 0644."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def every_path(data: Path) -> list[Path]:
    return [data, *sorted(data.rglob("*"))]


def assert_private(data: Path) -> None:
    wrong = [(str(p), f"{mode(p):04o}") for p in every_path(data)
             if mode(p) != (0o700 if p.is_dir() else 0o600)]
    assert wrong == [], wrong


async def file_batch(target: str, tmp_path: Path) -> None:
    """An upload and a file batch, so uploaded and generated files exist."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"request": {"contents": [{"parts": [{"text": f"q{i}"}]}]}}) + "\n"
                              for i in range(20)))
    async with Client(target, timeout=30) as client:
        uploaded = await client.upload_file(source)
        op = await client.create_generate_batch("models/echo", file_name=uploaded.name)
        output = await op.result(timeout=60)
        assert output.WhichOneof("output") == "responses_file"


async def test_an_in_process_server_makes_everything_private(make_server: MakeServer, tmp_path: Path) -> None:
    server = await make_server(data_dir=tmp_path / "fresh" / "data")
    await file_batch(server.target, tmp_path)
    data = server.data_dir
    names = {p.name for p in every_path(data)}
    # The database with SQLite's own -wal and -shm, an uploaded and a generated file.
    assert {"longbatch.db", "longbatch.db-wal", "longbatch.db-shm", "files", ".tmp"} <= names, names
    assert len([p for p in (data / "files").iterdir() if p.is_file()]) == 2
    assert_private(data)
    assert mode(tmp_path / "fresh") == 0o755  # a parent made on the way is the user's business


async def test_longbatch_serve_makes_everything_private(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    try:
        target = await server.start()
        await file_batch(target, tmp_path)
        assert_private(tmp_path / "data")
        assert (tmp_path / "data" / "longbatch.lock").exists()
        assert await server.terminate() == 0
    finally:
        await server.ensure_dead()
    assert_private(tmp_path / "data")


def test_an_existing_dir_more_open_is_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    db = data / "longbatch.db"
    db.touch(mode=0o644)
    os.chmod(data, 0o755)
    os.chmod(db, 0o644)
    caplog.set_level(logging.WARNING, "longbatch")
    too_open = secure_data_dir(data)
    assert too_open == [f"{data} (0755)", f"{db} (0644)"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(data) in message and str(db) in message and "chmod" in message
    # Left as it was (an operator may mean it), and what it makes is private.
    assert mode(data) == 0o755 and mode(db) == 0o644
    assert mode(data / "files") == 0o700
    caplog.clear()
    os.chmod(data, 0o700)
    os.chmod(db, 0o600)
    assert secure_data_dir(data) == []
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_an_existing_database_is_not_emptied(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "longbatch.db").write_bytes(b"x" * 100)
    os.chmod(data / "longbatch.db", 0o600)
    secure_data_dir(data)
    assert (data / "longbatch.db").read_bytes() == b"x" * 100


def test_a_config_with_secrets_readable_by_others_is_said(tmp_path: Path) -> None:
    path = tmp_path / "longbatch.toml"
    path.write_text('[[api_keys]]\nkey = "k"\ntenant = "t"\n')
    path.chmod(0o644)
    note = config_file_note(path, load_config(path))
    assert note is not None and str(path) in note and "0644" in note and "chmod 600" in note
    path.chmod(0o600)
    assert config_file_note(path, load_config(path)) is None
    plain = tmp_path / "plain.toml"
    plain.write_text("[limits]\nmax_inlined_requests = 5\n")
    plain.chmod(0o644)
    assert config_file_note(plain, load_config(plain)) is None  # nothing secret in it
