"""The gRPC edge: auth (API keys, client certificates), tenant scoping,
error mapping and call metrics.

Every method handler is wrapped once, when its servicer is registered
(``EdgeRegistrar``), so that servicers never deal with either concern: a
handler sees the caller's tenant through ``current_tenant()`` and raises
``ServiceError``s; anything else it raises is logged and answered INTERNAL
with a generic message, so no client ever sees UNKNOWN or a traceback.
Each call's time and status code go to ``longbatch_grpc_server_handling_seconds``
(two clock reads and one histogram add per call, ~0.3 µs in all).

The caller is authenticated before its request is parsed: the wrapped
handlers are registered without a deserializer, so gRPC hands over the raw
bytes and the wrapper parses them only once the credentials passed. (gRPC
still receives the message, up to the receive limit, before any handler
runs: Python's gRPC has no hook between a call's headers and its message.)

Credentials: an API key (``x-goog-api-key`` or ``authorization: Bearer``),
or, with mTLS, a client certificate listed in ``[[tls_clients]]``. Either
alone is enough. A key that is sent must be valid even when the certificate
would do; sent together, both must act for the same tenant, else the call is
refused: the caller's intent is unclear and guessing would act for the wrong
tenant.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import grpc
from google.rpc import error_details_pb2, status_pb2

from .config import ApiKey, TlsClient
from .errors import Internal, InvalidArgument, ServiceError, Unauthenticated
from .metrics import Metrics, code_name

log = logging.getLogger("longbatch.edge")

OPEN_TENANT = "default"
"""The tenant of every caller when no API keys are configured."""

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("longbatch_tenant")


_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def current_tenant() -> str:
    """The tenant of the RPC being handled."""
    return _tenant.get()


# gRPC C-core clients (Python, C++, Ruby, PHP, C#) refuse response metadata
# over 8 KiB with a probability that grows to 1 at 16 KiB (the soft and hard
# `grpc.max_metadata_size`), and the refused call reads RESOURCE_EXHAUSTED
# "Stream removed". The details and the percent-encoded message get these
# budgets, leaving room for :status, content-type and grpc-status.
MAX_DETAILS_BYTES = 6 * 1024
MAX_MESSAGE_BYTES = 1024


def fit_trailers(status: status_pb2.Status) -> status_pb2.Status:
    """``status`` cut to fit the trailer budgets: the message shortened, and
    trailing BadRequest violations dropped, with the ErrorInfo's metadata
    saying how many are left (``violations_shown``). A status within budget
    comes back unchanged."""
    message = _fit_message(status.message)
    if message == status.message and status.ByteSize() <= MAX_DETAILS_BYTES:
        return status
    fitted = status_pb2.Status(code=status.code, message=message)
    fitted.details.extend(status.details)
    info_at = next((i for i, d in enumerate(fitted.details) if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)), None)
    bad_at = next((i for i, d in enumerate(fitted.details) if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)), None)
    if fitted.ByteSize() <= MAX_DETAILS_BYTES or bad_at is None:
        return fitted
    bad = error_details_pb2.BadRequest()
    fitted.details[bad_at].Unpack(bad)
    info = error_details_pb2.ErrorInfo()
    if info_at is not None:
        fitted.details[info_at].Unpack(info)
    keep = len(bad.field_violations)
    while True:
        del bad.field_violations[keep:]
        info.metadata["violations_shown"] = str(keep)
        if info_at is not None:
            fitted.details[info_at].Pack(info)
        if keep:
            fitted.details[bad_at].Pack(bad)
        else:
            del fitted.details[bad_at]
        size = fitted.ByteSize()
        if size <= MAX_DETAILS_BYTES or not keep:
            break
        # Drop by the share of bytes over budget: a few passes at most.
        keep = min(keep - 1, keep * MAX_DETAILS_BYTES // size)
    return fitted


def _fit_message(message: str) -> str:
    """``message`` cut so its percent-encoded form (bytes outside printable
    ASCII, and '%', take three) is at most MAX_MESSAGE_BYTES."""
    size = 0
    for i, ch in enumerate(message):
        size += 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode())
        if size > MAX_MESSAGE_BYTES - 3:
            return message[:i] + "..."
    return message


async def abort_with_status(context: grpc.aio.ServicerContext[Any, Any], status: status_pb2.Status) -> None:
    """End the call with ``status``, identical in the status and its details,
    cut to fit the trailer budgets (``fit_trailers``).

    api-core raises a bare ValueError when the two disagree, so both come from
    one message.
    """
    status = fit_trailers(status)
    await context.abort(
        grpc.StatusCode(_code_tuple(status.code)),
        status.message,
        trailing_metadata=((_STATUS_DETAILS_KEY, status.SerializeToString()),),
    )


def _code_tuple(code: int) -> tuple[int, str]:
    for sc in grpc.StatusCode:
        if sc.value[0] == code:
            return sc.value  # type: ignore[no-any-return]
    return grpc.StatusCode.UNKNOWN.value  # type: ignore[no-any-return]


AuthContext: TypeAlias = Mapping[str, Iterable[bytes]]


class Authenticator:
    """Maps an API key from request metadata (in constant time), or a client
    certificate's identity, to a tenant."""

    def __init__(self, keys: Sequence[ApiKey], tls_clients: Sequence[TlsClient] = ()) -> None:
        self._keys = [(k.key.encode(), k.tenant) for k in keys]
        self._clients = tuple(tls_clients)

    @property
    def open(self) -> bool:
        """True when no keys and no client certificates are configured: every
        caller is one tenant."""
        return not self._keys and not self._clients

    @property
    def uses_certificates(self) -> bool:
        """True when client certificates map to tenants (the auth context is needed)."""
        return bool(self._clients)

    def tenant_for(
        self,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        auth_context: Callable[[], AuthContext] | None = None,
    ) -> str:
        """Return the caller's tenant or raise Unauthenticated.

        ``auth_context`` (the call's, read only when certificates map to
        tenants) gives the verified client certificate's names.
        """
        if self.open:
            return OPEN_TENANT
        key_tenant = self._key_tenant(metadata)
        cert_tenant = self._certificate_tenant(auth_context()) if auth_context is not None and self._clients else None
        if key_tenant is not None and cert_tenant is not None and key_tenant != cert_tenant:
            raise Unauthenticated(
                "the API key and the client certificate act for different tenants; send one of them",
                reason="CREDENTIALS_CONFLICT",
            )
        tenant = key_tenant or cert_tenant
        if tenant is None:
            if self._clients:
                raise Unauthenticated(
                    "missing credentials: send an API key as 'x-goog-api-key: KEY' or 'authorization: Bearer KEY', "
                    "or connect with a client certificate listed in the server's [[tls_clients]]",
                    reason="CREDENTIALS_MISSING",
                )
            raise Unauthenticated(
                "missing API key: send it as 'x-goog-api-key: KEY' or 'authorization: Bearer KEY'",
                reason="API_KEY_MISSING",
            )
        return tenant

    def _certificate_tenant(self, context: AuthContext) -> str | None:
        """The tenant the verified client certificate maps to, or None."""
        names = {prop: {v.decode(errors="replace") for v in context.get(prop, ())}
                 for prop in ("x509_common_name", "peer_uri", "peer_dns")}
        tenants = {c.tenant for c in self._clients
                   if (c.subject_cn and c.subject_cn in names["x509_common_name"])
                   or (c.san_uri and c.san_uri in names["peer_uri"])
                   or (c.san_dns and c.san_dns in names["peer_dns"])}
        if len(tenants) > 1:
            raise Unauthenticated(
                "the client certificate matches [[tls_clients]] entries of several tenants; the server's "
                "operator must make them unambiguous",
                reason="CLIENT_CERT_AMBIGUOUS",
            )
        return next(iter(tenants), None)

    def _key_tenant(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The tenant of the API key sent, None if none was, or Unauthenticated."""
        presented: str | None = None
        for key, value in metadata or ():
            if isinstance(value, bytes):
                continue
            if key == "x-goog-api-key":
                presented = value.strip()
            elif key == "authorization" and value[:7].lower() == "bearer ":
                presented = value[7:].strip()
        if not presented:
            return None
        candidate = presented.encode()
        tenant = None
        # Compare against every key so the time taken says nothing about which
        # keys exist or how much of one matched.
        for key_bytes, key_tenant in self._keys:
            if hmac.compare_digest(candidate, key_bytes):
                tenant = key_tenant
        if tenant is None:
            raise Unauthenticated("API key not valid", reason="API_KEY_INVALID")
        return tenant


Behavior = Callable[..., Any]


def _malformed(e: Exception) -> InvalidArgument:
    return InvalidArgument(f"malformed request message: {str(e)[:200]}", reason="MALFORMED_REQUEST")


def _parser(deserializer: Callable[[bytes], Any] | None) -> Callable[[Any], Any]:
    """Parses a request's raw bytes in the wrapper, after auth. A message
    that does not parse (corrupt bytes, nesting past protobuf's depth limit)
    is INVALID_ARGUMENT: had gRPC's deserializer raised, it would answer
    UNKNOWN with the exception text."""
    if deserializer is None:
        return lambda data: data

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:
            raise _malformed(e) from None

    return parse


async def _parsed(messages: AsyncIterator[bytes], parse: Callable[[Any], Any]) -> AsyncIterator[Any]:
    async for message in messages:
        yield parse(message)


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
GenericHandler: TypeAlias = "grpc.GenericRpcHandler[Any, Any]"


class EdgeRegistrar:
    """Adds servicers to a server with every method handler wrapped, once,
    by the edge: auth, tenant, error mapping and call metrics.

    Pass it where generated ``add_*Servicer_to_server`` functions expect the
    server (they only call the two methods below). Wrapping at registration
    costs nothing per call, where a server interceptor runs a coroutine on
    every RPC and bypasses gRPC's registered-method fast path. Health and
    reflection are added to the server directly: they need no key.
    """

    def __init__(self, server: grpc.aio.Server, auth: Authenticator, metrics: Metrics | None = None) -> None:
        """Register on ``server``; calls are timed into ``metrics`` (a private one when None)."""
        self._server = server
        self._auth = auth
        self._metrics = metrics or Metrics()

    def add_generic_rpc_handlers(self, handlers: Sequence[GenericHandler]) -> None:
        """Register generic handlers whose method handlers come out wrapped."""
        self._server.add_generic_rpc_handlers(
            tuple(_EdgeGenericHandler(h, self._auth, self._metrics) for h in handlers))

    def add_registered_method_handlers(self, service: str, method_handlers: dict[str, Handler]) -> None:
        """Register a service's method handlers, wrapped."""
        # Missing from grpc-stubs; grpc.aio servers have it since 1.63.
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service,
            {name: _wrap(h, f"/{service}/{name}", self._auth, self._metrics) for name, h in method_handlers.items()},
        )


class _EdgeGenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, inner: GenericHandler, auth: Authenticator, metrics: Metrics) -> None:
        self._inner = inner
        self._auth = auth
        self._metrics = metrics
        self._wrapped: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None  # not ours; unknown names are not cached (clients choose them)
            wrapped = self._wrapped[method] = _wrap(handler, method, self._auth, self._metrics)
        return wrapped


