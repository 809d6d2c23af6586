"""ListOperations: keyset paging, signed tokens, AIP-160 filters (API.md section 4)."""

from __future__ import annotations

import grpc
import pytest
from google.longrunning import operations_pb2

from support import Stubs, details, generate_batch, metadata_of, wait_done


async def _create(stubs: Stubs, n: int, **kw: object) -> list[str]:
    return [(await stubs.batches.BatchGenerateContent(generate_batch(1, **kw))).name for _ in range(n)]


async def _page(stubs: Stubs, token: str = "", size: int = 7, flt: str = "") -> operations_pb2.ListOperationsResponse:
    return await stubs.ops.ListOperations(operations_pb2.ListOperationsRequest(
        name="batches", page_size=size, page_token=token, filter=flt))


async def test_paging_visits_each_batch_once_newest_first(stubs: Stubs) -> None:
    created = await _create(stubs, 25)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await _page(stubs, token)
        pages += 1
        assert len(page.operations) <= 7
        for op in page.operations:
            # Outputs stay out of List; a done batch still has its (empty) typed response.
            assert not metadata_of(op).HasField("output")
            assert op.HasField("response") == op.done and op.response.value == b""
        seen += [op.name for op in page.operations]
        # New batches created while paging are newer: they must not show up
        # in later pages nor shift what those pages hold.
        await _create(stubs, 2)
        token = page.next_page_token
        if not token:
            break
    assert pages == 4
    assert seen == list(reversed(created))


async def test_page_token_is_bound_to_filter_and_signed(stubs: Stubs) -> None:
    await _create(stubs, 10)
    token = (await _page(stubs, size=3)).next_page_token
    assert token
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _page(stubs, token, size=3, flt="done = true")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(e.value).violations[0][0] == "page_token"
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _page(stubs, tampered, size=3)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(e.value).reason == "INVALID_PAGE_TOKEN"
    # The same token with the same filter and another page size is fine (AIP-158).
    assert len((await _page(stubs, token, size=5)).operations) == 5


async def test_filters(stubs: Stubs) -> None:
    fast = await _create(stubs, 3, display_name="fast run", priority=1)
    slow = (await stubs.batches.BatchGenerateContent(
        generate_batch(2000, model="models/echo-slow", display_name="slow run", priority=5))).name
    for name in fast:
        await wait_done(stubs, name)

    async def names(flt: str) -> set[str]:
        return {op.name for op in (await _page(stubs, size=100, flt=flt)).operations}

    assert await names("state = SUCCEEDED") == set(fast)
    assert await names("state = BATCH_STATE_RUNNING OR state = BATCH_STATE_PENDING") == {slow}
    assert await names("done = false") == {slow}
    assert await names('model = "models/echo-slow"') == {slow}
    assert await names("model = echo") == set(fast)
    assert await names('display_name = "fast*"') == set(fast)
    assert await names("priority >= 5") == {slow}
    assert await names("NOT priority >= 5 AND done = true") == set(fast)
    assert await names('create_time > "2000-01-01T00:00:00Z"') == {*fast, slow}
    assert await names('create_time < "2000-01-01T00:00:00Z"') == set()
    for bad in ("state = ", "nosuchfield = 1", "state = SLEEPING", "(done = true", "priority > abc"):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _page(stubs, flt=bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert details(e.value).violations[0][0] == "filter"
    await stubs.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=slow))


async def test_default_page_size_and_last_page(stubs: Stubs) -> None:
    await _create(stubs, 3)
    page = await stubs.ops.ListOperations(operations_pb2.ListOperationsRequest(name=""))
    assert len(page.operations) == 3 and page.next_page_token == ""
