"""Domain errors and their google.rpc.Status form.

    ServiceError                 any error a client should see, with a code
    ├── InvalidArgument          bad input; may carry BadRequest violations
    ├── NotFound                 unknown, deleted, or another tenant's resource
    ├── FailedPrecondition       valid request, wrong state ("cancel it first")
    ├── AlreadyExists
    ├── ResourceExhausted        over a size or count limit
    │   └── QuotaExceeded        over a tenant's quota; adds a QuotaFailure
    ├── Unauthenticated          missing or unknown API key
    ├── Unimplemented
    └── Internal                 a fault of ours; the message stays generic

Business code raises these; the gRPC edge (server/edge.py) turns each into one
``google.rpc.Status`` sent both as the call's status and, identical, in
``grpc-status-details-bin`` with an ``ErrorInfo`` (domain ``longbatch.dev``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "longbatch.dev"


class ServiceError(Exception):
    """An error with a gRPC code, an UPPER_SNAKE_CASE reason and details."""

    code: int = code_pb2.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: Iterable[tuple[str, str]] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.violations = list(violations)
        self.metadata = dict(metadata or {})

    def to_status(self) -> status_pb2.Status:
        """The google.rpc.Status for this error, details included."""
        return make_status(self.code, self.message, self.reason, self.violations, self.metadata)


class InvalidArgument(ServiceError):
    """The request is malformed or breaks a documented rule."""

    code = code_pb2.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    """The resource does not exist for this caller."""

    code = code_pb2.NOT_FOUND
    default_reason = "NOT_FOUND"


class FailedPrecondition(ServiceError):
    """The resource is in a state that forbids the request."""

    code = code_pb2.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class AlreadyExists(ServiceError):
    """The resource exists already."""

    code = code_pb2.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class ResourceExhausted(ServiceError):
    """The request is over a size or count limit."""

    code = code_pb2.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class QuotaExceeded(ResourceExhausted):
    """Over one of the tenant's quotas (server/quotas.py).

    Its status carries, besides the ErrorInfo, a ``google.rpc.QuotaFailure``
    with one violation (``subject`` names the tenant's limit, ``description``
    the limit, the use and what was asked), and, for a rate limit, a
    ``google.rpc.RetryInfo`` saying when a slot frees.
    """

    default_reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, *, subject: str, description: str, metadata: Mapping[str, str],
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, metadata=metadata)
        self.subject = subject
        self.description = description
        self.retry_after_s = retry_after_s

    def to_status(self) -> status_pb2.Status:
        """The status with ErrorInfo, QuotaFailure and, if any, RetryInfo."""
        status = super().to_status()
        failure = any_pb2.Any()
        failure.Pack(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=self.subject, description=self.description)
        ]))
        status.details.append(failure)
        if self.retry_after_s is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(max(0, int(self.retry_after_s * 1e9)))
            packed = any_pb2.Any()
            packed.Pack(retry)
            status.details.append(packed)
        return status


class Unauthenticated(ServiceError):
    """No valid API key was sent."""

    code = code_pb2.UNAUTHENTICATED
    default_reason = "API_KEY_INVALID"


class Unimplemented(ServiceError):
    """The server does not implement this."""

    code = code_pb2.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Internal(ServiceError):
    """A fault of the server; details stay in the server log."""

    code = code_pb2.INTERNAL
    default_reason = "INTERNAL"


def make_status(
    code: int,
    message: str,
    reason: str,
    violations: Iterable[tuple[str, str]] = (),
    metadata: Mapping[str, str] | None = None,
) -> status_pb2.Status:
    """Build a google.rpc.Status with ErrorInfo and, if any, BadRequest."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {})))
    details = [info]
    violations = list(violations)
    if violations:
        bad = any_pb2.Any()
        bad.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations
        ]))
        details.append(bad)
    return status_pb2.Status(code=code, message=message, details=details)
