"""The backend seam: how the executor asks a model for one response."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from google.rpc import code_pb2

from longbatch.v1 import content_pb2

# Codes worth another attempt: the backend may well answer next time.
RETRYABLE_CODES = frozenset({code_pb2.UNAVAILABLE, code_pb2.RESOURCE_EXHAUSTED, code_pb2.DEADLINE_EXCEEDED})


class BackendError(Exception):
    """A request the backend could not answer.

    Attributes:
        code: google.rpc.Code for the item's error.
        message: what went wrong, safe to show the batch's owner (no keys).
        retryable: whether another attempt may succeed (429, 5xx, timeouts);
            by default from ``code``, but a backend may say otherwise (a 429
            that means "quota used up" will not succeed next time).
        retry_after_s: the backend's Retry-After hint, seconds, if any.
        outage: the backend could not be reached or did not answer at all
            (connection refused, reset, timed out): a fact about the server,
            not the request, so the executor pauses the model's dispatch and
            probes instead of spending every item's attempts.
        overload: the backend said it is too busy (429, 503): the executor
            lowers the model's in-flight limit.
    """

    def __init__(self, code: int, message: str, *, retry_after_s: float | None = None,
                 retryable: bool | None = None, outage: bool = False, overload: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.retryable = code in RETRYABLE_CODES if retryable is None else retryable
        self.outage = outage
        self.overload = code == code_pb2.RESOURCE_EXHAUSTED if overload is None else overload


@runtime_checkable
class RawGenerate(Protocol):
    """Optional fast path: generation on serialized messages."""

    async def generate_raw(self, payload: bytes) -> bytes:
        """A serialized GenerateContentResponse for a serialized request."""


@runtime_checkable
class BulkGenerate(Protocol):
    """Optional: answer many serialized requests in one call.

    A backend offers it only when answering in bulk is cheaper than one call
    per request (a local model that batches); any exception makes the
    executor fall back to per-request calls with their retries.
    """

    @property
    def bulk(self) -> bool:
        """Whether generate_raw_many should be used at all."""

    async def generate_raw_many(self, payloads: list[bytes]) -> list[bytes]:
        """Serialized responses, one per payload, in order."""


@runtime_checkable
class PortableGenerate(Protocol):
    """Optional: bulk generation that can run in another process.

    For a CPU-bound local model (echo) the executor hands whole ranges of a
    batch to the server's worker processes, which read the requests, answer
    them with this function and record the results themselves: the server
    process, which answers RPCs, only schedules. A remote model gains
    nothing from this (its time is spent waiting) and does not offer it.
    """

    def portable_generate(self) -> Callable[[list[bytes]], list[bytes]] | None:
        """A picklable function from serialized requests to serialized
        responses, one per request in order (raising on any it cannot
        answer), or None when this instance cannot offer one."""


class Backend(Protocol):
    """A model server that answers one request at a time (concurrently)."""

    async def generate(self, request: content_pb2.GenerateContentRequest) -> content_pb2.GenerateContentResponse:
        """Answer one generation request or raise BackendError."""

    async def embed(self, request: content_pb2.EmbedContentRequest) -> content_pb2.EmbedContentResponse:
        """Answer one embedding request or raise BackendError."""

    async def aclose(self) -> None:
        """Release connections."""
