"""The official google-genai SDK, unmodified, against the server's REST API.

The SDK is pointed at a real server on 127.0.0.1:0 with
``http_options.base_url``, with its default API version (``v1`` in 3.x) and
with ``v1beta`` (1.x's default); its sync client runs in a thread, its async
client in the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeServer, ServerHandle
from google import genai
from google.genai import errors, types

pytestmark = [
    # create_embeddings is "experimental" in the SDK, and its async client
    # subclasses aiohttp's ClientSession, which aiohttp discourages: the
    # SDK's own warnings, not ours.
    pytest.mark.filterwarnings("ignore::google.genai._common.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning"),
]

VERSIONS = [None, "v1beta"]


def _client(server: ServerHandle, version: str | None, api_key: str = "any-key") -> genai.Client:
    options = types.HttpOptions(base_url=server.http, api_version=version) if version else \
        types.HttpOptions(base_url=server.http)
    return genai.Client(api_key=api_key, http_options=options)


def _until_done(get: Callable[[], types.BatchJob], within: float = 30.0) -> types.BatchJob:
    deadline = time.monotonic() + within
    while True:
        job = get()
        if job.done:
            return job
        assert time.monotonic() < deadline, f"batch not done within {within} s: {job.state}"
        time.sleep(0.02)


async def _until_done_async(get: Callable[[], Any], within: float = 30.0) -> types.BatchJob:
    deadline = time.monotonic() + within
    while True:
        job: types.BatchJob = await get()
        if job.done:
            return job
        assert time.monotonic() < deadline, f"batch not done within {within} s: {job.state}"
        await asyncio.sleep(0.02)


def _jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"key": f"row-{i}", "request": {"contents": [{"parts": [{"text": f"q{i}"}]}]}})
                            + "\n" for i in range(n)))
    return path


def _inline(n: int) -> list[dict[str, Any]]:
    return [{"contents": [{"parts": [{"text": f"prompt {i}"}], "role": "user"}],
             "metadata": {"row": str(i)}} for i in range(n)]


@pytest.mark.parametrize("version", VERSIONS)
async def test_sync_sdk_inline_file_embed_list_cancel_delete(make_server: MakeServer, tmp_path: Path,
                                                             version: str | None) -> None:
    server = await make_server()

    def run() -> None:
        client = _client(server, version)
        # Inline generate: succeeded, responses in input order with their metadata.
        job = client.batches.create(model="echo", src=_inline(5), config={"display_name": "inline"})
        assert job.name and job.name.startswith("batches/")
        assert job.state in (types.JobState.JOB_STATE_PENDING, types.JobState.JOB_STATE_RUNNING)
        assert job.display_name == "inline" and job.model == "models/echo"
        job = _until_done(lambda: client.batches.get(name=job.name))
        assert job.state == types.JobState.JOB_STATE_SUCCEEDED
        assert job.dest is not None and job.dest.inlined_responses is not None
        texts = [r.response.text for r in job.dest.inlined_responses if r.response]
        assert texts == [f"prompt {i}" for i in range(5)]
        assert [r.metadata for r in job.dest.inlined_responses] == [{"row": str(i)} for i in range(5)]
        assert job.create_time is not None and job.end_time is not None

        # A JSONL file: upload, batch, download the results.
        uploaded = client.files.upload(file=str(_jsonl(tmp_path / "reqs.jsonl", 20)),
                                       config={"mime_type": "application/jsonl", "display_name": "reqs"})
        assert uploaded.name and uploaded.state == types.FileState.ACTIVE
        assert uploaded.size_bytes == (tmp_path / "reqs.jsonl").stat().st_size
        assert client.files.get(name=uploaded.name).display_name == "reqs"
        file_job = client.batches.create(model="models/echo", src=uploaded.name)
        file_job = _until_done(lambda: client.batches.get(name=file_job.name))
        assert file_job.state == types.JobState.JOB_STATE_SUCCEEDED
        assert file_job.dest is not None and file_job.dest.file_name
        lines = client.files.download(file=file_job.dest.file_name).decode().splitlines()
        results = [json.loads(line) for line in lines]
        assert [r["key"] for r in results] == [f"row-{i}" for i in range(20)]
        assert results[7]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "q7"

        # Embeddings, inline.
        embed = client.batches.create_embeddings(
            model="models/echo",
            src={"inlined_requests": {"contents": [{"parts": [{"text": t}]} for t in ("a", "b", "c")],
                                      "config": {"output_dimensionality": 8, "task_type": "RETRIEVAL_DOCUMENT"}}})
        embed = _until_done(lambda: client.batches.get(name=embed.name))
        assert embed.state == types.JobState.JOB_STATE_SUCCEEDED
        assert embed.dest is not None and embed.dest.inlined_embed_content_responses is not None
        vectors = [r.response.embedding.values for r in embed.dest.inlined_embed_content_responses
                   if r.response and r.response.embedding]
        assert len(vectors) == 3 and all(v is not None and len(v) == 8 for v in vectors)

        # Paging: every batch once, newest first, in pages of 2.
        names = [j.name for j in client.batches.list(config={"page_size": 2})]
        assert names == [embed.name, file_job.name, job.name]

        # Cancel a batch that is running, then delete it; then it is gone.
        slow = client.batches.create(model="models/echo-slow", src=_inline(400))
        client.batches.cancel(name=slow.name)
        slow = _until_done(lambda: client.batches.get(name=slow.name))
        assert slow.state == types.JobState.JOB_STATE_CANCELLED
        client.batches.delete(name=slow.name)
        with pytest.raises(errors.ClientError) as gone:
            client.batches.get(name=slow.name)
        assert gone.value.code == 404 and gone.value.status == "NOT_FOUND"

        # Errors the SDK raises with the right codes.
        with pytest.raises(errors.ClientError) as bad:
            client.batches.create(model="models/echo", src=[{**_inline(1)[0], "config": {"temperature": 5}}])
        assert bad.value.code == 400 and bad.value.status == "INVALID_ARGUMENT"
        assert "temperature" in str(bad.value.message)
        with pytest.raises(errors.ClientError) as unknown:
            client.batches.create(model="models/no-such-model", src=_inline(1))
        assert unknown.value.code == 404
        client.files.delete(name=uploaded.name)
        with pytest.raises(errors.ClientError) as no_file:
            client.files.get(name=uploaded.name)
        assert no_file.value.code == 404

    await asyncio.to_thread(run)


@pytest.mark.parametrize("version", VERSIONS)
async def test_async_sdk(make_server: MakeServer, tmp_path: Path, version: str | None) -> None:
    server = await make_server()
    client = _client(server, version).aio
    job = await client.batches.create(model="models/echo", src=_inline(3))
    assert job.name
    name = job.name
    job = await _until_done_async(lambda: client.batches.get(name=name))
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert job.dest is not None and job.dest.inlined_responses is not None
    assert [r.response.text for r in job.dest.inlined_responses if r.response] == [f"prompt {i}" for i in range(3)]

    uploaded = await client.files.upload(file=str(_jsonl(tmp_path / "r.jsonl", 10)),
                                         config={"mime_type": "application/jsonl"})
    assert uploaded.name
    file_job = await client.batches.create(model="models/echo", src=uploaded.name)
    assert file_job.name
    file_name = file_job.name
    file_job = await _until_done_async(lambda: client.batches.get(name=file_name))
    assert file_job.dest is not None and file_job.dest.file_name
    data = await client.files.download(file=file_job.dest.file_name)
    assert [json.loads(line)["key"] for line in data.decode().splitlines()] == [f"row-{i}" for i in range(10)]

    listed = [j.name async for j in await client.batches.list(config={"page_size": 1})]
    assert listed == [file_name, name]

    slow = await client.batches.create(model="models/echo-slow", src=_inline(400))
    assert slow.name
    slow_name = slow.name
    await client.batches.cancel(name=slow_name)
    slow = await _until_done_async(lambda: client.batches.get(name=slow_name))
    assert slow.state == types.JobState.JOB_STATE_CANCELLED
    await client.batches.delete(name=slow_name)
    with pytest.raises(errors.ClientError) as gone:
        await client.batches.get(name=slow_name)
    assert gone.value.code == 404
    with pytest.raises(errors.ClientError) as bad:
        await client.batches.create(model="models/echo", src=[{**_inline(1)[0], "config": {"temperature": 5}}])
    assert bad.value.code == 400


async def test_sdk_with_api_keys_sees_only_its_tenant(make_server: MakeServer) -> None:
    from longbatch.server.config import ApiKey, ServerConfig

    server = await make_server(ServerConfig(api_keys=(ApiKey("key-a", "a"), ApiKey("key-b", "b"))))

    def run() -> None:
        a, b = _client(server, None, "key-a"), _client(server, None, "key-b")
        job = a.batches.create(model="models/echo", src=_inline(1))
        assert job.name
        with pytest.raises(errors.ClientError) as other:
            b.batches.get(name=job.name)
        assert other.value.code == 404
        assert [j.name for j in b.batches.list()] == []
        stranger = _client(server, None, "not-a-key")  # kept: a dropped Client closes its connection pool
        with pytest.raises(errors.ClientError) as wrong:
            stranger.batches.get(name=job.name)
        assert wrong.value.code == 401 and wrong.value.status == "UNAUTHENTICATED"

    await asyncio.to_thread(run)
