"""FileManager alone, against a real SQLite store and file storage in a temp
dir: the rules an HTTP surface would share with gRPC, fed plain values and
async iterators of bytes."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from longbatch.server.config import Limits, QuotaSettings, TenantQuota
from longbatch.server.domain import BatchKind, NewBatch
from longbatch.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from longbatch.server.file_manager import FileExpiry, FileManager
from longbatch.server.files import DiskFileBytes
from longbatch.server.paging import PageTokens
from longbatch.server.quotas import Quotas
from longbatch.server.sqlite_store import SQLiteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "db.sqlite")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def storage(tmp_path: Path) -> DiskFileBytes:
    files = DiskFileBytes(tmp_path / "files")
    files.prepare()
    return files


def _manager(store: SQLiteStore, storage: DiskFileBytes, quotas: Quotas | None = None, **limits: int) -> FileManager:
    return FileManager(store, storage, Limits(**limits), PageTokens(b"k" * 32), quotas=quotas)


async def _chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _on_disk(storage: DiskFileBytes, tmp_path: Path) -> list[str]:
    """Every file under the storage root, temporaries included."""
    return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "files").rglob("*") if p.is_file())


async def test_an_upload_from_byte_chunks_is_stored_listed_and_downloadable(
    store: SQLiteStore, storage: DiskFileBytes, tmp_path: Path
) -> None:
    files = _manager(store, storage)
    parts = [b"a" * 700_000, b"b" * 700_000, b"c"]  # across a write batch of a MiB
    stored = await files.create("t", "my input", "", _chunks(parts))
    data = b"".join(parts)
    assert (stored.tenant, stored.display_name, stored.mime_type) == ("t", "my input", "application/jsonl")
    assert (stored.size_bytes, stored.sha256, stored.source) == (len(data), hashlib.sha256(data).digest(), "uploaded")
    assert stored.expire_time_us == stored.create_time_us + int(Limits().file_ttl_s * 1_000_000)
    assert (await files.get("t", stored.id)).sha256 == stored.sha256
    page, token = await files.list("t", 10, "")
    assert [f.id for f in page] == [stored.id] and token == ""
    download = await files.open_download("t", stored.id)
    try:
        got = [chunk async for chunk in download.chunks(1 << 20)]
    finally:
        download.close()
    assert b"".join(got) == data and max(map(len, got)) <= 1 << 20
    assert _on_disk(storage, tmp_path) == [f"files/{stored.id}"]


async def test_over_the_size_limit_leaves_nothing(store: SQLiteStore, storage: DiskFileBytes, tmp_path: Path) -> None:
    files = _manager(store, storage, max_file_bytes=10)
    with pytest.raises(ResourceExhausted) as e:
        await files.create("t", "", "", _chunks([b"12345", b"678901"]))
    assert e.value.reason == "FILE_TOO_LARGE" and e.value.metadata == {"limit_bytes": "10"}
    assert e.value.message == "file exceeds the limit of 10 bytes (10 B) per file"
    assert await files.list("t", 10, "") == ([], "")
    assert _on_disk(storage, tmp_path) == []


async def test_a_failing_byte_stream_propagates_and_leaves_nothing(
    store: SQLiteStore, storage: DiskFileBytes, tmp_path: Path
) -> None:
    async def cut() -> AsyncIterator[bytes]:
        yield b"x" * (2 << 20)
        raise ConnectionResetError("client gone")

    with pytest.raises(ConnectionResetError):
        await _manager(store, storage).create("t", "", "", cut())
    assert await store.list_files("t", None, 10) == []
    assert _on_disk(storage, tmp_path) == []


async def test_an_empty_upload_and_bad_metadata_are_invalid(store: SQLiteStore, storage: DiskFileBytes) -> None:
    files = _manager(store, storage)
    with pytest.raises(InvalidArgument) as e:
        await files.create("t", "", "", _chunks([]))
    assert e.value.reason == "FILE_EMPTY" and e.value.violations == [("data", "no bytes were sent")]
    with pytest.raises(InvalidArgument) as e:
        await files.create("t", "x" * 600, "not a type", _chunks([b"never read"]))
    assert [field for field, _ in e.value.violations] == ["file.display_name", "file.mime_type"]
    assert e.value.message.startswith("invalid file: file.display_name is 600 characters")


async def test_the_byte_quota_refuses_midway_and_leaves_nothing(
    store: SQLiteStore, storage: DiskFileBytes, tmp_path: Path
) -> None:
    quotas = Quotas(QuotaSettings(defaults=TenantQuota(max_stored_bytes=100)), store, open_server=False)
    files = _manager(store, storage, quotas=quotas)
    with pytest.raises(ResourceExhausted) as e:
        await files.create("t", "", "", _chunks([b"a" * 60, b"b" * 60]))
    assert e.value.reason == "QUOTA_EXCEEDED"
    assert _on_disk(storage, tmp_path) == []
    # The refused upload left no bytes counted: a smaller one fits.
    assert (await files.create("t", "", "", _chunks([b"a" * 100]))).size_bytes == 100


async def test_another_tenants_file_is_not_found_even_while_in_use(store: SQLiteStore, storage: DiskFileBytes) -> None:
    files = _manager(store, storage)
    stored = await files.create("alice", "", "", _chunks([b"{}\n"]))
    for call in (files.get("bob", stored.id), files.delete("bob", stored.id), files.open_download("bob", stored.id)):
        with pytest.raises(NotFound) as e:
            await call
        assert (e.value.reason, e.value.message) == ("FILE_NOT_FOUND", f"files/{stored.id} not found")
    # Read by alice's pending batch: still NOT_FOUND for bob (the tenant
    # check comes before the in-use check), FILE_IN_USE for alice.
    await store.create_batch(NewBatch(id="b1", tenant="alice", kind=BatchKind.GENERATE, model="models/echo",
                                      display_name="", priority=0, input_file=stored.id, webhook=None,
                                      request_id=None), [], 0)
    with pytest.raises(NotFound):
        await files.delete("bob", stored.id)
    with pytest.raises(FailedPrecondition) as in_use:
        await files.delete("alice", stored.id)
    assert in_use.value.reason == "FILE_IN_USE"
    assert (await files.get("alice", stored.id)).id == stored.id


async def test_delete_removes_row_and_bytes(store: SQLiteStore, storage: DiskFileBytes, tmp_path: Path) -> None:
    files = _manager(store, storage)
    stored = await files.create("t", "", "", _chunks([b"{}\n"]))
    await files.delete("t", stored.id)
    with pytest.raises(NotFound):
        await files.get("t", stored.id)
    with pytest.raises(NotFound):
        await files.delete("t", stored.id)
    assert _on_disk(storage, tmp_path) == []


async def test_list_pages_newest_first_and_tokens_are_per_tenant(store: SQLiteStore, storage: DiskFileBytes) -> None:
    files = _manager(store, storage)
    ids = [(await files.create("t", str(i), "", _chunks([b"x"]))).id for i in range(5)]
    first, token = await files.list("t", 2, "")
    second, token2 = await files.list("t", 2, token)
    third, token3 = await files.list("t", 2, token2)
    assert [f.id for f in first + second + third] == ids[::-1] and token3 == ""
    with pytest.raises(InvalidArgument):
        await files.list("other", 2, token)


async def test_expiry_deletes_expired_files_with_their_bytes(
    store: SQLiteStore, storage: DiskFileBytes, tmp_path: Path
) -> None:
    files = FileManager(store, storage, Limits(file_ttl_s=0.0), PageTokens(b"k" * 32))
    stored = await files.create("t", "", "", _chunks([b"x"]))
    assert await FileExpiry(store, storage, 0.0).sweep() == 1
    with pytest.raises(NotFound):
        await files.get("t", stored.id)
    assert _on_disk(storage, tmp_path) == []
