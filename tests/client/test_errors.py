from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio

from longbatch.client import errors
from longbatch.v1 import batch_pb2


def _any(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _status(code: int, message: str, *details: object) -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message, details=[_any(d) for d in details])


def _rpc_error(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> aio.AioRpcError:
    trailing = aio.Metadata()
    if status is not None:
        trailing.add("grpc-status-details-bin", status.SerializeToString())
    return aio.AioRpcError(code, aio.Metadata(), trailing, details=message)


def test_decodes_error_info_and_bad_request() -> None:
    status = _status(
        code_pb2.INVALID_ARGUMENT,
        "batch is invalid",
        error_details_pb2.ErrorInfo(reason="INVALID_BATCH", domain="longbatch.dev"),
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="batch.input_config.requests.requests[17].request.contents",
                    description="must not be empty",
                ),
                error_details_pb2.BadRequest.FieldViolation(field="batch.model", description="unknown"),
            ]
        ),
    )
    err = errors.from_rpc_error(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "batch is invalid", status))
    assert type(err) is errors.InvalidArgument
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == "batch is invalid"
    assert err.reason == "INVALID_BATCH"
    assert err.field_violations == [
        ("batch.input_config.requests.requests[17].request.contents", "must not be empty"),
        ("batch.model", "unknown"),
    ]
    assert len(err.details) == 2
    assert str(err) == "INVALID_ARGUMENT: batch is invalid"


def test_without_details_keeps_code_and_message() -> None:
    err = errors.from_rpc_error(_rpc_error(grpc.StatusCode.NOT_FOUND, "no such batch", None))
    assert isinstance(err, errors.NotFound)
    assert (err.message, err.reason, err.field_violations, err.details) == ("no such batch", "", [], [])


@pytest.mark.parametrize(("code", "cls"), list(errors.ERRORS_BY_CODE.items()))
def test_each_code_maps_to_its_class(code: grpc.StatusCode, cls: type[errors.LongbatchError]) -> None:
    err = errors.from_rpc_error(_rpc_error(code, "x", None))
    assert type(err) is cls
    assert err.code is code is cls.grpc_code


def test_unmapped_code_is_the_base_class() -> None:
    err = errors.from_rpc_error(_rpc_error(grpc.StatusCode.ABORTED, "conflict", None))
    assert type(err) is errors.LongbatchError
    assert err.code is grpc.StatusCode.ABORTED


def test_message_falls_back_to_the_status() -> None:
    status = _status(code_pb2.INTERNAL, "internal error")
    err = errors.from_rpc_error(_rpc_error(grpc.StatusCode.INTERNAL, "", status))
    assert isinstance(err, errors.Internal)
    assert err.message == "internal error"


def test_batch_failed_carries_status_and_batch() -> None:
    status = _status(code_pb2.CANCELLED, "cancelled by client", error_details_pb2.ErrorInfo(reason="BATCH_CANCELLED"))
    batch = batch_pb2.GenerateContentBatch(name="batches/a", state=batch_pb2.BATCH_STATE_CANCELLED)
    err = errors.BatchFailed(status, batch)
    assert isinstance(err, errors.LongbatchError)
    assert err.code is grpc.StatusCode.CANCELLED
    assert err.reason == "BATCH_CANCELLED"
    assert err.status is status
    assert err.batch is batch
    assert err.state == batch_pb2.BATCH_STATE_CANCELLED
    assert str(err) == "CANCELLED: cancelled by client"


def test_from_status_picks_the_class() -> None:
    err = errors.from_status(_status(code_pb2.DEADLINE_EXCEEDED, "expired"))
    assert isinstance(err, errors.DeadlineExceeded)
    assert err.message == "expired"
