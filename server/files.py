"""File bytes on disk under ``{data_dir}/files``; metadata lives in the store.

Writes go to a temporary name and are renamed into place only when complete,
so a crash or a cut-off upload never leaves a partial file visible.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def new_id() -> str:
    """A URL-safe, unguessable resource id (128 random bits)."""
    return secrets.token_urlsafe(16).replace("-", "x").replace("_", "y").lower()


class FileStorage:
    """Where file bytes live."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._tmp = root / ".tmp"

    def prepare(self) -> None:
        """Create the folders and drop temporaries left by a crash."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)

    def path(self, file_id: str) -> Path:
        """The path of a complete file's bytes."""
        return self._root / file_id

    def create(self, file_id: str) -> NewFile:
        """Start writing a file under a temporary name; it appears under its
        id only on ``commit()``."""
        tmp = self._tmp / f"{file_id}.{secrets.token_hex(4)}"
        return NewFile(tmp, self.path(file_id))

    @contextmanager
    def writer(self, file_id: str) -> Iterator[HashingWriter]:
        """Write a file; it appears under its id only if the block succeeds."""
        new = self.create(file_id)
        try:
            yield new
        except BaseException:
            new.abort()
            raise
        new.commit()

    def delete(self, file_id: str) -> None:
        """Remove a file's bytes if present."""
        self.path(file_id).unlink(missing_ok=True)


class HashingWriter:
    """A binary writer that counts bytes and computes SHA-256 as it goes."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append bytes."""
        self._raw.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> bytes:
        """Digest of everything written so far."""
        return self._hash.digest()


class NewFile(HashingWriter):
    """A file being written under a temporary name."""

    def __init__(self, tmp: Path, final: Path) -> None:
        # 0600 whatever the umask: it holds a tenant's prompts or outputs.
        super().__init__(os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb"))
        self._tmp = tmp
        self._final = final
        self._open = True

    def commit(self) -> None:
        """fsync and rename into place, so the file is complete or absent."""
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        self._open = False
        os.replace(self._tmp, self._final)

    def abort(self) -> None:
        """Drop the bytes written; safe to call more than once, or after commit."""
        if self._open:
            self._open = False
            self._raw.close()
            self._tmp.unlink(missing_ok=True)
