"""longbatch.v1.FileService: the gRPC surface of ``FileManager``.

It frames the CreateFile stream (metadata first, bytes after), converts
files to protobuf and chunks downloads for gRPC; every rule of uploads,
downloads, listing, deletion and expiry lives in ``file_manager``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from google.protobuf import empty_pb2

from longbatch.v1 import file_pb2, file_pb2_grpc

from ..convert import timestamp
from ..domain import StoredFile
from ..edge import current_tenant
from ..errors import InvalidArgument
from ..file_manager import FileManager
from ..validate import parse_name

Context = grpc.aio.ServicerContext[Any, Any]

DOWNLOAD_CHUNK = 1 << 20
"""Bytes per DownloadFile message (the API promises at most 1 MiB)."""
_STATE_ACTIVE = file_pb2.File.State.STATE_ACTIVE
_SOURCES = {"uploaded": file_pb2.File.Source.SOURCE_UPLOADED, "generated": file_pb2.File.Source.SOURCE_GENERATED}


def file_message(f: StoredFile) -> file_pb2.File:
    """The File resource for a stored file."""
    return file_pb2.File(
        name=f.name,
        display_name=f.display_name,
        mime_type=f.mime_type,
        size_bytes=f.size_bytes,
        create_time=timestamp(f.create_time_us),
        # Files never change after creation.
        update_time=timestamp(f.create_time_us),
        expiration_time=timestamp(f.expire_time_us),
        sha256_hash=f.sha256,
        state=_STATE_ACTIVE,
        source=_SOURCES.get(f.source, file_pb2.File.Source.SOURCE_UNSPECIFIED),
    )


async def _data(messages: AsyncIterator[file_pb2.CreateFileRequest]) -> AsyncGenerator[bytes, None]:
    """The bytes of the CreateFile messages after the first; a message that is
    not `data` ends the upload with INVALID_UPLOAD_STREAM."""
    number = 1
    async for msg in messages:
        number += 1
        kind = msg.WhichOneof("payload")
        if kind != "data":
            problem = "repeats `file`" if kind == "file" else "sets neither `file` nor `data`"
            raise InvalidArgument(
                f"CreateFile message {number} {problem}; only the first message carries `file`, "
                "every later one `data`",
                reason="INVALID_UPLOAD_STREAM", violations=[("data", f"must be set in message {number}")],
            )
        yield msg.data


class FileService(file_pb2_grpc.FileServiceServicer):
    """Creates, reads, lists and deletes the caller's files."""

    def __init__(self, manager: FileManager) -> None:
        self._manager = manager

    async def CreateFile(
        self, request_iterator: AsyncIterator[file_pb2.CreateFileRequest], context: Context
    ) -> file_pb2.File:
        """Store an uploaded file: metadata first, then the bytes."""
        tenant = current_tenant()
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("payload") != "file":
            raise InvalidArgument(
                "the first CreateFile message must carry `file` (the metadata); the bytes follow in later messages",
                reason="FILE_METADATA_MISSING", violations=[("file", "must be set in the first message")],
            )
        # Output-only fields of the metadata are ignored. aclosing: an upload
        # refused midway closes the framing generator now, not at GC.
        async with contextlib.aclosing(_data(messages)) as chunks:
            stored = await self._manager.create(tenant, first.file.display_name, first.file.mime_type, chunks)
        return file_message(stored)

    async def GetFile(self, request: file_pb2.GetFileRequest, context: Context) -> file_pb2.File:
        """One file's metadata."""
        return file_message(await self._manager.get(current_tenant(), parse_name(request.name, "files")))

    async def ListFiles(self, request: file_pb2.ListFilesRequest, context: Context) -> file_pb2.ListFilesResponse:
        """A page of the caller's files, newest first."""
        page, token = await self._manager.list(current_tenant(), request.page_size, request.page_token)
        return file_pb2.ListFilesResponse(files=[file_message(f) for f in page], next_page_token=token)

    async def DeleteFile(self, request: file_pb2.DeleteFileRequest, context: Context) -> empty_pb2.Empty:
        """Delete a file and its bytes, unless a batch that is not done reads it."""
        await self._manager.delete(current_tenant(), parse_name(request.name, "files"))
        return empty_pb2.Empty()

    async def DownloadFile(
        self, request: file_pb2.DownloadFileRequest, context: Context
    ) -> AsyncIterator[file_pb2.DownloadFileResponse]:
        """Stream a file's bytes in chunks of at most 1 MiB."""
        download = await self._manager.open_download(current_tenant(), parse_name(request.name, "files"))
        try:
            async for chunk in download.chunks(DOWNLOAD_CHUNK):
                yield file_pb2.DownloadFileResponse(data=chunk)
        finally:
            download.close()
