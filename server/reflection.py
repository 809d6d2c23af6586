"""gRPC server reflection for grpcurl and other descriptor-driven clients.

Wraps grpcio-reflection's asyncio servicer to work around grpc/grpc#34743: with
protobuf's upb backend, ``DescriptorPool.FindFileContainingSymbol`` does not
resolve method names (``pkg.Service.Method``), so ``grpcurl describe`` on a
method answered NOT_FOUND even though the service itself resolved.

grpcio-reflection (through 1.85) implements only ``grpc.reflection.v1alpha``;
``grpc.reflection.v1`` is grpc/grpc#38576. grpcurl falls back to v1alpha, so
that is what gets registered. tests/server/test_reflection.py fails once a v1
module appears, so it gets wired up here rather than silently missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Imported for its side effect: it loads google/longrunning/operations.proto
# into the default pool, which reflection serves from. Nothing else in a
# server process is guaranteed to import it before grpcurl asks.
import google.longrunning.operations_pb2  # noqa: F401
import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection as _reflection
from grpc_reflection.v1alpha import reflection_pb2_grpc

__all__ = ["ReflectionServicer", "enable_reflection"]

# grpc-stubs 1.53 leaves out reflection.py's public ``aio`` export, and nothing
# types the servicer base classes, so the base is Any either way.
_AioReflectionServicer: Any = _reflection.aio.ReflectionServicer  # type: ignore[attr-defined]


class ReflectionServicer(_AioReflectionServicer):  # type: ignore[misc]
    """Asyncio v1alpha reflection servicer that also resolves method symbols.

    Only the file-containing-symbol lookup changes; listing, file-by-name and
    extension requests are the upstream implementation unchanged.
    """

    _pool: descriptor_pool.DescriptorPool

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        # A method lives in the same file as its service, and the upb pool can
        # find methods by name even though FindFileContainingSymbol cannot.
        # Anything that is not a method (including unknown symbols) keeps its
        # name, so the upstream lookup still answers NOT_FOUND for it.
        try:
            method = self._pool.FindMethodByName(fully_qualified_name)
        except KeyError:
            pass
        else:
            fully_qualified_name = method.containing_service.full_name
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Register gRPC server reflection (v1alpha) on an asyncio server.

    grpcio-reflection 1.85 offers no ``grpc.reflection.v1`` service, so only
    v1alpha is registered; grpcurl and most clients fall back to it. Call this
    before ``server.start()``, like any other servicer registration.

    Args:
        server: The server to add the reflection service to.
        service_names: Fully qualified names of the services the server
            exposes, e.g. ``longbatch.v1.BatchService``,
            ``google.longrunning.Operations``, ``grpc.health.v1.Health``. The
            reflection service's own name is added automatically.

    Raises:
        ValueError: A name is not a service in the default descriptor pool
            (typo, or its ``_pb2`` module was never imported), which would
            otherwise surface only as NOT_FOUND when a client describes it.
    """
    pool = descriptor_pool.Default()
    for name in service_names:
        try:
            pool.FindServiceByName(name)
        except KeyError:
            raise ValueError(f"{name!r} is not a service in the default descriptor pool") from None
    # Upstream lists names as given, so a repeated name would be listed twice.
    names = sorted({*service_names, _reflection.SERVICE_NAME})
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(names), server)
