"""One server per data dir: an OS-level lock taken before the store opens.

Two ``longbatch serve`` on one SQLite data dir would both run every batch
(each executor claims the same pending requests), so a paid model would be
billed twice. The lock is ``flock`` on ``longbatch.lock`` in the data dir: the
kernel drops it when the process ends however it ends, SIGKILL included, so a
crash never leaves the dir locked and there is no stale-lock cleanup to get
wrong. The file holds the holder's PID, only to name it in the refusal.

The data dir holds every tenant's prompts and outputs and the page-token
key, so it is private to the server's user: the dir is created 0700 and the
files in it 0600 (``secure_data_dir``; SQLite gives its -wal and -shm files
the database file's mode). An existing dir or file more open than that is
left as it is, an operator may mean it, but said once at start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("longbatch")

LOCK_NAME = "longbatch.lock"
"""The lock file's name inside the data dir."""
DB_NAME = "longbatch.db"
"""The SQLite database's name inside the data dir."""
DIR_MODE = 0o700
"""Mode of the data dir and the folders the server makes in it."""
FILE_MODE = 0o600
"""Mode of the files the server makes in the data dir."""


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
    data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    # os.open makes the descriptor non-inheritable, so the spawned worker
    # processes never hold the lock past the server's own death.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
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


def secure_data_dir(data_dir: Path, *, sqlite: bool = True) -> list[str]:
    """Creates ``data_dir``, its ``files`` folders and an empty database file
    private to this user, before the store and the file storage open them;
    returns (and logs, as one warning) what already existed more open.
    With ``sqlite=False`` (the store is PostgreSQL; the dir is scratch
    space) only the dir itself is created: no empty database file that
    would look like one holding data.

    The database is created here, 0600, rather than by SQLite, which would
    make it 0644 under the usual umask, and the -wal and -shm files with it.
    Files inside ``files/`` are not checked one by one (there may be
    millions): with ``files/`` private they cannot be reached.

    Raises:
        OSError: the dir or the database file cannot be created.
    """
    data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if sqlite:
        for folder in (data_dir / "files", data_dir / "files" / ".tmp"):
            folder.mkdir(mode=DIR_MODE, exist_ok=True)
        # O_CREAT without O_TRUNC: an existing database is opened, not emptied.
        os.close(os.open(data_dir / DB_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE))
    too_open = []
    for path, limit in ((data_dir, DIR_MODE), (data_dir / "files", DIR_MODE), (data_dir / "files" / ".tmp", DIR_MODE),
                        (data_dir / DB_NAME, FILE_MODE), (data_dir / f"{DB_NAME}-wal", FILE_MODE),
                        (data_dir / f"{DB_NAME}-shm", FILE_MODE), (data_dir / LOCK_NAME, FILE_MODE)):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            continue
        if mode & ~limit & 0o077:
            too_open.append(f"{path} ({mode:04o})")
    if too_open:
        log.warning("readable by other users, though they hold every tenant's data: %s; chmod 700 the dirs and "
                    "600 the files (new ones are made private)", ", ".join(too_open))
    return too_open
