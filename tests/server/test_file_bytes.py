"""The FileBytes contract on both implementations (DiskFileBytes, and
PgFileBytes when a PostgreSQL answers: see tests/pg.py), then what only the
database one has: chunks deleted with the file's row, scratch space that
loses nothing when deleted, and memory bounded on a large file."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest
from pg import available, pg_database, pg_url, store_kinds  # noqa: F401  (fixtures, by name)

from longbatch.server.config import Limits
from longbatch.server.domain import StoredFile, now_us
from longbatch.server.errors import InvalidArgument
from longbatch.server.file_manager import FileManager
from longbatch.server.files import DiskFileBytes, FileBytes, new_id
from longbatch.server.paging import PageTokens
from longbatch.server.pg_file_bytes import PgFileBytes
from longbatch.server.pg_store import PostgresStore

CHUNK = 1000
"""PgFileBytes chunk size in the contract cases: multi-chunk files stay small."""
KINDS = ["disk" if kind == "sqlite" else kind for kind in store_kinds()]


@pytest.fixture(params=KINDS)
async def fb(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FileBytes]:
    # pg_url is asked for only by the postgres param, so disk cases never wait on PostgreSQL.
    if request.param == "disk":
        disk = DiskFileBytes(tmp_path / "files")
        disk.prepare()
        yield disk
        return
    store = PostgresStore(request.getfixturevalue("pg_url"), min_connections=1, max_connections=8)
    await store.open()
    db = PgFileBytes(store, tmp_path / "scratch", chunk_bytes=CHUNK)
    db.prepare()
    try:
        yield db
    finally:
        await store.close()


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[PostgresStore]:  # noqa: F811  (the fixture imported above)
    store = PostgresStore(pg_url, min_connections=1, max_connections=4)
    await store.open()
    yield store
    await store.close()


needs_pg = pytest.mark.skipif(not available(), reason="no PostgreSQL (see tests/pg.py)")


async def put(fb: FileBytes, data: bytes, piece: int = 4096) -> str:
    file_id = new_id()
    new = fb.create(file_id)
    for at in range(0, len(data), piece):
        new.write(data[at:at + piece])
    await fb.commit(new)
    return file_id


async def streamed(fb: FileBytes, file_id: str, size: int = 1 << 20) -> bytes:
    source = await fb.open(file_id)
    try:
        pieces = [chunk async for chunk in source.chunks(size)]
    finally:
        source.close()
    assert all(0 < len(p) <= size for p in pieces)
    return b"".join(pieces)


def leftovers(root: Path) -> list[str]:
    """Files under ``root`` other than committed disk files (temporaries, copies)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and (p.parent.name in (".tmp", "spool", "copies")))


# -- the contract --------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 5 * CHUNK + 7])
async def test_bytes_come_back_equal_streamed_and_by_path(fb: FileBytes, size: int, tmp_path: Path) -> None:
    data = os.urandom(size)
    file_id = await put(fb, data)
    assert await streamed(fb, file_id) == data
    assert await streamed(fb, file_id, size=333) == data  # chunks smaller than the stored ones
    async with fb.local_path(file_id) as path:
        assert path.read_bytes() == data
        assert path.stat().st_mode & 0o077 == 0  # a tenant's bytes: owner only
    assert leftovers(tmp_path) == []


async def test_the_writer_counts_and_hashes(fb: FileBytes) -> None:
    new = fb.create(new_id())
    new.write(b"abc")
    new.write(b"def")
    assert (new.size, new.sha256) == (6, hashlib.sha256(b"abcdef").digest())
    await fb.commit(new)
    new.abort()  # safe after a commit, and keeps the bytes
    assert await streamed(fb, new.file_id) == b"abcdef"


async def test_absent_bytes(fb: FileBytes) -> None:
    with pytest.raises(FileNotFoundError):
        await fb.open("nosuchfile")
    async with fb.local_path("nosuchfile") as path:
        assert not path.exists()
        with pytest.raises(FileNotFoundError):
            path.open("rb")


