"""Errors over HTTP: the one table from gRPC code to HTTP status, and the
Google error body.

Every failure of the REST surface, whether a ``ServiceError`` raised by the
use cases shared with gRPC or one of the HTTP layer's own (bad JSON, an
unknown route, an oversize body), is answered as Google APIs answer::

    HTTP <status of the code>
    {"error": {"code": <HTTP status>, "message": "...", "status": "INVALID_ARGUMENT",
               "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", ...}, ...]}}

``details`` is the same ``google.rpc.Status`` details the gRPC surface sends
(ErrorInfo, BadRequest, QuotaFailure, RetryInfo) in proto JSON.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from google.protobuf import json_format
from google.rpc import code_pb2, status_pb2

from ..errors import ServiceError, make_status

HTTP_STATUS: dict[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}
"""HTTP status by gRPC code, as google.rpc.Code documents the mapping."""

_CODE_NAMES = {number: name for name, number in code_pb2.Code.items()}


class HttpError(ServiceError):
    """A ServiceError whose HTTP status is not the code's usual one (413 for
    an oversize body, 405 for a wrong method), the code staying right for
    ``status``."""

    def __init__(self, http_status: int, code: int, message: str, *, reason: str,
                 violations: list[tuple[str, str]] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, violations=violations or ())
        self.code = code
        self.http_status = http_status
        self.headers = headers or {}


def status_body(status: status_pb2.Status, http_status: int) -> bytes:
    """The Google error body for ``status``, answered with ``http_status``."""
    error: dict[str, Any] = {
        "code": http_status,
        "message": status.message,
        "status": _CODE_NAMES.get(status.code, "UNKNOWN"),
    }
    if status.details:
        error["details"] = [json_format.MessageToDict(d) for d in status.details]
    return orjson.dumps({"error": error})


def error_response(exc: ServiceError, headers: dict[str, str] | None = None) -> web.Response:
    """The HTTP answer for a ServiceError."""
    http_status = exc.http_status if isinstance(exc, HttpError) else HTTP_STATUS.get(exc.code, 500)
    merged = {**(exc.headers if isinstance(exc, HttpError) else {}), **(headers or {})}
    return web.Response(status=http_status, body=status_body(exc.to_status(), http_status),
                        content_type="application/json", headers=merged)


def plain_error(http_status: int, code: int, message: str, reason: str) -> web.Response:
    """An error answer made here, not by a use case (an unknown route, say)."""
    return web.Response(status=http_status, body=status_body(make_status(code, message, reason), http_status),
                        content_type="application/json")
