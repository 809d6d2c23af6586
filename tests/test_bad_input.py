"""Bad input, per API.md sections 4, 5, 9 and 11.

Every bad call must end with the documented gRPC code and a
``grpc-status-details-bin`` identical to the status, carrying an ErrorInfo and,
for bad input, BadRequest violations that point at the offending field. None
may get UNKNOWN or INTERNAL, and the server must keep serving afterwards.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2, field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from longbatch.server.config import ApiKey, Limits, ServerConfig
from longbatch.v1 import batch_pb2, model_pb2

from support import Details, Stubs, details, embed_batch, gen_request, generate_batch, metadata_of, wait_done

T = 10.0
"""Deadline of every single RPC in this module, seconds."""

REQS = "batch.input_config.requests.requests"
FORBIDDEN_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
Metadata = tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------- helpers


async def fails(call: Awaitable[Any], code: grpc.StatusCode) -> Details:
    """Await ``call``; it must fail with ``code`` and well-formed status details."""
    try:
        result = await call
    except grpc.aio.AioRpcError as err:
        assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
        return details(err)
    raise AssertionError(f"expected {code.name}, got OK: {str(result)[:300]}")


async def drain(call: AsyncIterable[Any]) -> list[Any]:
    """Read a server stream to its end."""
    return [item async for item in call]


def fields(d: Details) -> list[str]:
    return [f for f, _ in d.violations]


def assert_bad_input(d: Details, *expected: str) -> None:
    """INVALID_ARGUMENT whose violations name exactly ``expected``, each with a description."""
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(d) == list(expected), d.violations
    assert all(desc for _, desc in d.violations), d.violations
    assert d.message


async def batch_names(stubs: Stubs, metadata: Metadata = ()) -> list[str]:
    """Every batch visible to the caller, paging to the end."""
    names: list[str] = []
    token = ""
    for _ in range(100):
        page = await stubs.ops.ListOperations(
            operations_pb2.ListOperationsRequest(name="batches", page_size=1000, page_token=token),
            timeout=T, metadata=metadata)
        names += [op.name for op in page.operations]
        token = page.next_page_token
        if not token:
            return names
    raise AssertionError("ListOperations never ended")


async def create(stubs: Stubs, req: batch_pb2.BatchGenerateContentRequest | batch_pb2.AsyncBatchEmbedContentRequest,
                 metadata: Metadata = ()) -> operations_pb2.Operation:
    if isinstance(req, batch_pb2.BatchGenerateContentRequest):
        return await stubs.batches.BatchGenerateContent(req, timeout=T, metadata=metadata)
    return await stubs.batches.AsyncBatchEmbedContent(req, timeout=T, metadata=metadata)


async def slow_batch(stubs: Stubs, n: int = 400, metadata: Metadata = ()) -> str:
    """A running ``models/echo-slow`` batch: 400 x 50 ms / 16 ≈ 1.25 s of work."""
    op = await create(stubs, generate_batch(n, model="models/echo-slow"), metadata)
    assert not op.done
    return op.name


async def done_batch(stubs: Stubs, n: int = 3) -> str:
    op = await create(stubs, generate_batch(n))
    done = await wait_done(stubs, op.name)
    assert metadata_of(done).state == batch_pb2.BATCH_STATE_SUCCEEDED
    return op.name


async def cancel_and_wait(stubs: Stubs, name: str, metadata: Metadata = ()) -> None:
    await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name), timeout=T, metadata=metadata)
    for _ in range(100):
        op = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=T,
                                          metadata=metadata)
        if op.done:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} not done 5 s after cancel")


def wait_req(name: str, seconds: int | None = None, nanos: int = 0) -> operations_pb2.WaitOperationRequest:
    req = operations_pb2.WaitOperationRequest(name=name)
    if seconds is not None:
        req.timeout.CopyFrom(duration_pb2.Duration(seconds=seconds, nanos=nanos))
    return req


def update_gen(name: str, *paths: str, **fields_: Any) -> batch_pb2.UpdateGenerateContentBatchRequest:
    return batch_pb2.UpdateGenerateContentBatchRequest(
        batch=batch_pb2.GenerateContentBatch(name=name, **fields_), update_mask=field_mask_pb2.FieldMask(paths=paths))


def update_emb(name: str, *paths: str, **fields_: Any) -> batch_pb2.UpdateEmbedContentBatchRequest:
    return batch_pb2.UpdateEmbedContentBatchRequest(
        batch=batch_pb2.EmbedContentBatch(name=name, **fields_), update_mask=field_mask_pb2.FieldMask(paths=paths))


def stream_req(name: str, start_index: int = 0) -> batch_pb2.StreamBatchResultsRequest:
    return batch_pb2.StreamBatchResultsRequest(name=name, start_index=start_index)


def name_call(stubs: Stubs, method: str, name: str, metadata: Metadata = ()) -> Awaitable[Any]:
    """One of the by-name RPCs on ``name``."""
    if method == "get":
        return stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=T, metadata=metadata)
    if method == "cancel":
        return stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name), timeout=T,
                                         metadata=metadata)
    if method == "delete":
        return stubs.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name), timeout=T,
                                         metadata=metadata)
    if method == "wait":
        return stubs.ops.WaitOperation(wait_req(name, 0), timeout=T, metadata=metadata)
    if method == "stream":
        return drain(stubs.batches.StreamBatchResults(stream_req(name), timeout=T, metadata=metadata))
    if method == "update":
        return stubs.batches.UpdateGenerateContentBatch(update_gen(name, "display_name", display_name="x"),
                                                        timeout=T, metadata=metadata)
    raise AssertionError(method)


# --------------------------------------------------------------------------- create (sections 5 and 11)


def _gen(n: int = 1, **kw: Any) -> batch_pb2.BatchGenerateContentRequest:
    return generate_batch(n, **kw)


def _no_batch() -> Any:
    return batch_pb2.BatchGenerateContentRequest(request_id="x")


def _no_batch_embed() -> Any:
    return batch_pb2.AsyncBatchEmbedContentRequest()


def _no_input_config() -> Any:
    r = _gen()
    r.batch.ClearField("input_config")
    return r


def _empty_requests() -> Any:
    r = _gen(0)
    r.batch.input_config.requests.SetInParent()
    assert r.batch.input_config.WhichOneof("source") == "requests"
    return r


def _no_request_at(i: int) -> Callable[[], Any]:
    def build() -> Any:
        r = _gen(i + 3)
        r.batch.input_config.requests.requests[i].ClearField("request")
        return r
    return build


def _empty_contents_at_17() -> Any:
    r = _gen(20)
    r.batch.input_config.requests.requests[17].request.ClearField("contents")
    return r


def _empty_parts() -> Any:
    r = _gen(2)
    r.batch.input_config.requests.requests[1].request.contents[0].ClearField("parts")
    return r


def _empty_part() -> Any:
    r = _gen(2)
    part = r.batch.input_config.requests.requests[1].request.contents[0].parts.add()
    assert part.WhichOneof("data") is None
    return r


def _other_model() -> Any:
    r = _gen(3)
    r.batch.input_config.requests.requests[2].request.model = "models/echo-slow"
    return r


def _request_over_1mib() -> Any:
    r = _gen(3)
    r.batch.input_config.requests.requests[1].request.CopyFrom(gen_request("x" * ((1 << 20) + 10)))
    return r


def _request_over_1mib_with_metadata() -> Any:
    r = _gen(1)
    r.batch.input_config.requests.requests[0].metadata["blob"] = "m" * ((1 << 20) + 10)
    return r


def _embed_empty_content() -> Any:
    r = embed_batch(3)
    r.batch.input_config.requests.requests[1].request.content.ClearField("parts")
    return r


def _embed_bad_dim(dim: int) -> Callable[[], Any]:
    def build() -> Any:
        r = embed_batch(2)
        r.batch.input_config.requests.requests[1].request.output_dimensionality = dim
        return r
    return build


def _embed_other_model() -> Any:
    r = embed_batch(2)
    r.batch.input_config.requests.requests[0].request.model = "models/echo-slow"
    return r


def _embed_empty_requests() -> Any:
    r = embed_batch(0)
    r.batch.input_config.requests.SetInParent()
    return r


def _embed_no_request() -> Any:
    r = embed_batch(2)
    r.batch.input_config.requests.requests[0].ClearField("request")
    return r


def _bad_webhook(uri: str) -> Callable[[], Any]:
    def build() -> Any:
        return _gen(webhook_config=batch_pb2.WebhookConfig(uris=["https://example.com/hook", uri]))
    return build


CREATE_CASES: list[Any] = [
    pytest.param(_no_batch, ["batch"], id="missing-batch"),
    pytest.param(_no_batch_embed, ["batch"], id="embed-missing-batch"),
    pytest.param(lambda: _gen(model=""), ["batch.model"], id="missing-model"),
    pytest.param(lambda: _gen(model="echo"), ["batch.model"], id="model-without-collection"),
    pytest.param(lambda: _gen(model="models/"), ["batch.model"], id="model-empty-id"),
    pytest.param(lambda: _gen(model="models/Bad Name!"), ["batch.model"], id="model-bad-chars"),
    pytest.param(lambda: _gen(model="files/echo"), ["batch.model"], id="model-wrong-collection"),
    pytest.param(_no_input_config, ["batch.input_config"], id="no-input-config"),
    pytest.param(_empty_requests, [REQS], id="empty-requests"),
    pytest.param(_no_request_at(0), [f"{REQS}[0].request"], id="request-unset"),
    pytest.param(_empty_contents_at_17, [f"{REQS}[17].request.contents"], id="empty-contents-17"),
    pytest.param(_empty_parts, [f"{REQS}[1].request.contents[0].parts"], id="empty-parts"),
    pytest.param(_empty_part, [f"{REQS}[1].request.contents[0].parts[1]"], id="part-without-data"),
    pytest.param(_other_model, [f"{REQS}[2].request.model"], id="request-other-model"),
    pytest.param(_request_over_1mib, [f"{REQS}[1].request"], id="request-over-1mib"),
    pytest.param(_request_over_1mib_with_metadata, [f"{REQS}[0].request"], id="request-with-metadata-over-1mib"),
    pytest.param(_embed_empty_requests, [REQS], id="embed-empty-requests"),
    pytest.param(_embed_no_request, [f"{REQS}[0].request"], id="embed-request-unset"),
    pytest.param(_embed_empty_content, [f"{REQS}[1].request.content.parts"], id="embed-empty-content"),
    pytest.param(_embed_bad_dim(0), [f"{REQS}[1].request.output_dimensionality"], id="embed-dim-0"),
    pytest.param(_embed_bad_dim(-3), [f"{REQS}[1].request.output_dimensionality"], id="embed-dim-negative"),
    pytest.param(_embed_bad_dim(1 << 20), [f"{REQS}[1].request.output_dimensionality"], id="embed-dim-huge"),
    pytest.param(_embed_other_model, [f"{REQS}[0].request.model"], id="embed-request-other-model"),
    pytest.param(lambda: _gen(display_name="d" * 10_000), ["batch.display_name"], id="display-name-too-long"),
    pytest.param(_bad_webhook("not a url"), ["batch.webhook_config.uris[1]"], id="webhook-not-url"),
    pytest.param(_bad_webhook("ftp://example.com/x"), ["batch.webhook_config.uris[1]"], id="webhook-ftp"),
    pytest.param(_bad_webhook(""), ["batch.webhook_config.uris[1]"], id="webhook-empty"),
    pytest.param(_bad_webhook("https://"), ["batch.webhook_config.uris[1]"], id="webhook-no-host"),
    pytest.param(lambda: _gen(request_id="r" * 129), ["request_id"], id="request-id-129"),
    pytest.param(lambda: _gen(request_id="r" * 10_000), ["request_id"], id="request-id-10k"),
]


@pytest.mark.parametrize(("build", "expected"), CREATE_CASES)
async def test_create_bad_input(stubs: Stubs, build: Callable[[], Any], expected: list[str]) -> None:
    d = await fails(create(stubs, build()), grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, *expected)
    assert await batch_names(stubs) == [], "a rejected create left a batch behind"


@pytest.mark.parametrize("model", ["models/nope", "models/echo-slower"])
async def test_create_unknown_model_is_not_found(stubs: Stubs, model: str) -> None:
    d = await fails(create(stubs, _gen(model=model)), grpc.StatusCode.NOT_FOUND)
    assert d.reason
    assert model in d.message
    d = await fails(create(stubs, embed_batch(1, model=model)), grpc.StatusCode.NOT_FOUND)
    assert await batch_names(stubs) == []


async def test_create_unknown_model_with_bad_requests_reports_the_bad_input(stubs: Stubs) -> None:
    # Synchronous validation names every problem; the model lookup comes after.
    r = _gen(2, model="models/nope")
    r.batch.input_config.requests.requests[1].request.ClearField("contents")
    d = await fails(create(stubs, r), grpc.StatusCode.INVALID_ARGUMENT)
    assert f"{REQS}[1].request.contents" in fields(d)


async def test_several_bad_requests_give_several_violations(stubs: Stubs) -> None:
    r = _gen(12, display_name="d" * 10_000)
    reqs = r.batch.input_config.requests.requests
    reqs[2].request.ClearField("contents")
    reqs[5].ClearField("request")
    reqs[7].request.model = "models/echo-slow"
    reqs[9].request.contents[0].parts.add()
    d = await fails(create(stubs, r), grpc.StatusCode.INVALID_ARGUMENT)
    assert sorted(fields(d)) == sorted([
        "batch.display_name",
        f"{REQS}[2].request.contents",
        f"{REQS}[5].request",
        f"{REQS}[7].request.model",
        f"{REQS}[9].request.contents[0].parts[1]",
    ]), d.violations
    assert all(desc for _, desc in d.violations)
    assert await batch_names(stubs) == []


async def test_many_bad_requests_are_all_reported_up_to_a_cap(stubs: Stubs) -> None:
    r = _gen(500)
    for inlined in r.batch.input_config.requests.requests:
        inlined.request.ClearField("contents")
    d = await fails(create(stubs, r), grpc.StatusCode.INVALID_ARGUMENT)
    # As many as fit in trailers every gRPC client accepts (fails() checks the
    # size), in request order, and the ErrorInfo says how many that is.
    assert 40 <= len(d.violations) <= 100
    assert fields(d) == [f"{REQS}[{i}].request.contents" for i in range(len(d.violations))]
    assert d.info_metadata["violations_shown"] == str(len(d.violations))
    assert "and 499 more" in d.message


async def test_more_than_max_inlined_requests(make_server: Any) -> None:
    srv = await make_server(ServerConfig(limits=Limits(max_inlined_requests=5)))
    stubs = Stubs.connect(srv.target)
    try:
        d = await fails(create(stubs, _gen(6)), grpc.StatusCode.INVALID_ARGUMENT)
        assert_bad_input(d, REQS)
        d = await fails(create(stubs, embed_batch(6)), grpc.StatusCode.INVALID_ARGUMENT)
        assert_bad_input(d, REQS)
        assert await batch_names(stubs) == []
        op = await create(stubs, _gen(5))  # exactly at the limit is fine
        assert metadata_of(await wait_done(stubs, op.name)).batch_stats.successful_request_count == 5
    finally:
        await stubs.channel.close()


async def test_create_call_over_grpc_limit_is_resource_exhausted(stubs: Stubs) -> None:
    # 25 requests of ~1,000,000 bytes: each under 1 MiB, the call far over 20 MiB.
    r = _gen(25)
    for i, inlined in enumerate(r.batch.input_config.requests.requests):
        inlined.request.CopyFrom(gen_request(str(i) * 1_000_000))
    assert r.ByteSize() > 24_000_000
    try:
        await create(stubs, r)
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    else:
        raise AssertionError("a 25 MB create call was accepted")
    assert await batch_names(stubs) == []
    await done_batch(stubs)  # the server still serves


async def test_create_call_just_over_20mib_is_refused(stubs: Stubs) -> None:
    # 21 x 1,000,000 bytes ≈ 20.03 MiB: over the documented 20 MiB per create call,
    # though under the gRPC receive limit, which leaves room for framing.
    r = _gen(21)
    for i, inlined in enumerate(r.batch.input_config.requests.requests):
        inlined.request.CopyFrom(gen_request(chr(ord("a") + i) * 1_000_000))
    assert r.ByteSize() > 20 << 20
    try:
        op = await create(stubs, r)
    except grpc.aio.AioRpcError as err:
        assert err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT), err
    else:
        await cancel_and_wait(stubs, op.name)
        raise AssertionError(f"a {r.ByteSize()}-byte create call (over 20 MiB) was accepted as {op.name}")


async def test_bad_request_id_reuse_across_kinds(stubs: Stubs) -> None:
    op = await create(stubs, _gen(1, request_id="same-id"))
    again = await create(stubs, _gen(1, request_id="same-id"))
    assert again.name == op.name
    emb = embed_batch(1)
    emb.request_id = "same-id"
    d = await fails(create(stubs, emb), grpc.StatusCode.INVALID_ARGUMENT)
    assert "request_id" in fields(d)
    assert await batch_names(stubs) == [op.name]


# --------------------------------------------------------------------------- names (section 4)

BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("batches/", id="no-id"),
    pytest.param("batches/UPPER", id="upper"),
    pytest.param("files/abc", id="files"),
    pytest.param("batches/abc/def", id="nested"),
    pytest.param("batches/abc?x=1", id="query"),
    pytest.param("batches/" + "a" * 10_000, id="10kB"),
    pytest.param("batches/\u00e9t\u00e9", id="non-ascii"),
    pytest.param(" batches/abc123", id="leading-space"),
]
OP_METHODS = ["get", "cancel", "delete", "wait"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("method", [*OP_METHODS, "stream"])
async def test_malformed_name_is_invalid_argument(stubs: Stubs, method: str, name: str) -> None:
    d = await fails(name_call(stubs, method, name), grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "name")


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_update_malformed_name_is_invalid_argument(stubs: Stubs, name: str) -> None:
    d = await fails(name_call(stubs, "update", name), grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "batch.name")
    d = await fails(stubs.batches.UpdateEmbedContentBatch(update_emb(name, "display_name"), timeout=T),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "batch.name")


@pytest.mark.parametrize("method", [*OP_METHODS, "stream", "update"])
async def test_unknown_batch_is_not_found(stubs: Stubs, method: str) -> None:
    await done_batch(stubs)  # a batch exists; a different id is still unknown
    d = await fails(name_call(stubs, method, "batches/abc123"), grpc.StatusCode.NOT_FOUND)
    assert "batches/abc123" in d.message
    assert d.violations == []


# --------------------------------------------------------------------------- ListOperations


def list_req(**kw: Any) -> operations_pb2.ListOperationsRequest:
    return operations_pb2.ListOperationsRequest(**kw)


@pytest.mark.parametrize(("kw", "field"), [
    pytest.param({"page_size": -1}, "page_size", id="negative-page-size"),
    pytest.param({"page_size": -(2**31)}, "page_size", id="min-int32-page-size"),
    pytest.param({"name": "other"}, "name", id="name-other"),
    pytest.param({"name": "batches/abc"}, "name", id="name-a-batch"),
    pytest.param({"name": "files"}, "name", id="name-files"),
    pytest.param({"filter": "state ="}, "filter", id="filter-missing-value"),
    pytest.param({"filter": "(state = RUNNING"}, "filter", id="filter-unbalanced"),
    pytest.param({"filter": "state = RUNNING)"}, "filter", id="filter-extra-paren"),
    pytest.param({"filter": "AND"}, "filter", id="filter-lone-and"),
    pytest.param({"filter": 'display_name = "open'}, "filter", id="filter-unterminated-string"),
    pytest.param({"filter": "color = red"}, "filter", id="filter-unknown-field"),
    pytest.param({"filter": "state = BOGUS"}, "filter", id="filter-unknown-enum"),
    pytest.param({"filter": "done = maybe"}, "filter", id="filter-bad-bool"),
    pytest.param({"filter": "priority > high"}, "filter", id="filter-bad-int"),
    pytest.param({"filter": "priority > 99999999999999999999999"}, "filter", id="filter-int-overflow"),
    pytest.param({"filter": 'create_time > "yesterday"'}, "filter", id="filter-bad-timestamp"),
    pytest.param({"filter": "display_name:foo"}, "filter", id="filter-has-operator"),
    pytest.param({"filter": "(" * 5000 + "done = true" + ")" * 5000}, "filter", id="filter-deep-nesting"),
    pytest.param({"filter": "NOT " * 5000 + "done = true"}, "filter", id="filter-deep-not"),
    pytest.param({"filter": " AND ".join(["done = true"] * 2000)}, "filter", id="filter-huge"),
    pytest.param({"page_token": "garbage"}, "page_token", id="token-garbage"),
    pytest.param({"page_token": "!!!"}, "page_token", id="token-not-base64"),
    pytest.param({"page_token": "A" * 5000}, "page_token", id="token-long"),
])
async def test_list_operations_bad_input(stubs: Stubs, kw: dict[str, Any], field: str) -> None:
    d = await fails(stubs.ops.ListOperations(list_req(**kw), timeout=T), grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, field)


async def _first_token(stubs: Stubs, filter_: str) -> str:
    for _ in range(3):
        await create(stubs, _gen(1))
    page = await stubs.ops.ListOperations(list_req(name="batches", page_size=1, filter=filter_), timeout=T)
    assert len(page.operations) == 1 and page.next_page_token
    return page.next_page_token


def _tamper(token: str, how: str) -> str:
    mid = len(token) // 2
    if how == "flip-middle":
        return token[:mid] + ("B" if token[mid] == "A" else "A") + token[mid + 1:]
    if how == "flip-last":
        return token[:-1] + ("B" if token[-1] == "A" else "A")
    if how == "truncate":
        return token[:mid]
    if how == "append":
        return token + "AAAA"
    if how == "padding":
        return token + "=="
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip-middle", "flip-last", "truncate", "append", "padding"])
async def test_list_tampered_page_token(stubs: Stubs, how: str) -> None:
    token = await _first_token(stubs, "")
    bad = _tamper(token, how)
    assert bad != token
    d = await fails(stubs.ops.ListOperations(list_req(page_size=1, page_token=bad), timeout=T),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "page_token")
    ok = await stubs.ops.ListOperations(list_req(page_size=1, page_token=token), timeout=T)
    assert len(ok.operations) == 1


@pytest.mark.parametrize(("first", "second"), [
    ("done = true", ""),
    ("", "done = true"),
    ('model = "models/echo"', "done = true"),
])
async def test_list_token_reused_with_another_filter(stubs: Stubs, first: str, second: str) -> None:
    for _ in range(3):
        await done_batch(stubs, 1)
    page = await stubs.ops.ListOperations(list_req(page_size=1, filter=first), timeout=T)
    assert page.next_page_token
    d = await fails(stubs.ops.ListOperations(list_req(page_size=1, filter=second, page_token=page.next_page_token),
                                             timeout=T), grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "page_token")


async def test_list_models_token_is_not_an_operations_token(stubs: Stubs) -> None:
    token = await _first_token(stubs, "")
    d = await fails(stubs.models.ListModels(model_pb2.ListModelsRequest(page_token=token), timeout=T),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "page_token")


async def test_list_return_partial_success_is_unimplemented(stubs: Stubs) -> None:
    d = await fails(stubs.ops.ListOperations(list_req(return_partial_success=True), timeout=T),
                    grpc.StatusCode.UNIMPLEMENTED)
    assert d.message


# --------------------------------------------------------------------------- WaitOperation


@pytest.mark.parametrize(("seconds", "nanos"), [(-1, 0), (0, -1), (-600, -5)])
async def test_wait_negative_timeout(stubs: Stubs, seconds: int, nanos: int) -> None:
    name = await done_batch(stubs, 1)
    d = await fails(stubs.ops.WaitOperation(wait_req(name, seconds, nanos), timeout=T),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "timeout")


async def test_wait_invalid_duration(stubs: Stubs) -> None:
    name = await done_batch(stubs, 1)
    d = await fails(stubs.ops.WaitOperation(wait_req(name, 1, 2_000_000_000), timeout=T),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "timeout")


async def test_wait_zero_timeout_returns_at_once(stubs: Stubs) -> None:
    name = await slow_batch(stubs)
    try:
        start = time.monotonic()
        op = await stubs.ops.WaitOperation(wait_req(name, 0), timeout=T)
        assert time.monotonic() - start < 0.5
        assert op.name == name and not op.done
        assert metadata_of(op).state in (batch_pb2.BATCH_STATE_PENDING, batch_pb2.BATCH_STATE_RUNNING)
    finally:
        await cancel_and_wait(stubs, name)


async def test_wait_huge_timeout_is_capped_by_the_client_deadline(stubs: Stubs) -> None:
    name = await slow_batch(stubs)
    try:
        start = time.monotonic()
        op = await stubs.ops.WaitOperation(wait_req(name, 10**9), timeout=0.5)
        assert time.monotonic() - start < 2.0
        assert not op.done
    finally:
        await cancel_and_wait(stubs, name)


# --------------------------------------------------------------------------- Update


async def test_update_without_mask_paths(stubs: Stubs) -> None:
    name = await done_batch(stubs, 1)
    d = await fails(stubs.batches.UpdateGenerateContentBatch(update_gen(name, display_name="x"), timeout=T),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert fields(d) in (["update_mask"], ["update_mask.paths"]), d.violations


@pytest.mark.parametrize("path", ["model", "state", "name", "input_config", "output", "batch_stats", "",
                                  "display_name.x", "DISPLAY_NAME", "*"])
async def test_update_path_not_updatable(stubs: Stubs, path: str) -> None:
    name = await done_batch(stubs, 1)
    d = await fails(stubs.batches.UpdateGenerateContentBatch(update_gen(name, "display_name", path,
                                                                        display_name="x"), timeout=T),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert fields(d) == ["update_mask.paths"], d.violations
    op = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=T)
    assert metadata_of(op).display_name == "", "a rejected update changed the batch"


async def test_update_display_name_too_long(stubs: Stubs) -> None:
    name = await done_batch(stubs, 1)
    d = await fails(stubs.batches.UpdateGenerateContentBatch(update_gen(name, "display_name",
                                                                        display_name="d" * 10_000), timeout=T),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "batch.display_name")


async def test_update_priority_of_done_batch_is_failed_precondition(stubs: Stubs) -> None:
    name = await done_batch(stubs, 1)
    d = await fails(stubs.batches.UpdateGenerateContentBatch(update_gen(name, "priority", priority=5), timeout=T),
                    grpc.StatusCode.FAILED_PRECONDITION)
    assert d.violations == []
    # display_name stays updatable on a done batch
    msg = await stubs.batches.UpdateGenerateContentBatch(update_gen(name, "display_name", display_name="renamed"),
                                                         timeout=T)
    assert msg.display_name == "renamed" and msg.priority == 0


async def test_update_embed_on_generate_batch(stubs: Stubs) -> None:
    name = await done_batch(stubs, 1)
    d = await fails(stubs.batches.UpdateEmbedContentBatch(update_emb(name, "display_name", display_name="x"),
                                                          timeout=T), grpc.StatusCode.INVALID_ARGUMENT)
    assert d.message
    emb = await create(stubs, embed_batch(1))
    await wait_done(stubs, emb.name)
    d = await fails(stubs.batches.UpdateGenerateContentBatch(update_gen(emb.name, "display_name", display_name="x"),
                                                             timeout=T), grpc.StatusCode.INVALID_ARGUMENT)
    assert d.message


# --------------------------------------------------------------------------- Delete


async def test_delete_running_then_twice(stubs: Stubs) -> None:
    name = await slow_batch(stubs)
    d = await fails(name_call(stubs, "delete", name), grpc.StatusCode.FAILED_PRECONDITION)
    assert d.reason == "BATCH_NOT_DONE"
    op = await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=T)
    assert op.name == name
    await cancel_and_wait(stubs, name)
    await stubs.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name), timeout=T)
    for method in ["delete", "get", "wait", "cancel", "stream", "update"]:
        await fails(name_call(stubs, method, name), grpc.StatusCode.NOT_FOUND)
    assert name not in await batch_names(stubs)


# --------------------------------------------------------------------------- StreamBatchResults


@pytest.mark.parametrize("start", [-1, -(2**63)])
async def test_stream_negative_start_index(stubs: Stubs, start: int) -> None:
    name = await done_batch(stubs, 2)
    d = await fails(drain(stubs.batches.StreamBatchResults(stream_req(name, start), timeout=T)),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "start_index")


async def test_stream_start_index_past_the_end_is_empty(stubs: Stubs) -> None:
    name = await done_batch(stubs, 2)
    assert await drain(stubs.batches.StreamBatchResults(stream_req(name, 2**63 - 1), timeout=T)) == []


# --------------------------------------------------------------------------- Models


@pytest.mark.parametrize("name", ["models/unknown", "models/echo-slower"])
async def test_get_model_unknown(stubs: Stubs, name: str) -> None:
    d = await fails(stubs.models.GetModel(model_pb2.GetModelRequest(name=name), timeout=T),
                    grpc.StatusCode.NOT_FOUND)
    assert name in d.message


@pytest.mark.parametrize("name", ["", "echo", "models/", "models/ECHO", "batches/echo", "models/" + "e" * 10_000])
async def test_get_model_malformed(stubs: Stubs, name: str) -> None:
    d = await fails(stubs.models.GetModel(model_pb2.GetModelRequest(name=name), timeout=T),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "name")


@pytest.mark.parametrize(("kw", "field"), [
    pytest.param({"page_size": -1}, "page_size", id="negative-page-size"),
    pytest.param({"page_token": "garbage"}, "page_token", id="garbage-token"),
])
async def test_list_models_bad_input(stubs: Stubs, kw: dict[str, Any], field: str) -> None:
    d = await fails(stubs.models.ListModels(model_pb2.ListModelsRequest(**kw), timeout=T),
                    grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, field)


async def test_list_models_tampered_token(stubs: Stubs) -> None:
    page = await stubs.models.ListModels(model_pb2.ListModelsRequest(page_size=1), timeout=T)
    assert page.next_page_token
    d = await fails(stubs.models.ListModels(model_pb2.ListModelsRequest(
        page_size=1, page_token=_tamper(page.next_page_token, "flip-middle")), timeout=T),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert_bad_input(d, "page_token")


# --------------------------------------------------------------------------- auth (section 9)

ALICE: Metadata = (("x-goog-api-key", "k-alice"),)
BOB: Metadata = (("authorization", "Bearer k-bob"),)
KEYS = ServerConfig(api_keys=(ApiKey("k-alice", "alice"), ApiKey("k-bob", "bob")))


@pytest.fixture
async def keyed(make_server: Any) -> AsyncIterator[Stubs]:
    srv = await make_server(KEYS)
    stubs = Stubs.connect(srv.target)
    yield stubs
    await stubs.channel.close()


@pytest.mark.parametrize("metadata", [
    pytest.param((), id="no-key"),
    pytest.param((("x-goog-api-key", "k-mallory"),), id="wrong-key"),
    pytest.param((("x-goog-api-key", "k-alic"),), id="key-prefix"),
    pytest.param((("x-goog-api-key", "k-alice-x"),), id="key-longer"),
    pytest.param((("x-goog-api-key", ""),), id="empty-key"),
    pytest.param((("authorization", "Bearer "),), id="empty-bearer"),
    pytest.param((("authorization", "Basic k-alice"),), id="basic-auth"),
    pytest.param((("authorization", "k-alice"),), id="no-scheme"),
    pytest.param((("api-key", "k-alice"),), id="wrong-header"),
])
async def test_unauthenticated(keyed: Stubs, metadata: Metadata) -> None:
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: create(keyed, _gen(1), metadata),
        lambda: keyed.ops.ListOperations(list_req(), timeout=T, metadata=metadata),
        lambda: name_call(keyed, "get", "batches/abc123", metadata),
        lambda: name_call(keyed, "stream", "batches/abc123", metadata),
        lambda: keyed.models.ListModels(model_pb2.ListModelsRequest(), timeout=T, metadata=metadata),
        lambda: keyed.models.GetModel(model_pb2.GetModelRequest(name="models/echo"), timeout=T, metadata=metadata),
    ]
    for call in calls:
        d = await fails(call(), grpc.StatusCode.UNAUTHENTICATED)
        assert d.violations == []
        assert "k-alice" not in d.message
    # authentication precedes validation: a malformed request without a key is still UNAUTHENTICATED
    await fails(name_call(keyed, "get", "", metadata), grpc.StatusCode.UNAUTHENTICATED)
    assert await batch_names(keyed, ALICE) == []


@pytest.mark.parametrize("metadata", [
    pytest.param((("x-goog-api-key", "k-alice"),), id="x-goog-api-key"),
    pytest.param((("authorization", "Bearer k-alice"),), id="bearer"),
    pytest.param((("authorization", "bearer k-alice"),), id="bearer-lowercase"),
])
async def test_both_key_headers_work(keyed: Stubs, metadata: Metadata) -> None:
    op = await create(keyed, _gen(2), metadata)
    got = await keyed.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=T,
                                       metadata=metadata)
    assert got.name == op.name
    assert await batch_names(keyed, ALICE) == [op.name]


async def test_other_tenant_sees_not_found(keyed: Stubs) -> None:
    name = await slow_batch(keyed, 60, ALICE)
    for method in ["get", "cancel", "delete", "wait", "stream", "update"]:
        d = await fails(name_call(keyed, method, name, BOB), grpc.StatusCode.NOT_FOUND)
        assert d.violations == []
    d = await fails(keyed.batches.UpdateGenerateContentBatch(update_gen(name, "priority", priority=9), timeout=T,
                                                             metadata=BOB), grpc.StatusCode.NOT_FOUND)
    assert await batch_names(keyed, BOB) == []
    for filter_ in ["", "done = false", 'model = "models/echo-slow"', "priority >= 0"]:
        page = await keyed.ops.ListOperations(list_req(filter=filter_), timeout=T, metadata=BOB)
        assert [op.name for op in page.operations] == []
    # nothing bob did touched alice's batch
    op = await keyed.ops.WaitOperation(wait_req(name, 30), timeout=35, metadata=ALICE)
    assert op.done
    batch = metadata_of(op)
    assert batch.state == batch_pb2.BATCH_STATE_SUCCEEDED
    assert batch.display_name == "" and batch.priority == 0
    assert batch.batch_stats.successful_request_count == 60
    assert len(await drain(keyed.batches.StreamBatchResults(stream_req(name), timeout=T, metadata=ALICE))) == 60
    # bob still cannot delete it once done; alice can
    await fails(name_call(keyed, "delete", name, BOB), grpc.StatusCode.NOT_FOUND)
    await keyed.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name), timeout=T, metadata=ALICE)


async def test_request_id_is_per_tenant(keyed: Stubs) -> None:
    a = await create(keyed, _gen(1, request_id="shared"), ALICE)
    b = await create(keyed, _gen(1, request_id="shared"), BOB)
    assert a.name != b.name
    assert await batch_names(keyed, ALICE) == [a.name]
    assert await batch_names(keyed, BOB) == [b.name]


async def test_health_and_reflection_need_no_key(keyed: Stubs) -> None:
    health = health_pb2_grpc.HealthStub(keyed.channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=T)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(keyed.channel)
    call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=T)
    services = {s.name async for r in call for s in r.list_services_response.service}
    assert "longbatch.v1.BatchService" in services


# --------------------------------------------------------------------------- still serving (section 11)


async def test_server_keeps_serving_after_bad_calls(stubs: Stubs) -> None:
    before = await create(stubs, _gen(5))
    bad: list[Awaitable[Any]] = []
    for case in CREATE_CASES:
        build, _ = case.values
        bad.append(create(stubs, build()))
    for method in [*OP_METHODS, "stream", "update"]:
        for case in BAD_NAMES:
            bad.append(name_call(stubs, method, case.values[0]))
        bad.append(name_call(stubs, method, "batches/abc123"))
    bad += [
        stubs.ops.ListOperations(list_req(page_size=-1), timeout=T),
        stubs.ops.ListOperations(list_req(filter="(" * 5000), timeout=T),
        stubs.ops.ListOperations(list_req(page_token="x" * 3000), timeout=T),
        stubs.ops.ListOperations(list_req(return_partial_success=True), timeout=T),
        stubs.ops.WaitOperation(wait_req(before.name, -1), timeout=T),
        stubs.models.GetModel(model_pb2.GetModelRequest(name="models/x"), timeout=T),
        stubs.models.ListModels(model_pb2.ListModelsRequest(page_size=-5), timeout=T),
    ]
    results = await asyncio.gather(*bad, return_exceptions=True)
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError), f"a bad call succeeded: {str(result)[:200]}"
        assert result.code() not in FORBIDDEN_CODES, (result.code(), result.details())
        details(result)
    after = await create(stubs, _gen(5))
    for op in (before, after):
        done = await wait_done(stubs, op.name)
        assert metadata_of(done).state == batch_pb2.BATCH_STATE_SUCCEEDED
        assert metadata_of(done).batch_stats.successful_request_count == 5
        out = batch_pb2.GenerateContentBatchOutput()
        assert done.response.Unpack(out)
        assert len(out.inlined_responses.inlined_responses) == 5
    assert sorted(await batch_names(stubs)) == sorted([before.name, after.name])


# --------------------------------------------------------------------------- property (section 11)

_FILTER_ALPHABET = list('statedonmlpriy_ANDORT=!<>()"\'\\:*.-/ 0123456789\x00\u00e9\U0001f600\t\n')
_texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=_FILTER_ALPHABET, max_size=120),
    st.builds(lambda s: "batches/" + s, st.text(max_size=80)),
    st.builds(lambda s: "models/" + s, st.text(max_size=80)),
    st.from_regex(r"\A[A-Za-z0-9_-]{0,300}\Z"),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_texts)
@example(text="(" * 3000 + "done = true" + ")" * 3000)
@example(text="NOT " * 3000 + "done = true")
@example(text="display_name = \"'; DROP TABLE batches; --\"")
@example(text="batches/abc123")
@example(text="models/echo")
@example(text="\x00")
async def test_random_text_never_unknown_or_internal(stubs: Stubs, text: str) -> None:
    invalid, not_found, ok = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK
    calls: list[tuple[str, Callable[[], Awaitable[Any]], set[grpc.StatusCode]]] = [
        (method, functools.partial(name_call, stubs, method, text), {invalid, not_found})
        for method in [*OP_METHODS, "stream", "update"]
    ]
    calls += [
        ("GetModel", lambda: stubs.models.GetModel(model_pb2.GetModelRequest(name=text), timeout=T),
         {invalid, not_found, ok}),
        ("List.filter", lambda: stubs.ops.ListOperations(list_req(filter=text), timeout=T), {invalid, ok}),
        ("List.page_token", lambda: stubs.ops.ListOperations(list_req(page_token=text), timeout=T),
         {invalid} if text else {ok}),
        ("List.name", lambda: stubs.ops.ListOperations(list_req(name=text), timeout=T),
         {ok} if text in ("", "batches") else {invalid}),
        ("ListModels.page_token",
         lambda: stubs.models.ListModels(model_pb2.ListModelsRequest(page_token=text), timeout=T),
         {invalid} if text else {ok}),
        ("create.model", lambda: create(stubs, _gen(1, model=text)), {invalid, not_found, ok}),
        ("create.display_name", lambda: create(stubs, _gen(1, model="models/nope", display_name=text)),
         {invalid, not_found}),
        ("create.webhook", lambda: create(stubs, _gen(1, model="models/nope",
                                                      webhook_config=batch_pb2.WebhookConfig(uris=[text]))),
         {invalid, not_found}),
    ]
    for what, call, allowed in calls:
        try:
            await call()
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            code = err.code()
            assert code in allowed, f"{what}({text!r}): {code.name} {err.details()}"
            details(err)
        assert code in allowed, f"{what}({text!r}): OK, expected one of {allowed}"
