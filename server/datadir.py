"""One server per data dir: an OS-level lock taken before the store opens.

Two ``longbatch serve`` on one SQLite data dir would both run every batch
(each executor claims the same pending requests), so a paid model would be
billed twice. The lock is ``flock`` on ``longbatch.lock`` in the data dir: the
kernel drops it when the process ends however it ends, SIGKILL included, so a
crash never leaves the dir locked and there is no stale-lock cleanup to get
wrong. The file holds the holder's PID, only to name it in the refusal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "longbatch.lock"
"""The lock file's name inside the data dir."""


class DataDirInUse(Exception):
    """Another process holds the data dir's lock."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"data dir {data_dir} is in use by {holder} (another longbatch serve?); "
            f"stop it or pass another --data-dir"
        )
        self.data_dir = data_dir
        self.pid = pid


class DataDirLock:
    """The held lock of one data dir; ``release()`` (or process exit) drops it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        """The lock file."""
        self._fd: int | None = fd

    def release(self) -> None:
        """Drops the lock. The file stays: removing it could race a server
        that has just opened it and would then lock an unlinked file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """Creates ``data_dir`` if needed and locks it for this process.

    Raises:
        DataDirInUse: another process holds the lock.
        OSError: the dir cannot be created or the lock file opened.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    # os.open makes the descriptor non-inheritable, so the spawned worker
    # processes never hold the lock past the server's own death.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise DataDirInUse(data_dir, pid) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return DataDirLock(path, fd)


def _read_pid(fd: int) -> int | None:
    """The PID the holder wrote, or None (it may not have written it yet)."""
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
