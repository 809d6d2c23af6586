"""The longbatch client library and CLI.

``Client`` talks to a server; ``BatchOperation`` is a handle on one batch;
every failed call raises a ``LongbatchError`` subclass.
"""

from __future__ import annotations

from longbatch.client.client import Client, TlsOptions
from longbatch.client.errors import (
    AlreadyExists,
    BatchFailed,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LongbatchError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from longbatch.client.operation import Batch, BatchOperation, BatchOutput, BatchStats

__all__ = [
    "AlreadyExists",
    "Batch",
    "BatchFailed",
    "BatchOperation",
    "BatchOutput",
    "BatchStats",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LongbatchError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "TlsOptions",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
]
