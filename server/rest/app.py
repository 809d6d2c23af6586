"""The HTTP surface: the Gemini REST API, ``/metrics`` and ``/healthz``, on
aiohttp.web in the server's own event loop.

Every route's handler is wrapped once, as the gRPC edge wraps every method: it
authenticates the caller (the same keys and tenants as gRPC: an
``x-goog-api-key`` or ``authorization: Bearer`` header, or ``?key=``; a
client certificate under mTLS), turns every error into the Google error body
through one table (``errors.HTTP_STATUS``), answers an unexpected exception
with a generic 500 (the traceback goes to the log, never to the client) and
times the request for the metrics. ``/metrics``, ``/healthz`` and the chunk
requests of a resumable upload (authorised by their upload id) take no key.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final

from aiohttp import web
from google.rpc import code_pb2

from ..batch_requests import BatchRequests
from ..edge import Authenticator
from ..errors import Internal, ServiceError
from ..file_manager import FileManager
from ..services.models import ModelService
from ..views import OperationViews
from .batches import BatchRoutes
from .common import MAX_BODY, set_tenant
from .errors import HttpError, error_response, plain_error
from .files import FileRoutes
from .models import ModelRoutes
from .uploads import UploadSessions

log = logging.getLogger("longbatch.http")

VERSIONS: Final = ("v1beta", "v1")
"""API versions served: the google-genai SDK's default changed between releases."""
_PUBLIC: Final = frozenset({"healthz", "metrics"})

