"""``Client``: the asyncio client of a longbatch server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2, field_mask_pb2
from grpc import aio

from longbatch.client.errors import from_rpc_error
from longbatch.client.operation import Batch, BatchOperation
from longbatch.v1 import (
    batch_pb2,
    batch_pb2_grpc,
    content_pb2,
    file_pb2,
    file_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

DEFAULT_TARGET = "127.0.0.1:50051"
CHUNK_SIZE = 1 << 20
"""Upload chunk size: 1 MiB keeps each message far below the 4 MiB receive limit."""
_WAIT_SLACK_S = 5.0
"""Added to a WaitOperation's deadline so the server's own timeout, not the deadline, ends the call."""


@contextlib.contextmanager
def _converted() -> Iterator[None]:
    """Turns gRPC errors raised inside the block into ``LongbatchError``."""
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err


def _model_name(model: str) -> str:
    return model if model.startswith("models/") else f"models/{model}"


@dataclass(frozen=True)
class TlsOptions:
    """How a ``Client`` connects over TLS.

    With no field set, the server's certificate is checked against the
    system's trusted roots and no client certificate is sent.
    """

    ca: str | os.PathLike[str] | None = None
    """PEM file of the CA(s) to trust for the server's certificate, instead of the system's roots."""
    cert: str | os.PathLike[str] | None = None
    """PEM client certificate chain, for a server that requires mTLS; needs ``key``."""
    key: str | os.PathLike[str] | None = None
    """PEM private key of ``cert``, unencrypted."""
    server_name: str | None = None
    """The name to check the server's certificate against, when it is not the target's host."""

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files, each read and checked now.

        Raises:
            ValueError: a file is unreadable or not valid PEM, the key does
                not match the certificate, or only one of them was given.
        """
        if (self.cert is None) != (self.key is None):
            raise ValueError("a TLS client certificate and its key go together: give both or neither")
        ca = _read_pem(self.ca, "TLS CA") if self.ca is not None else None
        if ca is not None:
            try:
                ssl.create_default_context(cadata=ca.decode("ascii"))
            except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"the TLS CA file {self.ca} holds no valid PEM certificate") from e
        cert = key = None
        if self.cert is not None and self.key is not None:
            cert, key = _read_pem(self.cert, "TLS client certificate"), _read_pem(self.key, "TLS client key")
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(self.cert, self.key, password=_no_password)
            except ssl.SSLError as e:
                raise ValueError(f"the TLS client key {self.key} does not match the certificate {self.cert}, or "
                                 f"one is not valid PEM ({e.reason or e})") from e
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _no_password() -> str:
    # Called by OpenSSL only for an encrypted key; without this it would prompt on the terminal.
    raise ValueError("the TLS client key is encrypted; gRPC needs an unencrypted PEM key")


