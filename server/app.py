"""The composition root: builds the server and shuts it down in order."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import _async as health_aio  # the public `health.aio` alias is missing from grpc-stubs
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from longbatch.v1 import batch_pb2_grpc, file_pb2_grpc, model_pb2_grpc, quota_pb2_grpc

from .backends import create_backend
from .batch_requests import BatchRequests
from .config import ServerConfig
from .datadir import DB_NAME, secure_data_dir
from .domain import Batch
from .edge import Authenticator, EdgeRegistrar
from .events import BatchEvents, LocalEvents
from .executor import Executor, ModelRuntime
from .file_manager import FileExpiry, FileManager
from .files import DiskFileBytes, FileBytes
from .ingest import ingest
from .manager import BatchManager
from .metrics import Metrics
from .notifier import Notifier
from .outputs import Outputs
from .paging import PageTokens
from .pg_events import PgEvents
from .pg_file_bytes import PgFileBytes
from .pg_server_lock import ServerLock
from .pg_store import PostgresStore
from .quotas import Quotas
from .reflection import enable_reflection
from .rest.app import HttpSurface
from .retention import RetentionPurge
from .services.batches import BatchService
from .services.files import FileService
from .services.models import ModelService
from .services.operations import OperationsService
from .services.quotas import QuotaService
from .sqlite_store import SQLiteStore
from .store import Store
from .tls import CertificateReloader
from .views import OperationViews
from .webhooks import WebhookDispatcher
from .workers import WorkerPool

log = logging.getLogger("longbatch")

SERVICE_NAMES = (
    "longbatch.v1.BatchService",
    "longbatch.v1.FileService",
    "longbatch.v1.ModelService",
    "longbatch.v1.QuotaService",
    "google.longrunning.Operations",
    health.SERVICE_NAME,
)


@dataclass
class Running:
    """A started server: its port and the parts that must stop in order."""

    port: int
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    executor: Executor
    store: Store
    grace_s: float
    file_expiry: FileExpiry | None = None
    webhooks: WebhookDispatcher | None = None
    workers: WorkerPool | None = None
    outputs: Outputs | None = None
    retention: RetentionPurge | None = None
    http: HttpSurface | None = None
    events: BatchEvents | None = None
    server_lock: ServerLock | None = None
    _stopped: bool = False

    @property
    def http_port(self) -> int:
        """The REST API's port (0 when HTTP is off)."""
        return self.http.port if self.http is not None else 0

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, finish in-flight RPCs, stop the executor, close
        the store. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace)
        await self.executor.stop(grace)
        if self.events is not None:  # after the executor, which publishes the batches it finishes
            await self.events.close()
        if self.outputs is not None:  # after the executor, which writes outputs of the batches it finishes
            await self.outputs.close()
        if self.workers is not None:  # after the executor: batches it finishes write their outputs there
            await asyncio.to_thread(self.workers.close)
        if self.webhooks is not None:  # after the executor: its last batches still enqueue
            await self.webhooks.stop(grace)
        if self.file_expiry is not None:
            await self.file_expiry.stop()
        if self.retention is not None:  # before the store closes: a purge step finishes first
            await self.retention.stop()
        await self.store.close()
        if self.server_lock is not None:  # last: until the store is closed, this server still writes
            await self.server_lock.release()
        log.info("longbatch stopped")


async def start_server(
    config: ServerConfig, data_dir: Path, host: str = "127.0.0.1", port: int = 0,
    tls: CertificateReloader | None = None, http_port: int | None = None, database_url: str | None = None,
) -> Running:
    """Build every part, bind ``host:port`` (0 picks a free port) and start.

    With ``tls`` the port speaks TLS only (mTLS when it has a client CA);
    without, plaintext: ``longbatch serve`` decides which a host may have.
    With ``http_port`` (0 picks a free one) the REST API listens there too,
    on the same host and with the same TLS.

    With ``database_url`` (``postgresql://…``) batches, files' bytes and
    events live in that PostgreSQL database and ``data_dir`` holds only
    scratch space; without, everything is in SQLite and files under
    ``data_dir``. One server per database for now: a second is refused
    (``pg_server_lock.DatabaseInUse``) until the executor leases its work.

    Raises:
        pg_store.DatabaseUnavailable: the database does not answer or refuses.
        pg_server_lock.DatabaseInUse: another server uses the database.
    """
    # Before SQLite and the file storage create anything there (with PostgreSQL,
    # the scratch space: data dir private, everything under it unreachable).
    secure_data_dir(data_dir, sqlite=database_url is None)
    if database_url is None:
        store: Store = SQLiteStore(data_dir / DB_NAME)
        await store.open()
        try:
            return await _assemble(config, store, DiskFileBytes(data_dir / "files"), LocalEvents(),
                                   host, port, tls, http_port)
        except BaseException:
            await store.close()
            raise
    # The lock first: a refused second server must not even migrate the schema
    # under the running one.
    lock = ServerLock(database_url)
    await lock.acquire()
    try:
        pg = PostgresStore(database_url)
        await pg.open()
        try:
            running = await _assemble(config, pg, PgFileBytes(pg, data_dir / "scratch"),
                                      PgEvents(database_url, pool=pg.pool), host, port, tls, http_port)
        except BaseException:
            await pg.close()
            raise
    except BaseException:
        await lock.release()
        raise
    running.server_lock = lock
    return running


