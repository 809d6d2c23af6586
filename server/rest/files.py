"""Files over HTTP: uploads (resumable, multipart, media), get, list, delete
and the streamed download, in the Gemini REST shape. Every rule of files
lives in ``FileManager``; uploads stream into it (``uploads``) and
downloads stream out of it, a MiB at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web

from longbatch.v1 import file_pb2

from ..domain import StoredFile
from ..errors import InvalidArgument, ServiceError
from ..file_manager import FileManager
from ..services.files import DOWNLOAD_CHUNK, file_message
from ..validate import parse_name
from . import codec
from .common import (
    EMPTY,
    base_url,
    byte_count_header,
    json_body,
    json_response,
    page,
    page_size,
    split_action,
    str_param,
    tenant,
    version,
)
from .errors import error_response

if TYPE_CHECKING:
    from .app import EdgeRouter
from .uploads import UploadSessions

UPLOAD_STATUS = "X-Goog-Upload-Status"
_READ_CHUNK = 1 << 20
_MAX_METADATA = 64 << 10


def _upload_error(message: str, reason: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, violations=[(field, message)])


class FileRoutes:
    """The file routes' handlers."""

    def __init__(self, files: FileManager, sessions: UploadSessions) -> None:
        self._files = files
        self._sessions = sessions

    def add_to(self, router: EdgeRouter, version: str) -> None:
        """Register under ``/{version}``, ``/upload/{version}`` and ``/download/{version}``."""
        v = f"/{version}"
        router.add_post("/upload" + v + "/files", self.upload, name=f"{version}.files.upload")
        router.add_get(v + "/files", self.list, name=f"{version}.files.list")
        router.add_get(v + "/files/{tail}", self.get, name=f"{version}.files.get")
        router.add_delete(v + "/files/{tail}", self.delete, name=f"{version}.files.delete")
        router.add_get("/download" + v + "/files/{tail}", self.download_route, name=f"{version}.files.download")

    # -- metadata -------------------------------------------------------------

    def _render(self, request: web.Request, stored: StoredFile) -> dict[str, Any]:
        return codec.file_dict(file_message(stored), base_url(request), version(request))

    async def get(self, request: web.Request) -> web.StreamResponse:
        """``GET /{v}/files/{id}``, and ``GET /{v}/files/{id}:download?alt=media``."""
        file_id, action = split_action(request, "GET", "files", ("", "download"))
        if action == "download":
            return await self._download(request, file_id)
        stored = await self._files.get(tenant(request), parse_name(f"files/{file_id}", "files"))
        return json_response(codec.dumps(self._render(request, stored)))

    async def list(self, request: web.Request) -> web.Response:
        """``GET /{v}/files?pageSize=&pageToken=``: newest first."""
        files, token = await self._files.list(tenant(request), page_size(request),
                                              str_param(request, "pageToken", "page_token"))
        return page("files", [self._render(request, f) for f in files], token)

    async def delete(self, request: web.Request) -> web.Response:
        """``DELETE /{v}/files/{id}``."""
        file_id, _ = split_action(request, "DELETE", "files")
        await self._files.delete(tenant(request), parse_name(f"files/{file_id}", "files"))
        return json_response(EMPTY)

    # -- download -------------------------------------------------------------

    async def download_route(self, request: web.Request) -> web.StreamResponse:
        """``GET /download/{v}/files/{id}:download?alt=media``."""
        file_id, _ = split_action(request, "GET", "files", ("download",))
        return await self._download(request, file_id)

    async def _download(self, request: web.Request, file_id: str) -> web.StreamResponse:
        if request.query.get("alt") != "media":
            raise _upload_error("a download needs ?alt=media", "ALT_MEDIA_REQUIRED", "alt")
        download = await self._files.open_download(tenant(request), parse_name(f"files/{file_id}", "files"))
        try:
            content_type = download.file.mime_type or "application/octet-stream"
            response = web.StreamResponse(headers={"Content-Type": content_type})
            response.content_length = download.file.size_bytes
            await response.prepare(request)
            async for chunk in download.chunks(DOWNLOAD_CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            download.close()

    # -- uploads --------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """``POST /upload/{v}/files``: a resumable start or chunk, a multipart
        or a media upload."""
        upload_id = request.query.get("upload_id")
        if upload_id is not None:
            return await self._chunk(request, upload_id)
        protocol = (request.headers.get("X-Goog-Upload-Protocol") or request.query.get("uploadType") or "").lower()
        if protocol == "resumable":
            return await self._start(request)
        if protocol == "multipart":
            return await self._multipart(request)
        if protocol in ("media", "raw"):
            stored = await self._files.create(tenant(request), "", _media_type(request), _body(request))
            return self._final(request, stored)
        raise _upload_error(
            "say how the file is sent: header 'X-Goog-Upload-Protocol: resumable' (or multipart, raw), "
            "or ?uploadType=resumable|multipart|media", "UPLOAD_PROTOCOL_MISSING", "X-Goog-Upload-Protocol")

    async def _start(self, request: web.Request) -> web.Response:
        command = request.headers.get("X-Goog-Upload-Command", "start").lower()
        if command != "start":
            raise _upload_error(f"a resumable upload begins with X-Goog-Upload-Command: start, got {command[:40]!r}",
                                "UPLOAD_COMMAND_INVALID", "X-Goog-Upload-Command")
        meta = _file_metadata(await json_body(request, "upload metadata"))
        declared = _declared_size(request, meta)
        mime_type = meta.mime_type or request.headers.get("X-Goog-Upload-Header-Content-Type", "")
        upload_id = await self._sessions.start(tenant(request), meta.display_name, mime_type, declared)
        url = f"{base_url(request)}/upload/{version(request)}/files?upload_id={upload_id}&upload_protocol=resumable"
        # The exact spelling of X-Goog-Upload-URL matters: the SDK's aiohttp
        # client looks up only it and the all-lower-case one.
        return web.Response(body=b"", headers={"X-Goog-Upload-URL": url, UPLOAD_STATUS: "active",
                                              "X-Goog-Upload-Chunk-Granularity": str(_READ_CHUNK)})

    async def _chunk(self, request: web.Request, upload_id: str) -> web.StreamResponse:
        commands = {c.strip().lower() for c in request.headers.get("X-Goog-Upload-Command", "").split(",")}
        if commands == {"query"}:
            received = self._sessions.offset(upload_id)
            return web.Response(body=b"", headers={UPLOAD_STATUS: "active",
                                                  "X-Goog-Upload-Size-Received": str(received)})
        if commands == {"cancel"}:
            await self._sessions.abort(upload_id)
            return web.Response(body=b"", headers={UPLOAD_STATUS: "cancelled"})
        try:
            if not commands <= {"upload", "finalize"} or not commands:
                await self._sessions.abort(upload_id)
                raise _upload_error(
                    "X-Goog-Upload-Command must be 'upload', 'upload, finalize', 'finalize', 'query' or 'cancel'",
                    "UPLOAD_COMMAND_INVALID", "X-Goog-Upload-Command")
            offset = byte_count_header(request, "X-Goog-Upload-Offset", "UPLOAD_OFFSET_INVALID")
            stored = await self._sessions.upload(upload_id, offset, _body(request), "finalize" in commands)
        except ServiceError as e:
            # The SDK resends a chunk whose answer lacks the status; a session
            # that survived the error (a wrong offset) is still active.
            alive = e.reason == "UPLOAD_OFFSET_MISMATCH"
            if not alive:
                await self._sessions.abort(upload_id)
            return error_response(e, {UPLOAD_STATUS: "active" if alive else "final"})
        if stored is None:
            return web.Response(body=b"", headers={UPLOAD_STATUS: "active"})
        return self._final(request, stored)

    async def _multipart(self, request: web.Request) -> web.Response:
        try:
            reader = await request.multipart()
            first = await reader.next()
        except (AssertionError, ValueError, KeyError) as e:
            raise _upload_error(f"a multipart upload must be multipart/related with a boundary: {e}",
                                "MULTIPART_INVALID", "Content-Type") from None
        if not isinstance(first, BodyPartReader):
            raise _upload_error("a multipart upload's first part must be the file's JSON metadata",
                                "MULTIPART_INVALID", "body")
        raw = await first.read_chunk(_MAX_METADATA)
        if not first.at_eof():
            raise _upload_error(f"the metadata part is over {_MAX_METADATA} bytes", "MULTIPART_INVALID", "body")
        meta = _file_metadata(codec.parse_json(raw, "upload metadata"))
        second = await reader.next()
        if not isinstance(second, BodyPartReader):
            raise _upload_error("a multipart upload's second part must be the file's bytes",
                                "MULTIPART_INVALID", "body")
        mime_type = meta.mime_type or second.headers.get("Content-Type", "")
        stored = await self._files.create(tenant(request), meta.display_name, mime_type, _part(second))
        return self._final(request, stored)

    def _final(self, request: web.Request, stored: StoredFile) -> web.Response:
        return web.Response(body=codec.dumps({"file": self._render(request, stored)}),
                            content_type="application/json", headers={UPLOAD_STATUS: "final"})


def _file_metadata(body: dict[str, Any]) -> file_pb2.File:
    """``{"file": {...}}`` of an upload; a file's name is the server's to choose."""
    extra = set(body) - {"file"}
    if extra:
        raise _upload_error(f"unknown field {sorted(extra)[0][:60]!r} in the upload metadata; it holds only 'file'",
                            "INVALID_REQUEST_BODY", "body")
    value = body.get("file") or {}
    if not isinstance(value, dict):
        raise _upload_error("'file' must be an object", "INVALID_REQUEST_BODY", "file")
    meta = codec.to_message(value, file_pb2.File(), "file metadata")
    if meta.name:
        raise _upload_error("file.name cannot be chosen: this server names files itself (files/ID)",
                            "FILE_NAME_NOT_SETTABLE", "file.name")
    return meta


def _declared_size(request: web.Request, meta: file_pb2.File) -> int | None:
    size = byte_count_header(request, "X-Goog-Upload-Header-Content-Length", "UPLOAD_SIZE_INVALID")
    return size if size is not None else meta.size_bytes or None


def _media_type(request: web.Request) -> str:
    value = request.headers.get("Content-Type", "")
    return "" if value.lower().startswith("application/octet-stream") else value


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request's body as it arrives, a MiB at most per chunk."""
    async for data in request.content.iter_chunked(_READ_CHUNK):
        yield data


async def _part(part: BodyPartReader) -> AsyncIterator[bytes]:
    while data := await part.read_chunk(_READ_CHUNK):
        yield data

