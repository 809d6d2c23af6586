"""Resumable upload sessions: one file upload spread over several HTTP requests.

The protocol, as the google-genai SDK speaks it: a ``start`` request (with
the API key and the file's metadata) opens a session and is answered with an
upload URL holding an unguessable id; then ``upload`` requests carry the
bytes in order (``X-Goog-Upload-Offset``), the last one ``upload, finalize``.
The chunk requests carry no API key: the id authorises them.

A session is one ``FileManager.create`` call kept running across those
requests, fed through a small bounded queue: each chunk request streams its
body into the queue as it arrives, so a 2 GB upload never sits in memory, and
every rule of uploads (size limit, quotas, spooling, commit) stays in the
file manager. A session ends with its file committed, or aborted: a chunk
request cut midway, a bad offset or command, or no request for
``idle_timeout_s``. An aborted session leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..domain import StoredFile
from ..errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError
from ..file_manager import FileManager, validate_metadata

log = logging.getLogger("longbatch.http")

DEFAULT_IDLE_TIMEOUT_S = 600.0
"""A session with no request for this long is aborted (10 min)."""
MAX_SESSIONS_PER_TENANT = 64
_QUEUE_CHUNKS = 8
_END = object()


@dataclass(eq=False)
class _Session:
    id: str
    tenant: str
    declared_size: int | None
    queue: asyncio.Queue[object] = field(default_factory=lambda: asyncio.Queue(_QUEUE_CHUNKS))
    started: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[StoredFile] | None = None
    offset: int = 0
    busy: bool = False
    last_seen: float = field(default_factory=time.monotonic)


class UploadSessions:
    """Open resumable uploads by id, over one FileManager."""

    def __init__(self, files: FileManager, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self._files = files
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, _Session] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    async def start(self, tenant: str, display_name: str, mime_type: str, declared_size: int | None) -> str:
        """Open a session and return its id.

        The metadata and the tenant's quotas are checked now, before the
        client sends a byte: the error comes back on the start request.
        """
        display_name, mime_type = validate_metadata(display_name, mime_type)
        if sum(1 for s in self._sessions.values() if s.tenant == tenant) >= MAX_SESSIONS_PER_TENANT:
            raise FailedPrecondition(
                f"{MAX_SESSIONS_PER_TENANT} uploads of this tenant are open; finish or abandon one first "
                f"(an idle one is dropped after {self.idle_timeout_s:g} s)",
                reason="TOO_MANY_UPLOADS",
            )
        session = _Session(secrets.token_urlsafe(32), tenant, declared_size)
        session.task = asyncio.create_task(
            self._files.create(tenant, display_name, mime_type, self._chunks(session)),
            name=f"longbatch-upload-{session.id[:8]}",
        )
        started = asyncio.create_task(session.started.wait())
        try:
            await asyncio.wait({session.task, started}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if session.task.done():
            session.task.result()  # refused before the first byte (a quota, say): raises
        self._sessions[session.id] = session
        self._ensure_sweeper()
        return session.id

    def offset(self, upload_id: str) -> int:
        """Bytes received so far by an open session (the ``query`` command)."""
        return self._get(upload_id).offset

    async def upload(self, upload_id: str, offset: int | None, body: AsyncIterator[bytes],
                     finalize: bool) -> StoredFile | None:
        """Stream one chunk request's body into the session; with
        ``finalize``, end the file and return it.

        Any failure but a wrong offset aborts the session, and what it had
        received is dropped.
        """
        session = self._get(upload_id)
        if session.busy:
            raise FailedPrecondition("another request of this upload is still sending; chunks go one at a time",
                                     reason="UPLOAD_BUSY")
        if offset is not None and offset != session.offset:
            # The session lives on: the client can ask (query) and resend.
            raise InvalidArgument(
                f"X-Goog-Upload-Offset is {offset}, but {session.offset} bytes were received so far",
                reason="UPLOAD_OFFSET_MISMATCH",
                violations=[("X-Goog-Upload-Offset", f"must be {session.offset}")],
            )
        session.busy = True
        try:
            async for data in body:
                if data:
                    await self._put(session, data)
                    session.offset += len(data)
            if not finalize:
                return None
            if session.declared_size is not None and session.offset != session.declared_size:
                raise InvalidArgument(
                    f"the upload ended after {session.offset} bytes, but its start declared "
                    f"{session.declared_size} (X-Goog-Upload-Header-Content-Length)",
                    reason="UPLOAD_SIZE_MISMATCH",
                    violations=[("X-Goog-Upload-Header-Content-Length", "differs from the bytes sent")],
                )
            await self._put(session, _END)
            assert session.task is not None
            stored = await asyncio.shield(session.task)
            self._sessions.pop(session.id, None)
            return stored
        except BaseException:
            await self.abort(upload_id)
            raise
        finally:
            session.busy = False
            session.last_seen = time.monotonic()

    async def abort(self, upload_id: str) -> None:
        """Drop a session and everything it received; no-op if unknown."""
        session = self._sessions.pop(upload_id, None)
        if session is None or session.task is None:
            return
        session.task.cancel()
        with contextlib.suppress(BaseException):
            await session.task

    async def close(self) -> None:
        """Abort every open session and stop the sweeper."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for upload_id in list(self._sessions):
            await self.abort(upload_id)

    def _get(self, upload_id: str) -> _Session:
        session = self._sessions.get(upload_id)
        if session is None:
            raise NotFound("no open upload has this id: it finished, failed, was idle too long, or never existed; "
                           "start the upload again", reason="UPLOAD_NOT_FOUND")
        session.last_seen = time.monotonic()
        return session

    async def _put(self, session: _Session, item: object) -> None:
        """Queue ``item`` for the file manager, or raise its error if the
        upload failed meanwhile (a size limit or quota, say)."""
        task = session.task
        assert task is not None
        if task.done():
            task.result()
            raise ServiceError("upload already ended")  # result() without an error: never expected
        if not session.queue.full():
            session.queue.put_nowait(item)
            return
        put = asyncio.ensure_future(session.queue.put(item))
        try:
            await asyncio.wait({put, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()
        if not put.done() or put.cancelled():
            task.result()

    @staticmethod
    async def _chunks(session: _Session) -> AsyncIterator[bytes]:
        session.started.set()
        while True:
            item = await session.queue.get()
            if item is _END:
                return
            assert isinstance(item, bytes)
            yield item

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="longbatch-upload-sweeper")

    async def _sweep(self) -> None:
        while self._sessions:
            await asyncio.sleep(max(0.01, min(30.0, self.idle_timeout_s / 4)))
            cutoff = time.monotonic() - self.idle_timeout_s
            for upload_id, session in list(self._sessions.items()):
                if not session.busy and session.last_seen < cutoff:
                    log.info("dropping upload %s…: no request for %g s", upload_id[:8], self.idle_timeout_s)
                    await self.abort(upload_id)