Observe = Callable[[str, str, int, float], None]
"""A metrics hook: (route, method, status, seconds)."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Exposition = Callable[[], tuple[bytes, str]]
"""The metrics page: (body, content type)."""


class EdgeRouter:
    """Stands in for aiohttp's router while routes register: every handler
    is registered wrapped by the edge (``HttpSurface._wrap``), under its name."""

    def __init__(self, router: web.UrlDispatcher, wrap: Callable[[Handler, str], Handler]) -> None:
        self._router = router
        self._wrap = wrap

    def add_get(self, path: str, handler: Handler, *, name: str) -> None:
        """A GET (and HEAD) route."""
        self._router.add_get(path, self._wrap(handler, name), name=name)

    def add_post(self, path: str, handler: Handler, *, name: str) -> None:
        """A POST route."""
        self._router.add_post(path, self._wrap(handler, name), name=name)

    def add_delete(self, path: str, handler: Handler, *, name: str) -> None:
        """A DELETE route."""
        self._router.add_delete(path, self._wrap(handler, name), name=name)

    def add_patch(self, path: str, handler: Handler, *, name: str) -> None:
        """A PATCH route."""
        self._router.add_patch(path, self._wrap(handler, name), name=name)


class HttpSurface:
    """The REST API as an aiohttp application, started and stopped with the server."""

    def __init__(
        self,
        auth: Authenticator,
        requests: BatchRequests,
        views: OperationViews,
        files: FileManager,
        models: ModelService,
        max_body: int,
        metrics: Exposition | None = None,
        observe: Observe | None = None,
    ) -> None:
        self._auth = auth
        self._observe = observe
        self._metrics = metrics
        self._serving = False
        self.uploads = UploadSessions(files)
        """The open resumable uploads."""
        self.app = web.Application(client_max_size=max_body)
        self.app[MAX_BODY] = max_body
        router = EdgeRouter(self.app.router, self._wrap)
        router.add_get("/healthz", self._healthz, name="healthz")
        router.add_get("/metrics", self._metrics_page, name="metrics")
        # Literal version prefixes, not a {version} pattern: aiohttp indexes
        # routes by their literal prefix, so a request finds its route in
        # one lookup instead of trying every pattern in turn.
        batches, file_routes, model_routes = BatchRoutes(requests, views), FileRoutes(files, self.uploads), \
            ModelRoutes(models)
        for version in VERSIONS:
            batches.add_to(router, version)
            file_routes.add_to(router, version)
            model_routes.add_to(router, version)
        # Last: whatever no route above took gets a Google error body too.
        self._fallback = self.app.router.add_route("*", "/{path:.*}", self._wrap(self._no_route, "unmatched"))
        self._runner: web.AppRunner | None = None
        self.port = 0
        """The bound port, once started."""

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                    grace_s: float = 5.0) -> int:
        """Listen on ``host:port`` (0 picks a free port) and return the port."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=grace_s)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._serving = True
        address = runner.addresses[0]
        self.port = int(address[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening, finish requests in flight (within the grace
        period), drop open uploads. Safe to call twice."""
        self._serving = False
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self.uploads.close()

    # -- the edge ---------------------------------------------------------------

    def _wrap(self, handler: Handler, route: str) -> Handler:
        """``handler`` behind the edge: auth, error mapping, timing. Done once
        per route at registration, as the gRPC edge does: an aiohttp
        middleware would add two layers of calls to every request."""
        public = route in _PUBLIC or route == "unmatched"
        chunks = route.endswith(".files.upload")  # resumable chunks: authorised by their upload id
        observe = self._observe

        async def call(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            try:
                if not public and not (chunks and "upload_id" in request.query):
                    set_tenant(request, self._tenant(request))
                response = await handler(request)
            except ServiceError as e:
                response = error_response(e)
            except web.HTTPException as e:
                response = _http_exception(e, request)
            except ConnectionError:
                # The client went away mid-request (an upload cut, say): nobody
                # reads an answer; what it sent was dropped by the handler.
                log.debug("client left during %s %s", request.method, request.path)
                response = web.Response(status=499)
            except Exception:
                log.exception("unexpected error in %s %s", request.method, request.path)
                response = error_response(Internal("internal error; see the server log"))
            if observe is not None:
                observe(route, request.method, response.status, time.perf_counter() - started)
            return response

        return call

    async def _no_route(self, request: web.Request) -> web.StreamResponse:
        """404 for a path no route has, 405 (with ``Allow``) for a path some
        route has under other methods."""
        allowed: set[str] = set()
        for resource in self.app.router.resources():
            if resource is not self._fallback.resource:
                _, methods = await resource.resolve(request)
                allowed |= methods
        if not allowed:
            return plain_error(404, code_pb2.NOT_FOUND, f"no route {request.method} {request.path[:200]}",
                               "ROUTE_NOT_FOUND")
        shown = ", ".join(sorted(allowed))
        response = plain_error(405, code_pb2.UNIMPLEMENTED,
                               f"{request.method} is not allowed on {request.path[:200]}; allowed: {shown}",
                               "METHOD_NOT_ALLOWED")
        response.headers["Allow"] = shown
        return response

    def _tenant(self, request: web.Request) -> str:
        if self._auth.open:
            return self._auth.tenant_for(())
        credentials: list[tuple[str, str | bytes]] = []
        if (key := request.headers.get("x-goog-api-key")) is not None:
            credentials.append(("x-goog-api-key", key))
        elif (key := request.query.get("key")) is not None:
            credentials.append(("x-goog-api-key", key))
        if (bearer := request.headers.get("authorization")) is not None:
            credentials.append(("authorization", bearer))
        peer = None
        if self._auth.uses_certificates:
            def peer() -> Mapping[str, Iterable[bytes]]:
                return _certificate_names(request)
        return self._auth.tenant_for(credentials, peer)

    # -- public routes ----------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        if not self._serving:
            return web.Response(status=503, text="shutting down\n")
        return web.Response(text="ok\n")

    async def _metrics_page(self, request: web.Request) -> web.Response:
        if self._metrics is None:
            raise HttpError(404, code_pb2.NOT_FOUND, "metrics are off", reason="METRICS_OFF")
        body, content_type = self._metrics()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response


def _http_exception(e: web.HTTPException, request: web.Request) -> web.StreamResponse:
    """An aiohttp refusal raised inside a handler (a body too large, say) as a Google error."""
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return plain_error(413, code_pb2.RESOURCE_EXHAUSTED, "request body too large", "REQUEST_TOO_LARGE")
    if e.status < 400:
        return e  # a redirect: pass it on
    code = code_pb2.INTERNAL if e.status >= 500 else code_pb2.INVALID_ARGUMENT
    return plain_error(e.status, code, e.reason, "HTTP_ERROR")


def _certificate_names(request: web.Request) -> dict[str, list[bytes]]:
    """The verified client certificate's names, shaped as gRPC's auth context."""
    names: dict[str, list[bytes]] = {"x509_common_name": [], "peer_uri": [], "peer_dns": []}
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return names
    for rdn in cert.get("subject", ()):
        for attribute, value in rdn:
            if attribute == "commonName":
                names["x509_common_name"].append(value.encode())
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI":
            names["peer_uri"].append(value.encode())
        elif kind == "DNS":
            names["peer_dns"].append(value.encode())
    return names