def _aborted_code(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The code a call was aborted with, as its metrics label."""
    code: Any = context.code()  # a grpc.StatusCode, or its int on some versions
    if isinstance(code, grpc.StatusCode):
        return code.name
    return code_name(code) if isinstance(code, int) else "UNKNOWN"


def _error_code(exc: Exception) -> str:
    """The code ``fail`` answers ``exc`` with, as its metrics label."""
    return code_name(exc.code) if isinstance(exc, ServiceError) else "INTERNAL"


def _wrap(handler: Handler, method: str, auth: Authenticator, metrics: Metrics) -> Handler:
    def enter(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if auth.open:
            _tenant.set(OPEN_TENANT)
            return
        # The auth context is built per call: read only when certificates map to tenants.
        peer = context.auth_context if auth.uses_certificates else None
        _tenant.set(auth.tenant_for(context.invocation_metadata(), peer))

    async def fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
        if isinstance(exc, ServiceError):
            await abort_with_status(context, exc.to_status())
        log.error("unexpected error in %s", method, exc_info=exc)
        await abort_with_status(context, Internal("internal error; see the server log").to_status())

    h: Any = handler
    streamed_requests = bool(h.stream_unary or h.stream_stream)
    parse = _parser(h.request_deserializer)
    observe_ok, observe = metrics.grpc_observers(method)
    clock = time.perf_counter

    def unary(behavior: Behavior) -> Behavior:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = clock()
            try:
                enter(context)  # before the request is parsed: see the module docstring
                request = _parsed(request, parse) if streamed_requests else parse(request)
                response = await behavior(request, context)
            except grpc.aio.AbortError:
                observe(_aborted_code(context), clock() - started)
                raise
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed
                observe("CANCELLED", clock() - started)
                raise
            except Exception as exc:
                observe(_error_code(exc), clock() - started)
                await fail(context, exc)
            else:
                observe_ok(clock() - started)
                return response

        return call

    def streaming(behavior: Behavior) -> Behavior:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = clock()
            try:
                enter(context)  # before the request is parsed: see the module docstring
                request = _parsed(request, parse) if streamed_requests else parse(request)
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                observe(_aborted_code(context), clock() - started)
                raise
            except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
                observe("CANCELLED", clock() - started)
                raise
            except Exception as exc:
                observe(_error_code(exc), clock() - started)
                await fail(context, exc)
            else:
                observe_ok(clock() - started)

        return call

    # No deserializer: gRPC passes the raw bytes, which `parse` reads after `enter`.
    ser, deser = h.response_serializer, None
    if h.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(h.unary_unary), deser, ser)
    if h.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(h.unary_stream), deser, ser)
    if h.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(h.stream_unary), deser, ser)
    return grpc.stream_stream_rpc_method_handler(streaming(h.stream_stream), deser, ser)
