from __future__ import annotations

import longbatch.client

EXPECTED = [
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


def test_all_is_pinned() -> None:
    assert longbatch.client.__all__ == EXPECTED


def test_every_exported_name_exists() -> None:
    for name in longbatch.client.__all__:
        assert getattr(longbatch.client, name) is not None, name