async def _assemble(
    config: ServerConfig, store: Store, files: FileBytes, events: BatchEvents, host: str, port: int,
    tls: CertificateReloader | None, http_port: int | None,
) -> Running:
    files.prepare()
    metrics = Metrics(batch_counts=store.count_batches_by_state)
    notifier = Notifier()
    # LocalEvents in process; PgEvents when the store is PostgreSQL (one
    # server per database for now, but the bus is already the replicas' one).
    events.subscribe(notifier.on_event, notifier.on_resync)
    workers = WorkerPool(config.workers)
    outputs = Outputs(store, files, config.limits.max_inline_output, workers=workers)
    runtimes = {
        m.name: ModelRuntime(name=m.name, backend=create_backend(m), max_concurrency=m.max_concurrency)
        for m in config.models
    }

    # Built-in quota defaults apply once callers authenticate (API keys or
    # client certificates): an open server's one caller is its operator.
    quotas = Quotas(config.quotas, store, open_server=not (config.api_keys or config.tls_clients))

    async def read_input(batch: Batch) -> int:
        assert batch.input_file is not None
        async with files.local_path(batch.input_file) as path:
            return await ingest(batch, path, config.limits,
                                quotas.ingest_append(batch, functools.partial(store.append_requests, batch.id)),
                                workers)

    executor = Executor(store, runtimes, config.executor, outputs, events, config.limits.batch_ttl_s, read_input,
                        workers, tenant_weights={t.name: t.weight for t in config.tenants}, metrics=metrics)
    webhooks = WebhookDispatcher(store, config.webhooks, config.webhook_secret)
    executor.on_terminal = webhooks.on_terminal
    tokens = PageTokens(await store.secret("page-token-key"))
    models = {m.name: m for m in config.models}
    manager = BatchManager(store, executor, outputs, notifier, files, models, config.limits, tokens, quotas)

    # A create call over the limit is refused by gRPC itself with
    # RESOURCE_EXHAUSTED before it is read into memory.
    max_message = config.limits.max_create_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
        ],
    )
    # The generated add_* functions only call the registration methods, which
    # EdgeRegistrar provides; it stands in for the server to wrap each handler.
    auth = Authenticator(config.api_keys, config.tls_clients)
    edge = cast(grpc.aio.Server, EdgeRegistrar(server, auth, metrics))
    batch_requests = BatchRequests(manager, config.limits, config.webhooks)
    batch_pb2_grpc.add_BatchServiceServicer_to_server(BatchService(batch_requests), edge)
    views = OperationViews(manager)
    operations_pb2_grpc.add_OperationsServicer_to_server(OperationsService(manager, views), edge)
    model_service = ModelService(config.models, tokens)
    model_pb2_grpc.add_ModelServiceServicer_to_server(model_service, edge)
    file_manager = FileManager(store, files, config.limits, tokens, on_large_upload=workers.warm, quotas=quotas)
    file_pb2_grpc.add_FileServiceServicer_to_server(FileService(file_manager), edge)
    quota_pb2_grpc.add_QuotaServiceServicer_to_server(QuotaService(quotas), edge)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, SERVICE_NAMES)

    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, tls.credentials())
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    http = None
    if http_port is not None:
        http = HttpSurface(auth, batch_requests, views, file_manager, model_service,
                           max_body=config.limits.max_create_bytes, metrics=metrics.exposition,
                           observe=metrics.observe_http)
    await webhooks.start()
    await events.start()
    try:
        await executor.start()
        await server.start()
    except BaseException:
        await events.close()  # PgEvents holds a listener connection of its own
        raise
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    file_expiry = FileExpiry(store, files, config.limits.file_ttl_s)
    file_expiry.start()
    retention = RetentionPurge(store, files, outputs, config.limits.retention_s)
    retention.start()
    running = Running(bound, server, health_servicer, executor, store, config.grace_period_s,
                      file_expiry=file_expiry, webhooks=webhooks, workers=workers, outputs=outputs,
                      retention=retention, http=http, events=events)
    if http is not None and http_port is not None:
        # Last, once everything it calls runs; a port it cannot have stops the rest again.
        try:
            await http.start(host, http_port, tls.ssl_context() if tls is not None else None, config.grace_period_s)
        except OSError as e:
            await running.stop(0)
            raise OSError(f"cannot listen for HTTP on {host}:{http_port}: {e.strerror or e}") from e
    return running
