"""Errors raised by the longbatch client.

Every failed call raises one exception, chosen by its gRPC status code::

    LongbatchError              any failure; .code .message .reason .field_violations .details
    ├── InvalidArgument         INVALID_ARGUMENT
    ├── NotFound                NOT_FOUND
    ├── AlreadyExists           ALREADY_EXISTS
    ├── FailedPrecondition      FAILED_PRECONDITION
    ├── PermissionDenied        PERMISSION_DENIED
    ├── Unauthenticated         UNAUTHENTICATED
    ├── ResourceExhausted       RESOURCE_EXHAUSTED
    ├── Unavailable             UNAVAILABLE
    ├── DeadlineExceeded        DEADLINE_EXCEEDED
    ├── Cancelled               CANCELLED
    ├── Unimplemented           UNIMPLEMENTED
    ├── Internal                INTERNAL
    └── BatchFailed             a batch ended FAILED, CANCELLED or EXPIRED (from result())

Other codes (UNKNOWN, ABORTED, OUT_OF_RANGE, DATA_LOSS) raise a plain
``LongbatchError`` with ``code`` set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from longbatch.v1 import batch_pb2

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


class LongbatchError(Exception):
    """A call failed; the base class of every client error.

    Attributes:
        code: The gRPC status code.
        message: The server's message.
        reason: The ``google.rpc.ErrorInfo`` reason (UPPER_SNAKE_CASE), or "".
        field_violations: ``(field, description)`` pairs from ``google.rpc.BadRequest``.
        details: The raw ``google.protobuf.Any`` details of the status.
    """

    grpc_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        field_violations: Iterable[tuple[str, str]] = (),
        details: Sequence[any_pb2.Any] = (),
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.grpc_code
        self.message = message
        self.reason = reason
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.details: list[any_pb2.Any] = list(details)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(LongbatchError):
    """The request is malformed; see ``field_violations``."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LongbatchError):
    """The resource does not exist (or belongs to another tenant)."""

    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LongbatchError):
    """The resource already exists."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LongbatchError):
    """The resource is in the wrong state, e.g. deleting a running batch."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(LongbatchError):
    """The caller may not do this."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(LongbatchError):
    """The API key is missing or unknown."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(LongbatchError):
    """A limit or quota was hit."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LongbatchError):
    """The server cannot be reached or is shutting down; retrying may help."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LongbatchError):
    """The call's deadline passed before the server answered."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LongbatchError):
    """The call was cancelled."""

    grpc_code = grpc.StatusCode.CANCELLED


class Unimplemented(LongbatchError):
    """The server does not offer this method or option."""

    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(LongbatchError):
    """The server hit an unexpected fault."""

    grpc_code = grpc.StatusCode.INTERNAL


class BatchFailed(LongbatchError):
    """A batch ended FAILED, CANCELLED or EXPIRED.

    Raised by ``BatchOperation.result()``. ``code`` and ``message`` come from
    the operation's ``error`` status; finished results of a cancelled or
    expired batch remain readable through ``Client.stream_results``.

    Attributes:
        status: The operation's ``google.rpc.Status``.
        batch: The batch as last seen (``GenerateContentBatch`` or
            ``EmbedContentBatch``), or None when the operation carried none.
    """

    def __init__(
        self,
        status: status_pb2.Status,
        batch: batch_pb2.GenerateContentBatch | batch_pb2.EmbedContentBatch | None = None,
    ) -> None:
        reason, violations = _decode_details(status.details)
        super().__init__(
            str(status.message),
            code=_CODE_BY_NUMBER.get(int(status.code), grpc.StatusCode.UNKNOWN),
            reason=reason,
            field_violations=violations,
            details=list(status.details),
        )
        self.status = status
        self.batch = batch

    @property
    def state(self) -> batch_pb2.BatchState.ValueType:
        """The batch's terminal state, or BATCH_STATE_UNSPECIFIED if unknown."""
        return self.batch.state if self.batch is not None else batch_pb2.BATCH_STATE_UNSPECIFIED


ERRORS_BY_CODE: dict[grpc.StatusCode, type[LongbatchError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        Internal,
    )
}


def from_rpc_error(err: grpc.RpcError) -> LongbatchError:
    """Converts a gRPC error into the matching ``LongbatchError``.

    The ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer, when
    present, supplies ``reason``, ``field_violations`` and ``details``.

    Args:
        err: The error raised by a ``grpc.aio`` call.

    Returns:
        An instance of the class that ``ERRORS_BY_CODE`` maps the code to, or
        a plain ``LongbatchError``.
    """
    code = err.code()
    message = err.details() or ""
    details: list[Any] = []
    # grpc.aio yields (key, value) pairs; the stubs describe the sync API's type.
    trailers = cast(Iterable[tuple[str, str | bytes]], err.trailing_metadata() or ())
    for key, value in trailers:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            details = list(status.details)
            message = message or str(status.message)
            break
    reason, violations = _decode_details(details)
    cls = ERRORS_BY_CODE.get(code, LongbatchError)
    return cls(message, code=code, reason=reason, field_violations=violations, details=details)


def from_status(status: status_pb2.Status) -> LongbatchError:
    """Converts a ``google.rpc.Status`` (e.g. a per-request error) into an exception."""
    code = _CODE_BY_NUMBER.get(int(status.code), grpc.StatusCode.UNKNOWN)
    reason, violations = _decode_details(status.details)
    cls = ERRORS_BY_CODE.get(code, LongbatchError)
    return cls(str(status.message), code=code, reason=reason, field_violations=violations, details=status.details)


def _decode_details(details: Iterable[Any]) -> tuple[str, list[tuple[str, str]]]:
    reason = ""
    violations: list[tuple[str, str]] = []
    for detail in details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = reason or str(info.reason)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((str(v.field), str(v.description)) for v in bad.field_violations)
    return reason, violations
