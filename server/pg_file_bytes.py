"""File bytes in PostgreSQL (``FileBytes`` over the ``file_bytes`` table).

Replicas sharing one database then need no shared disk: the data dir holds
only scratch space, deleting it loses nothing (see ``prepare``).

* A file is rows ``(file_id, seq, data)`` of ``CHUNK_BYTES`` each (the last
  shorter; a 0-byte file is one empty chunk, so it is told from an absent
  one). ``commit`` writes them with one COPY in one transaction, read from
  the local temporary a chunk at a time: the file is all there or absent,
  and memory stays at a few chunks whatever the size.
* Streaming out reads one chunk per query on pooled connections, no
  transaction held open while a slow client reads; a file deleted meanwhile
  fails the stream rather than cutting it short.
* ``local_path`` (ingest, read by worker processes) makes a scratch copy
  under ``{scratch}/copies`` once per file however many readers want it at
  a time, and removes it when the last one is done; a crash leaves it for
  the next ``prepare``.
* The bytes go with the file's row, in its transaction, by a trigger (v4
  in pg_store.MIGRATIONS); ``remove`` covers bytes whose row never came.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import BinaryIO

from .files import ByteSource, NewFile
from .pg_store import PostgresStore

CHUNK_BYTES = 1 << 20
"""Bytes per stored chunk: large enough that a row costs little over its
bytes, small enough that a few in flight cost little memory."""

_LAST_SEQ = "SELECT max(seq) FROM file_bytes WHERE file_id = $1"
_CHUNK = "SELECT data FROM file_bytes WHERE file_id = $1 AND seq = $2"


class PgFileBytes:
    """File bytes in the ``file_bytes`` table of a ``PostgresStore``'s
    database, with local scratch space under ``scratch``.

    Args:
        store: The open store whose pool is used (v4 schema or later).
        scratch: A local folder of this replica's own (``{data_dir}/scratch``,
            say): upload and output temporaries, and the copies ``local_path``
            hands out.
        chunk_bytes: Bytes per stored chunk (tests use small ones).
    """

    def __init__(self, store: PostgresStore, scratch: Path, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be at least 1")
        self._store = store
        self._spool = scratch / "spool"
        self._copies_dir = scratch / "copies"
        self._chunk = chunk_bytes
        self._copies: dict[str, _Copy] = {}

    def prepare(self) -> None:
        """Create the scratch folders and empty them: whatever is there is a
        crashed run's temporary or copy, never the only place of a byte."""
        for folder in (self._spool, self._copies_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for leftover in folder.iterdir():
                leftover.unlink(missing_ok=True)

    def create(self, file_id: str) -> NewFile:
        """Start a local temporary under ``{scratch}/spool``."""
        return NewFile(self._spool / f"{file_id}.{secrets.token_hex(4)}", None, file_id)

    async def commit(self, new: NewFile) -> None:
        """Copy the temporary into the database in one transaction, then drop it."""
        try:
            # Flushing the last buffered write and closing are cheap (no
            # fsync: the database makes the bytes durable), so no thread,
            # and no thread to race with the abort below on a cancellation.
            new.finish()
            # aclosing: a COPY cut off (an error, a cancellation) closes the
            # temporary now, not whenever the generator is collected.
            async with contextlib.aclosing(self._records(new.file_id, new.tmp)) as records, \
                    self._store.pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table("file_bytes", records=records, columns=("file_id", "seq", "data"))
        finally:
            new.abort()

    async def _records(self, file_id: str, path: Path) -> AsyncGenerator[tuple[str, int, bytes], None]:
        f = await asyncio.to_thread(path.open, "rb")
        try:
            seq = 0
            while True:
                data = await asyncio.to_thread(f.read, self._chunk)
                if not data and seq > 0:
                    return
                yield file_id, seq, data
                if not data:
                    return  # a 0-byte file: its one empty chunk
                seq += 1
        finally:
            f.close()

    async def open(self, file_id: str) -> ByteSource:
        """Look the file up; its chunks are read as they are asked for."""
        last = await self._store.pool.fetchval(_LAST_SEQ, file_id)
        if last is None:
            raise FileNotFoundError(f"no bytes stored for files/{file_id}")
        return _ChunkSource(self, file_id, int(last))

    async def _read_chunk(self, file_id: str, seq: int) -> bytes:
        data = await self._store.pool.fetchval(_CHUNK, file_id, seq)
        if data is None:
            raise FileNotFoundError(f"files/{file_id} was deleted while being read")
        assert isinstance(data, bytes)
        return data

    def local_path(self, file_id: str) -> AbstractAsyncContextManager[Path]:
        """A scratch copy, shared by the readers of the moment and removed
        after the last; a path to nothing when no bytes are stored."""
        return self._local(file_id)

    @asynccontextmanager
    async def _local(self, file_id: str) -> AsyncIterator[Path]:
        copy = self._copies.get(file_id)
        if copy is None:
            path = self._copies_dir / f"{file_id}.{secrets.token_hex(4)}"
            copy = _Copy(path, asyncio.ensure_future(self._copy_out(file_id, path)))
            self._copies[file_id] = copy
        copy.users += 1
        try:
            # Shielded: one reader giving up must not stop the copy the others wait for.
            await asyncio.shield(copy.ready)
            yield copy.path
        finally:
            copy.users -= 1
            if copy.users == 0:
                if self._copies.get(file_id) is copy:
                    del self._copies[file_id]
                # Shielded: a second cancellation of this reader must not
                # leave the copy behind.
                await asyncio.shield(asyncio.ensure_future(self._drop(copy)))

    @staticmethod
    async def _drop(copy: _Copy) -> None:
        copy.ready.cancel()
        await asyncio.wait([copy.ready])
        if not copy.ready.cancelled():
            copy.ready.exception()  # seen by the readers already
        copy.path.unlink(missing_ok=True)

    async def _copy_out(self, file_id: str, path: Path) -> None:
        """Write the file to ``path`` (complete, or not there at all)."""
        try:
            source = await self.open(file_id)
        except FileNotFoundError:
            return  # readers find nothing at the path, as on disk
        part = path.with_name(path.name + ".part")
        out = await asyncio.to_thread(_create_private, part)
        try:
            try:
                async for data in source.chunks(self._chunk):
                    await asyncio.to_thread(out.write, data)
            finally:
                out.close()
            part.rename(path)
        except FileNotFoundError:
            pass  # deleted while being copied: absent
        finally:
            part.unlink(missing_ok=True)

    async def remove(self, file_ids: Iterable[str]) -> None:
        """Delete the chunks of these files (usually gone already with their rows)."""
        ids = list(file_ids)
        if ids:
            await self._store.pool.execute("DELETE FROM file_bytes WHERE file_id = ANY($1::text[])", ids)


def _create_private(path: Path) -> BinaryIO:
    # 0600 whatever the umask, as NewFile: it holds a tenant's prompts.
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


class _Copy:
    """A scratch copy of a file and the readers using it."""

    def __init__(self, path: Path, ready: asyncio.Future[None]) -> None:
        self.path = path
        self.ready = ready
        self.users = 0


class _ChunkSource:
    """A stored file streamed a chunk (one query) at a time."""

    def __init__(self, owner: PgFileBytes, file_id: str, last_seq: int) -> None:
        self._owner = owner
        self._file_id = file_id
        self._last = last_seq
        self._closed = False

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        """The bytes in order, at most ``size`` per chunk."""
        for seq in range(self._last + 1):
            if self._closed:
                return
            data = await self._owner._read_chunk(self._file_id, seq)
            if len(data) <= size:
                if data:
                    yield data
                continue
            view = memoryview(data)
            for at in range(0, len(data), size):
                yield bytes(view[at:at + size])

    def close(self) -> None:
        """Stop reading; nothing is held between chunks."""
        self._closed = True
