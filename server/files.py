"""File bytes, behind one seam (``FileBytes``); metadata lives in the store.

``DiskFileBytes`` keeps them on disk under ``{data_dir}/files`` (one server,
or replicas sharing a disk); ``pg_file_bytes.PgFileBytes`` keeps them in
PostgreSQL, so replicas need no shared disk and the data dir holds only
scratch space.

Either way a file is written locally first (``create``: an upload's spool,
a responses file being rendered) and handed over whole (``commit``), so a
crash or a cut-off upload never leaves a partial file visible.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, BinaryIO, Protocol


def new_id() -> str:
    """A URL-safe, unguessable resource id (128 random bits)."""
    return secrets.token_urlsafe(16).replace("-", "x").replace("_", "y").lower()


class ByteSource(Protocol):
    """A stored file opened for reading (``FileBytes.open``)."""

    def chunks(self, size: int) -> AsyncIterator[bytes]:
        """The bytes in order, at most ``size`` per chunk."""
        ...

    def close(self) -> None:
        """Release the file; safe to call more than once, and whether or not
        ``chunks`` ran to the end."""
        ...


class FileBytes(Protocol):
    """Where the bytes of complete files live, by file id.

    Bytes are committed before their store row is added and removed after
    it is deleted: a crash in between leaves unlisted bytes, never a listed
    file without its bytes.
    """

    def prepare(self) -> None:
        """Create the local folders and drop what a crash left in them
        (temporaries, scratch copies); call once at startup, before use."""
        ...

    def create(self, file_id: str) -> NewFile:
        """Start a file on local disk under a temporary name; it becomes
        ``file_id``'s bytes only through ``commit``. Cheap (one open), so
        callers may call it on the event loop."""
        ...

    async def commit(self, new: NewFile) -> None:
        """Store ``new``'s bytes (complete once this is called) under its id:
        on return they are all there; on an exception nothing is, and the
        local temporary is gone either way (``new.abort()`` stays safe)."""
        ...

    async def open(self, file_id: str) -> ByteSource:
        """Open a file's bytes for streaming (the caller closes them); a file
        deleted later still reads whole or fails, never short.

        Raises:
            FileNotFoundError: there are no bytes under ``file_id``.
        """
        ...

    def local_path(self, file_id: str) -> AbstractAsyncContextManager[Path]:
        """A path on local disk to read ``file_id``'s bytes from (by worker
        processes too), valid until the block exits. A path to nothing when
        there are no such bytes: opening it raises FileNotFoundError."""
        ...

    async def remove(self, file_ids: Iterable[str]) -> None:
        """Remove the bytes of these files where present."""
        ...


class DiskFileBytes:
    """File bytes on disk: ``{root}/{file_id}``, written under ``{root}/.tmp``
    and renamed into place."""

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
        return NewFile(tmp, self.path(file_id), file_id)

    async def commit(self, new: NewFile) -> None:
        """fsync and rename into place, in a thread (fsync can take a while)."""
        try:
            await asyncio.to_thread(new.commit)
        except Exception:
            new.abort()
            raise

    async def open(self, file_id: str) -> ByteSource:
        """Open the file; an unlink after this leaves the open file whole."""
        source: IO[bytes] = await asyncio.to_thread(self.path(file_id).open, "rb")
        return _FileSource(source)

    @asynccontextmanager
    async def _local(self, file_id: str) -> AsyncIterator[Path]:
        yield self.path(file_id)

    def local_path(self, file_id: str) -> AbstractAsyncContextManager[Path]:
        """The file's own path: no copy."""
        return self._local(file_id)

    async def remove(self, file_ids: Iterable[str]) -> None:
        """Unlink the files, in a thread."""
        await asyncio.to_thread(self._remove, list(file_ids))

    def _remove(self, file_ids: list[str]) -> None:
        for file_id in file_ids:
            self.delete(file_id)

    @contextmanager
    def writer(self, file_id: str) -> Iterator[HashingWriter]:
        """Write a file synchronously; it appears under its id only if the
        block succeeds."""
        new = self.create(file_id)
        try:
            yield new
        except BaseException:
            new.abort()
            raise
        new.commit()

    def delete(self, file_id: str) -> None:
        """Remove a file's bytes if present (blocking; ``remove`` is the
        seam's way)."""
        self.path(file_id).unlink(missing_ok=True)



class _FileSource:
    """An open local file, read in a thread a chunk at a time."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        """The bytes, ``size`` at most per chunk, read in a thread."""
        while chunk := await asyncio.to_thread(self._source.read, size):
            yield chunk

    def close(self) -> None:
        """Close the file; safe to call more than once."""
        self._source.close()


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
    """A file being written under a temporary name on local disk.

    ``final`` is where ``commit`` renames it (DiskFileBytes); without one
    (PgFileBytes) the complete file is read back from ``tmp`` by the
    store's ``commit`` and then dropped.
    """

    def __init__(self, tmp: Path, final: Path | None, file_id: str) -> None:
        # 0600 whatever the umask: it holds a tenant's prompts or outputs.
        super().__init__(os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb"))
        self.file_id = file_id
        """The id the bytes are committed under."""
        self.tmp = tmp
        """The temporary's path, complete once ``finish`` returned."""
        self._final = final
        self._open = True
        self._renamed = False

    def finish(self) -> None:
        """Flush and close, leaving the temporary in place (blocking)."""
        if self._open:
            self._raw.flush()
            self._raw.close()
            self._open = False

    def commit(self) -> None:
        """fsync and rename into place, so the file is complete or absent."""
        assert self._final is not None, "a NewFile without a final path is committed by its FileBytes"
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        self._open = False
        os.replace(self.tmp, self._final)
        self._renamed = True

    def abort(self) -> None:
        """Drop the bytes written; safe to call more than once, or after commit."""
        if self._open:
            self._open = False
            self._raw.close()
        if not self._renamed:
            self.tmp.unlink(missing_ok=True)
