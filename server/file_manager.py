"""File use cases, between the API surfaces and the store/file storage.

The gRPC FileService (and any other surface) parses its request, calls the
manager with plain values and async iterators of bytes, and converts what
comes back; the rules of uploads, downloads, listing, deletion and expiry
live here once.

Bytes stream straight to a local temporary through ``FileBytes.create``, with
size and SHA-256 computed on the way in, and are committed whole (renamed
into place on disk, copied into the database with PostgreSQL); the store row
is written only once the bytes are in place, so a file is either complete
and listed or absent. Blocking disk work runs in threads, one batch of about a
MiB at a time, so that a 2 GiB upload never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable

from longbatch.client.units import format_bytes

from .config import Limits
from .domain import StoredFile, now_us
from .errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from .files import ByteSource, FileBytes, new_id
from .ingest import SMALL_FILE_BYTES
from .leases import held, lease_owner
from .paging import PageTokens, read_page_request
from .quotas import Quotas, Upload
from .store import LeaseLost, Store, StoreConflict
from .validate import MAX_DISPLAY_NAME

log = logging.getLogger("longbatch.files")

DEFAULT_MIME_TYPE = "application/jsonl"
MAX_MIME_TYPE = 255
_WRITE_BATCH = 1 << 20
_MIME = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*(\s*;.*)?", re.ASCII)


def file_not_found(file_id: str) -> NotFound:
    """The error for a file the caller does not have (absent or another tenant's)."""
    return NotFound(f"files/{file_id} not found", reason="FILE_NOT_FOUND")


def validate_metadata(display_name: str, mime_type: str) -> tuple[str, str]:
    """The display name and MIME type of an upload (an empty MIME type means
    ``application/jsonl``), or InvalidArgument naming every bad field."""
    violations = []
    if len(display_name) > MAX_DISPLAY_NAME:
        violations.append(("file.display_name",
                           f"is {len(display_name)} characters; the limit is {MAX_DISPLAY_NAME}"))
    mime_type = mime_type or DEFAULT_MIME_TYPE
    if len(mime_type) > MAX_MIME_TYPE or not _MIME.fullmatch(mime_type):
        shown = mime_type if len(mime_type) <= 80 else mime_type[:77] + "..."
        violations.append(("file.mime_type", f"must be a media type like 'application/jsonl', got {shown!r}"))
    if violations:
        field, problem = violations[0]
        raise InvalidArgument(f"invalid file: {field} {problem}", violations=violations)
    return display_name, mime_type


class Download:
    """An open file being read: its metadata and its bytes, in chunks.

    The file is opened by ``FileManager.open_download``, so a file deleted
    meanwhile is NOT_FOUND before a byte is sent; ``close`` releases it
    whether or not ``chunks`` ran to the end.
    """

    def __init__(self, file: StoredFile, source: ByteSource) -> None:
        self.file = file
        """The file's metadata (``size_bytes`` for a Content-Length, say)."""
        self._source = source

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        """The bytes, ``size`` at most per chunk."""
        async for chunk in self._source.chunks(size):
            yield chunk

    def close(self) -> None:
        """Release the file; safe to call more than once."""
        self._source.close()


class FileManager:
    """Creates, reads, lists and deletes one tenant's files at a time."""

    def __init__(
        self, store: Store, storage: FileBytes, limits: Limits, page_tokens: PageTokens,
        on_large_upload: Callable[[], None] | None = None, quotas: Quotas | None = None,
    ) -> None:
        self._store = store
        self._storage = storage
        self._limits = limits
        self._tokens = page_tokens
        self._on_large_upload = on_large_upload
        self._quotas = quotas

    async def create(self, tenant: str, display_name: str, mime_type: str,
                     chunks: AsyncIterable[bytes]) -> StoredFile:
        """Store an uploaded file from its metadata and its bytes.

        Metadata is checked before a byte is read; an error raised by
        ``chunks`` (a bad stream, a client gone) or by the limits leaves no
        trace of the upload and propagates unchanged.
        """
        display_name, mime_type = validate_metadata(display_name, mime_type)
        # Quotas refuse before a byte is read when nothing is left, and the
        # upload counts (bytes in flight, a create) until it ends either way.
        upload = await self._quotas.begin_upload(tenant) if self._quotas is not None else None
        try:
            return await self._create(chunks, tenant, display_name, mime_type, upload)
        finally:
            if upload is not None:
                upload.close()

    async def _create(self, chunks: AsyncIterable[bytes], tenant: str, display_name: str,
                      mime_type: str, upload: Upload | None) -> StoredFile:
        file_id = new_id()
        spool = _Spool(self._storage, file_id)
        try:
            await self._receive(chunks, spool, upload)
        except BaseException:
            # Client gone, over a limit or bad stream: no trace of the upload.
            spool.discard()
            raise
        if self._on_large_upload is not None and spool.size > SMALL_FILE_BYTES:
            self._on_large_upload()  # a batch reading it likely follows
        created = now_us()
        stored = StoredFile(
            id=file_id, seq=0, tenant=tenant, display_name=display_name, mime_type=mime_type,
            size_bytes=spool.size, sha256=spool.sha256, create_time_us=created,
            expire_time_us=created + int(self._limits.file_ttl_s * 1_000_000), source="uploaded",
        )
        # Renaming and inserting must not be torn apart by a cancellation, or
        # bytes could stay without a row; if the client left meanwhile it never
        # learns the name, so the finished file is removed again. The caller
        # waits for that, so a server shutdown waits for it too.
        commit = asyncio.ensure_future(self._commit(spool, stored, upload))
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            await asyncio.shield(self._undo(commit, stored))
            raise
        return stored

    async def _receive(self, chunks: AsyncIterable[bytes], spool: _Spool, upload: Upload | None) -> None:
        limit = self._limits.max_file_bytes
        async for data in chunks:
            if spool.received + len(data) > limit:
                raise ResourceExhausted(
                    f"file exceeds the limit of {limit} bytes ({format_bytes(limit, fixed=False)}) per file",
                    reason="FILE_TOO_LARGE", metadata={"limit_bytes": str(limit)},
                )
            if upload is not None:
                # Over max_stored_bytes: refused here, before this chunk is
                # written; the caller drops what was.
                await upload.receive(len(data))
            await spool.write(data)
        # A client that disconnects shows up here as a normal end of stream,
        # its cancellation delivered a moment later: yield once so that it
        # lands before anything is committed (_undo covers a later one).
        await asyncio.sleep(0)
        await spool.drain()
        if spool.size == 0:
            raise InvalidArgument("file is empty: an upload needs at least one byte",
                                  reason="FILE_EMPTY", violations=[("data", "no bytes were sent")])

    async def _commit(self, spool: _Spool, stored: StoredFile, upload: Upload | None) -> None:
        await spool.commit()
        try:
            # With quotas, the exact check runs in the insert's transaction:
            # over it, the bytes just renamed into place go again below.
            await (upload.add_file(stored) if upload is not None else self._store.add_file(stored))
        except BaseException:
            await self._storage.remove([stored.id])
            raise

    async def _undo(self, commit: asyncio.Future[None], stored: StoredFile) -> None:
        try:
            await commit
        except BaseException:
            return  # nothing was kept
        try:
            await self._store.delete_file(stored.tenant, stored.id)
            await self._storage.remove([stored.id])
        except Exception:
            log.exception("could not remove files/%s after its upload was cancelled", stored.id)

    async def get(self, tenant: str, file_id: str) -> StoredFile:
        """The tenant's file, or NotFound (FILE_NOT_FOUND)."""
        stored = await self._store.get_file(tenant, file_id)
        if stored is None:
            raise file_not_found(file_id)
        return stored

    async def list(self, tenant: str, page_size: int, page_token: str) -> tuple[list[StoredFile], str]:
        """A page of the tenant's files, newest first, and the next page token."""
        scope = f"files\x00{tenant}"
        size, position = read_page_request(self._tokens, page_size, page_token, scope)
        assert position is None or isinstance(position, int)
        before = position
        rows = await self._store.list_files(tenant, before, size + 1)
        page = rows[:size]
        token = self._tokens.encode(scope, (page[-1].seq,)) if len(rows) > size else ""
        return page, token

    async def delete(self, tenant: str, file_id: str) -> None:
        """Delete a file and its bytes, unless a batch that is not done reads it."""
        # The tenant check first: the store's in-use check looks at every
        # tenant's batches, so asked first it would tell another tenant that
        # this file exists (FILE_IN_USE instead of NOT_FOUND).
        await self.get(tenant, file_id)
        try:
            deleted = await self._store.delete_file(tenant, file_id)
        except StoreConflict:
            raise FailedPrecondition(
                f"files/{file_id} is read by a pending or running batch; cancel the batch or wait for it to finish",
                reason="FILE_IN_USE",
            ) from None
        if not deleted:
            raise file_not_found(file_id)
        await self._storage.remove([file_id])

    async def open_download(self, tenant: str, file_id: str) -> Download:
        """Open the tenant's file for reading, or NotFound; the caller closes it."""
        stored = await self.get(tenant, file_id)
        try:
            source = await self._storage.open(file_id)
        except FileNotFoundError:
            # Deleted (or expired) between the lookup and the open.
            raise file_not_found(file_id) from None
        return Download(stored, source)


def _consume(future: asyncio.Future[None]) -> None:
    # Mark a failed write as seen: the upload is being discarded anyway.
    if not future.cancelled():
        future.exception()


class _Spool:
    """An upload being written: chunks are gathered into batches of about a
    MiB and written (and hashed) in a thread while the next ones arrive."""

    def __init__(self, storage: FileBytes, file_id: str) -> None:
        # Opening a new file is one cheap syscall; doing it here rather than in
        # a thread means a cancellation can never strand a temp file.
        self._storage = storage
        self._out = storage.create(file_id)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self.received = 0
        """Bytes accepted so far, whether or not they reached the disk yet."""
        self._in_flight: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def size(self) -> int:
        """Bytes written to the temporary so far."""
        return self._out.size

    @property
    def sha256(self) -> bytes:
        """SHA-256 of the bytes written so far."""
        return self._out.sha256

    async def write(self, data: bytes) -> None:
        """Add bytes; they reach the disk in batches."""
        self._chunks.append(data)
        self._buffered += len(data)
        self.received += len(data)
        if self._buffered >= _WRITE_BATCH:
            await self._flush()

    async def _flush(self) -> None:
        # One write in flight at a time keeps HashingWriter single-threaded
        # and the bytes in order.
        if self._in_flight is not None:
            await self._in_flight
            self._in_flight = None
        if self._chunks:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            self._in_flight = asyncio.ensure_future(asyncio.to_thread(self._out.write, data))

    async def drain(self) -> None:
        """Write everything buffered and wait for it."""
        await self._flush()
        await self._flush()

    async def commit(self) -> None:
        """Hand the complete temporary to the file bytes (``FileBytes.commit``)."""
        self._closed = True
        await self._storage.commit(self._out)

    def discard(self) -> None:
        """Drop the temp file; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._in_flight is not None:
            # The thread finishes its write into the unlinked file; closing
            # waits for it on the file's lock, which is at most one batch.
            self._in_flight.cancel()
            self._in_flight.add_done_callback(_consume)
        with contextlib.suppress(Exception):
            self._out.abort()


class FileExpiry:
    """Deletes uploaded files past their expiration time, with their bytes.

    Runs every ``min(60 s, file_ttl / 20)``, at least every 50 ms apart. A
    file read by a batch that is not done stays until that batch is done.

    Replicas sharing a database take turns: a sweep runs under the store's
    ``file-expiry`` lease, renewed as it goes, and each row is deleted by a
    write fenced by it (refused once the lease is lost); a replica that
    finds the lease held skips that round.
    """

    LEASE = "file-expiry"
    """The lease a sweep runs under (``store.LeaseStore``)."""

    def __init__(self, store: Store, storage: FileBytes, file_ttl_s: float, lease_ttl_s: float = 60.0) -> None:
        self._store = store
        self._storage = storage
        self.interval_s = max(0.05, min(60.0, file_ttl_s / 20))
        self._lease_ttl_s = lease_ttl_s
        """How long the lease lasts past each renewal; renewed every third of it."""
        self._owner = lease_owner("file-expiry")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the periodic sweep."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="longbatch-file-expiry")

    async def stop(self) -> None:
        """Stop the sweep; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("file expiry sweep failed; retrying in %.3g s", self.interval_s)

    async def sweep(self) -> int:
        """Delete the files expired by now; return how many were deleted
        (0 when another holder of the lease is sweeping)."""
        deleted = 0
        async with held(self._store, self.LEASE, self._owner, self._lease_ttl_s) as lease:
            if lease is None:
                return 0
            for f in await self._store.expired_files(now_us()):
                if not await lease.keep(every_s=self._lease_ttl_s / 3):
                    break
                try:
                    if not await self._store.delete_file(f.tenant, f.id, lease=lease.lease):
                        continue
                except StoreConflict:
                    continue  # a batch started reading it since the query
                except LeaseLost:
                    log.warning("file expiry lease lost mid-sweep; another replica goes on")
                    break
                # After the row, as in retention: never a listed file without bytes.
                await self._storage.remove([f.id])
                deleted += 1
        if deleted:
            log.info("deleted %d expired file(s)", deleted)
        return deleted