async def test_remove(fb: FileBytes, tmp_path: Path) -> None:
    kept, gone = await put(fb, b"kept"), await put(fb, b"x" * (3 * CHUNK))
    await fb.remove([gone, "nosuchfile"])
    await fb.remove([])
    with pytest.raises(FileNotFoundError):
        await fb.open(gone)
    assert await streamed(fb, kept) == b"kept"


async def test_an_uncommitted_or_aborted_file_leaves_nothing(fb: FileBytes, tmp_path: Path) -> None:
    new = fb.create(new_id())
    new.write(b"half")
    with pytest.raises(FileNotFoundError):
        await fb.open(new.file_id)  # not visible before its commit
    new.abort()
    new.abort()
    with pytest.raises(FileNotFoundError):
        await fb.open(new.file_id)
    assert leftovers(tmp_path) == []


async def test_a_failed_commit_leaves_nothing(fb: FileBytes, tmp_path: Path) -> None:
    new = fb.create(new_id())
    new.write(b"y" * (2 * CHUNK))
    new.tmp.unlink()  # the temporary is gone under it: the commit cannot complete
    with pytest.raises(OSError):
        await fb.commit(new)
    with pytest.raises(FileNotFoundError):
        await fb.open(new.file_id)
    assert leftovers(tmp_path) == []


async def test_a_temporary_left_by_a_crash_goes_at_prepare(fb: FileBytes, tmp_path: Path) -> None:
    new = fb.create(new_id())
    new.write(b"crash")
    assert leftovers(tmp_path) != []
    fb.prepare()
    assert leftovers(tmp_path) == []
    new.abort()  # the crashed writer's handle (here still open)


async def test_concurrent_readers(fb: FileBytes, tmp_path: Path) -> None:
    data = os.urandom(7 * CHUNK + 3)
    file_id = await put(fb, data)
    paths: list[Path] = []

    async def by_path() -> bytes:
        async with fb.local_path(file_id) as path:
            paths.append(path)
            await asyncio.sleep(0.01)  # readers overlap
            return await asyncio.to_thread(path.read_bytes)

    got = await asyncio.gather(*(by_path() for _ in range(8)), *(streamed(fb, file_id, 500) for _ in range(4)))
    assert all(g == data for g in got)
    assert len(set(paths)) == 1  # the real path, or one scratch copy made once for all
    if isinstance(fb, PgFileBytes):
        assert not paths[0].exists()  # removed after the last reader
    assert leftovers(tmp_path) == []


async def test_a_reader_giving_up_leaves_the_copy_to_the_others(fb: FileBytes, tmp_path: Path) -> None:
    data = os.urandom(40 * CHUNK)
    file_id = await put(fb, data)
    entered = asyncio.Event()

    async def quitter() -> None:
        async with fb.local_path(file_id):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(quitter())
    await entered.wait()
    async with fb.local_path(file_id) as path:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert path.read_bytes() == data
    assert leftovers(tmp_path) == []


# -- PostgreSQL only -------------------------------------------------------------


def _stored(file_id: str, size: int) -> StoredFile:
    return StoredFile(id=file_id, seq=0, tenant="t", display_name="", mime_type="application/jsonl",
                      size_bytes=size, sha256=b"\x01" * 32, create_time_us=now_us(), expire_time_us=None,
                      source="uploaded")


async def _chunk_rows(store: PostgresStore, file_id: str) -> int:
    return int(await store.pool.fetchval("SELECT count(*) FROM file_bytes WHERE file_id = $1", file_id))


