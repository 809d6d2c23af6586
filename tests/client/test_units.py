"""client/units.py: the one byte formatter, shared by the CLI and the server's messages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from longbatch.client.units import format_bytes


@pytest.mark.parametrize(("size", "fixed", "loose"), [
    (0, "0 B", "0 B"), (1023, "1023 B", "1023 B"), (1024, "1.0 KiB", "1 KiB"), (1536, "1.5 KiB", "1.5 KiB"),
    (20 << 20, "20.0 MiB", "20 MiB"), (2 << 30, "2.0 GiB", "2 GiB"), (2_048_000_000, "1.9 GiB", "1.9 GiB"),
    (3 << 40, "3072.0 GiB", "3072 GiB"),
])
def test_format_bytes(size: int, fixed: str, loose: str) -> None:
    assert format_bytes(size) == fixed
    assert format_bytes(size, fixed=False) == loose


def test_the_server_messages_use_it_without_the_clients_terminal_libraries() -> None:
    code = ("import sys, longbatch.server.services.files, longbatch.server.quotas; "
            "print(sorted({'rich', 'longbatch.client.progress', 'longbatch.client.cli'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