def _read_pem(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {path}: {e.strerror or e}") from e


def _open_read(path: Path) -> BinaryIO:
    return open(path, "rb")


def _open_write(path: Path) -> BinaryIO:
    return open(path, "wb")


def _channel(target: str, tls: bool | TlsOptions) -> aio.Channel:
    if not isinstance(tls, TlsOptions):
        if not tls:
            return aio.insecure_channel(target)
        tls = TlsOptions()
    options = tls
    channel_options = [("grpc.ssl_target_name_override", options.server_name)] if options.server_name else []
    return aio.secure_channel(target, options.credentials(), options=channel_options)


class Client:
    """An asyncio client for one longbatch server.

    Every failed call raises a ``LongbatchError`` subclass (see ``errors``).
    Use it as ``async with Client(target) as client:`` or call ``close()``.

    Args:
        target: ``host:port`` of the server when no channel is given.
        api_key: Sent on every call as ``x-goog-api-key``.
        tls: Connect over TLS: ``True`` trusts the system's roots, a
            ``TlsOptions`` names a CA, a client certificate (mTLS) or the
            server name; ``False`` (the default) is plaintext.
        channel: A ready ``grpc.aio`` channel; the client does not close a
            channel it was given (``tls`` is then unused).
        timeout: Deadline in seconds of each unary call (waits and streams
            excepted); None for no deadline.

    Raises:
        ValueError: a TLS file is unreadable or invalid.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool | TlsOptions = False,
        channel: aio.Channel | None = None,
        timeout: float | None = 60.0,
    ) -> None:
        self._owns_channel = channel is None
        if channel is None:
            channel = _channel(target, tls)
        self._channel = channel
        self._metadata: tuple[tuple[str, str], ...] = (("x-goog-api-key", api_key),) if api_key else ()
        self._timeout = timeout
        self._batches = batch_pb2_grpc.BatchServiceStub(self._channel)
        self._operations = operations_pb2_grpc.OperationsStub(self._channel)
        self._files = file_pb2_grpc.FileServiceStub(self._channel)
        self._models = model_pb2_grpc.ModelServiceStub(self._channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel, if the client created it."""
        if self._owns_channel:
            await self._channel.close(None)

    async def _unary(
        self, method: aio.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req, deadline_s: float | None = None
    ) -> _Resp:
        with _converted():
            return await method(
                request,
                timeout=self._timeout if deadline_s is None else deadline_s,
                metadata=self._metadata,
            )

    # Batches and their operations.

    def _handle(self, operation: operations_pb2.Operation) -> BatchOperation:
        name = str(operation.name)

        async def refresh() -> operations_pb2.Operation:
            return await self._get_raw(name)

        async def wait(timeout_s: float) -> operations_pb2.Operation:
            return await self._wait_raw(name, timeout_s)

        async def cancel() -> None:
            await self.cancel_operation(name)

        return BatchOperation(operation, refresh=refresh, wait=wait, cancel=cancel)

    async def _get_raw(self, name: str) -> operations_pb2.Operation:
        return await self._unary(self._operations.GetOperation, operations_pb2.GetOperationRequest(name=name))

    async def _wait_raw(self, name: str, timeout_s: float) -> operations_pb2.Operation:
        timeout = duration_pb2.Duration()
        timeout.FromNanoseconds(int(max(0.0, timeout_s) * 1e9))
        request = operations_pb2.WaitOperationRequest(name=name, timeout=timeout)
        return await self._unary(self._operations.WaitOperation, request, deadline_s=timeout_s + _WAIT_SLACK_S)

    async def create_generate_batch(
        self,
        model: str,
        requests: Sequence[content_pb2.GenerateContentRequest | batch_pb2.InlinedRequest] | None = None,
        *,
        file_name: str | None = None,
        display_name: str = "",
        priority: int = 0,
        webhook_uris: Sequence[str] = (),
        request_id: str = "",
    ) -> BatchOperation:
        """Creates a batch of generation requests.

        Args:
            model: ``models/{model}`` (a bare ``echo`` is taken as ``models/echo``).
            requests: Inline requests; give these or ``file_name``.
            file_name: An uploaded ``files/{id}`` holding JSONL lines.
            display_name: A human-readable name.
            priority: Higher runs first.
            webhook_uris: Endpoints to notify at the terminal state.
            request_id: Idempotency key: resending it returns the first operation.

        Returns:
            The new batch's operation (state PENDING).

        Raises:
            ValueError: Neither or both of ``requests`` and ``file_name`` given.
        """
        config = batch_pb2.InputConfig()
        if (requests is None) == (file_name is None):
            raise ValueError("give exactly one of requests and file_name")
        if file_name is not None:
            config.file_name = file_name
        else:
            config.requests.SetInParent()
            config.requests.requests.extend(
                item if isinstance(item, batch_pb2.InlinedRequest) else batch_pb2.InlinedRequest(request=item)
                for item in requests or ()
            )
        batch = batch_pb2.GenerateContentBatch(
            model=_model_name(model),
            display_name=display_name,
            input_config=config,
            priority=priority,
        )
        if webhook_uris:
            batch.webhook_config.uris.extend(webhook_uris)
        request = batch_pb2.BatchGenerateContentRequest(batch=batch, request_id=request_id)
        return self._handle(await self._unary(self._batches.BatchGenerateContent, request))

    async def create_embed_batch(
        self,
        model: str,
        requests: Sequence[content_pb2.EmbedContentRequest | batch_pb2.InlinedEmbedContentRequest] | None = None,
        *,
        file_name: str | None = None,
        display_name: str = "",
        priority: int = 0,
        webhook_uris: Sequence[str] = (),
        request_id: str = "",
    ) -> BatchOperation:
        """Creates a batch of embedding requests; arguments as in ``create_generate_batch``."""
        config = batch_pb2.InputEmbedContentConfig()
        if (requests is None) == (file_name is None):
            raise ValueError("give exactly one of requests and file_name")
        if file_name is not None:
            config.file_name = file_name
        else:
            config.requests.SetInParent()
            config.requests.requests.extend(
                item
                if isinstance(item, batch_pb2.InlinedEmbedContentRequest)
                else batch_pb2.InlinedEmbedContentRequest(request=item)
                for item in requests or ()
            )
        batch = batch_pb2.EmbedContentBatch(
            model=_model_name(model),
            display_name=display_name,
            input_config=config,
            priority=priority,
        )
        if webhook_uris:
            batch.webhook_config.uris.extend(webhook_uris)
        request = batch_pb2.AsyncBatchEmbedContentRequest(batch=batch, request_id=request_id)
        return self._handle(await self._unary(self._batches.AsyncBatchEmbedContent, request))

    async def get_operation(self, name: str) -> BatchOperation:
        """Gets a batch's operation by name, ``batches/{id}``."""
        return self._handle(await self._get_raw(name))

    async def list_operations(self, filter: str = "", page_size: int = 0) -> AsyncIterator[BatchOperation]:
        """Iterates over the caller's batches, newest first, fetching pages as needed.

        Listed batches come without their ``output``; ``refresh()`` one to read it.

        Args:
            filter: An AIP-160 filter over ``state``, ``done``, ``model``,
                ``display_name``, ``create_time`` and ``priority``, e.g.
                ``state = BATCH_STATE_RUNNING AND priority > 0``.
            page_size: Operations per page; 0 lets the server choose (50).
        """
        token = ""
        while True:
            request = operations_pb2.ListOperationsRequest(
                name="batches", filter=filter, page_size=page_size, page_token=token
            )
            response = await self._unary(self._operations.ListOperations, request)
            for operation in response.operations:
                yield self._handle(operation)
            token = str(response.next_page_token)
            if not token:
                return

    async def cancel_operation(self, name: str) -> None:
        """Asks the server to cancel a batch; a done batch is left as it is."""
        await self._unary(self._operations.CancelOperation, operations_pb2.CancelOperationRequest(name=name))

    async def delete_operation(self, name: str) -> None:
        """Deletes a finished batch with its results (a pending or running one is FailedPrecondition)."""
        await self._unary(self._operations.DeleteOperation, operations_pb2.DeleteOperationRequest(name=name))

    async def wait_operation(self, name: str, timeout_s: float = 60.0) -> BatchOperation:
        """Waits until the batch is done or ``timeout_s`` (at most 600) passes, then returns it.

        Unlike ``BatchOperation.result()`` this returns after one server wait,
        done or not.
        """
        return self._handle(await self._wait_raw(name, timeout_s))

    async def update_batch(self, name: str, *, display_name: str | None = None, priority: int | None = None) -> Batch:
        """Changes a batch's display name and/or priority.

        Args:
            name: The batch, ``batches/{id}``.
            display_name: The new display name, or None to keep it.
            priority: The new priority (only while not done), or None to keep it.

        Returns:
            The updated ``GenerateContentBatch`` or ``EmbedContentBatch``.

        Raises:
            ValueError: Neither field was given.
        """
        paths = [path for path, value in (("display_name", display_name), ("priority", priority)) if value is not None]
        if not paths:
            raise ValueError("nothing to update: give display_name and/or priority")
        mask = field_mask_pb2.FieldMask(paths=paths)
        display = display_name or ""
        rank = priority or 0
        # The two batch kinds have separate update methods; the operation's metadata says which this is.
        if (await self.get_operation(name)).kind == "embed":
            embed = batch_pb2.UpdateEmbedContentBatchRequest(
                batch=batch_pb2.EmbedContentBatch(name=name, display_name=display, priority=rank),
                update_mask=mask,
            )
            return await self._unary(self._batches.UpdateEmbedContentBatch, embed)
        generate = batch_pb2.UpdateGenerateContentBatchRequest(
            batch=batch_pb2.GenerateContentBatch(name=name, display_name=display, priority=rank),
            update_mask=mask,
        )
        return await self._unary(self._batches.UpdateGenerateContentBatch, generate)

    async def stream_results(self, name: str, start_index: int = 0) -> AsyncIterator[batch_pb2.BatchResult]:
        """Iterates over a batch's finished results in input order, from ``start_index``.

        Works in any state: while the batch runs, the stream ends at the first
        request not yet finished; resume later from the next index.
        """
        request = batch_pb2.StreamBatchResultsRequest(name=name, start_index=start_index)
        call = self._batches.StreamBatchResults(request, metadata=self._metadata)
        try:
            with _converted():
                async for result in call:
                    yield result
        finally:
            call.cancel()

    # Models.

    async def list_models(self) -> list[model_pb2.Model]:
        """Lists every model the server serves, in name order."""
        models: list[model_pb2.Model] = []
        token = ""
        while True:
            response = await self._unary(self._models.ListModels, model_pb2.ListModelsRequest(page_token=token))
            models.extend(response.models)
            token = response.next_page_token
            if not token:
                return models

    async def get_model(self, name: str) -> model_pb2.Model:
        """Gets one model, ``models/{model}`` (or the bare model id)."""
        return await self._unary(self._models.GetModel, model_pb2.GetModelRequest(name=_model_name(name)))

    # Quotas.

    async def get_usage(self) -> quota_pb2.GetUsageResponse:
        """Gets the caller's quotas, each with its current use (``QuotaService.GetUsage``)."""
        stub = quota_pb2_grpc.QuotaServiceStub(self._channel)
        return await self._unary(stub.GetUsage, quota_pb2.GetUsageRequest())

    # Files.

    async def upload_file(
        self,
        path: str | os.PathLike[str],
        display_name: str | None = None,
        mime_type: str = "application/jsonl",
        chunk_size: int = CHUNK_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> file_pb2.File:
        """Uploads a local file, streaming it in chunks.

        Args:
            path: The local file.
            display_name: Defaults to the file's base name.
            mime_type: The file's media type.
            chunk_size: Bytes per message.
            progress: Called with the total bytes sent so far after each chunk.

        Returns:
            The stored ``File`` with its name, size and SHA-256.
        """
        path = Path(path)
        # Opened before the call starts, so a missing file raises here rather
        # than inside grpc's request iterator.
        source = await asyncio.to_thread(_open_read, path)
        metadata = file_pb2.File(display_name=display_name or path.name, mime_type=mime_type)

        async def messages() -> AsyncIterator[file_pb2.CreateFileRequest]:
            yield file_pb2.CreateFileRequest(file=metadata)
            sent = 0
            while chunk := await asyncio.to_thread(source.read, chunk_size):
                yield file_pb2.CreateFileRequest(data=chunk)
                sent += len(chunk)
                if progress is not None:
                    progress(sent)

        try:
            with _converted():
                return await self._files.CreateFile(messages(), metadata=self._metadata)
        finally:
            source.close()

    async def get_file(self, name: str) -> file_pb2.File:
        """Gets a file's metadata, ``files/{id}``."""
        return await self._unary(self._files.GetFile, file_pb2.GetFileRequest(name=name))

    async def list_files(self, page_size: int = 0) -> AsyncIterator[file_pb2.File]:
        """Iterates over the caller's files, newest first, fetching pages as needed."""
        token = ""
        while True:
            request = file_pb2.ListFilesRequest(page_size=page_size, page_token=token)
            response = await self._unary(self._files.ListFiles, request)
            for file in response.files:
                yield file
            token = response.next_page_token
            if not token:
                return

    async def delete_file(self, name: str) -> None:
        """Deletes a file (one a pending or running batch reads is FailedPrecondition)."""
        await self._unary(self._files.DeleteFile, file_pb2.DeleteFileRequest(name=name))

    async def iter_file(self, name: str) -> AsyncIterator[bytes]:
        """Iterates over a file's bytes in chunks of at most 1 MiB."""
        call = self._files.DownloadFile(file_pb2.DownloadFileRequest(name=name), metadata=self._metadata)
        try:
            with _converted():
                async for response in call:
                    yield response.data
        finally:
            call.cancel()

    async def download_file(
        self,
        name: str,
        dest_path: str | os.PathLike[str],
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Downloads a file to ``dest_path``; a download cut off midway leaves no file.

        Args:
            name: The file, ``files/{id}``.
            dest_path: Where to write it; replaced if it exists.
            progress: Called with the total bytes received so far after each chunk.

        Returns:
            The number of bytes written.
        """
        dest = Path(dest_path)
        partial = dest.with_name(dest.name + ".part")
        sink = await asyncio.to_thread(_open_write, partial)
        received = 0
        try:
            async for chunk in self.iter_file(name):
                await asyncio.to_thread(sink.write, chunk)
                received += len(chunk)
                if progress is not None:
                    progress(received)
            sink.close()
            partial.replace(dest)
        except BaseException:
            sink.close()
            partial.unlink(missing_ok=True)
            raise
        return received