@needs_pg
async def test_a_commit_failing_midway_stores_no_chunk(pg_store: PostgresStore, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fb = PgFileBytes(pg_store, tmp_path / "scratch", chunk_bytes=CHUNK)
    fb.prepare()
    real = fb._records

    async def breaks(file_id: str, path: Path) -> AsyncGenerator[tuple[str, int, bytes], None]:
        sent = 0
        async for record in real(file_id, path):
            if sent == 3:
                raise OSError("disk read failed")
            yield record
            sent += 1

    monkeypatch.setattr(fb, "_records", breaks)
    new = fb.create(new_id())
    new.write(os.urandom(10 * CHUNK))
    with pytest.raises(OSError, match="disk read failed"):
        await fb.commit(new)
    assert await _chunk_rows(pg_store, new.file_id) == 0
    assert leftovers(tmp_path) == []


@needs_pg
async def test_chunks_go_with_the_files_row(pg_store: PostgresStore, tmp_path: Path) -> None:
    fb = PgFileBytes(pg_store, tmp_path / "scratch", chunk_bytes=CHUNK)
    fb.prepare()
    file_id = await put(fb, b"z" * (4 * CHUNK))
    assert await _chunk_rows(pg_store, file_id) == 4
    await pg_store.add_file(_stored(file_id, 4 * CHUNK))
    assert await pg_store.delete_file("t", file_id)
    assert await _chunk_rows(pg_store, file_id) == 0


@needs_pg
async def test_deleting_the_scratch_space_loses_nothing(pg_store: PostgresStore, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    fb = PgFileBytes(pg_store, scratch, chunk_bytes=CHUNK)
    fb.prepare()
    data = os.urandom(9 * CHUNK + 1)
    file_id = await put(fb, data)
    async with fb.local_path(file_id) as path:
        assert path.read_bytes() == data
        path.unlink()  # a copy removed under its reader: only the copy
    shutil.rmtree(scratch)
    again = PgFileBytes(pg_store, scratch, chunk_bytes=CHUNK)  # a restart with an empty data dir
    again.prepare()
    assert await streamed(again, file_id) == data
    async with again.local_path(file_id) as path:
        assert path.read_bytes() == data


@needs_pg
async def test_uploads_downloads_and_deletes_through_the_file_manager(pg_store: PostgresStore, tmp_path: Path) -> None:
    fb = PgFileBytes(pg_store, tmp_path / "scratch", chunk_bytes=CHUNK)
    fb.prepare()
    files = FileManager(pg_store, fb, Limits(), PageTokens(b"k" * 32))
    data = os.urandom(3 * CHUNK + 5)

    async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    stored = await files.create("t", "in", "", chunks(data[:1500], data[1500:]))
    assert (stored.size_bytes, stored.sha256) == (len(data), hashlib.sha256(data).digest())
    download = await files.open_download("t", stored.id)
    try:
        assert b"".join([c async for c in download.chunks(1 << 20)]) == data
    finally:
        download.close()
    with pytest.raises(InvalidArgument):
        await files.create("t", "", "", chunks())
    await files.delete("t", stored.id)
    assert await pg_store.pool.fetchval("SELECT count(*) FROM file_bytes") == 0
    assert leftovers(tmp_path) == []


def _rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS, where the kernel allows; else the
    test samples VmRSS as it goes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@needs_pg
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
async def test_a_64_mib_file_streams_in_and_out_in_bounded_memory(pg_store: PostgresStore, tmp_path: Path) -> None:
    fb = PgFileBytes(pg_store, tmp_path / "scratch")  # the real chunk size
    fb.prepare()
    # Warm up: codecs, pool connections, thread pool, buffers.
    warm = await put(fb, os.urandom(3 << 20), piece=1 << 20)
    assert len(await streamed(fb, warm)) == 3 << 20
    block = os.urandom(1 << 20)  # incompressible, so the table stores every byte
    new = fb.create(new_id())
    for _ in range(64):
        new.write(block)
    expected = new.sha256
    base = _rss_kib()
    peak = base
    hwm = _reset_peak()
    await fb.commit(new)
    peak = max(peak, _rss_kib())
    digest = hashlib.sha256()
    source = await fb.open(new.file_id)
    try:
        async for chunk in source.chunks(1 << 20):
            digest.update(chunk)
            peak = max(peak, _rss_kib())
    finally:
        source.close()
    assert digest.digest() == expected
    async with fb.local_path(new.file_id) as path:
        peak = max(peak, _rss_kib())
        assert path.stat().st_size == 64 << 20
    if hwm:
        peak = max(peak, _rss_kib("VmHWM"))
    grown_mib = (peak - base) / 1024
    assert grown_mib < 20, f"RSS grew by {grown_mib:.1f} MiB moving 64 MiB"
