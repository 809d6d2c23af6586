"""The REST API's routes with bad input, auth and tenants, uploads cut midway:
status and Google error body asserted, against a real server on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import MakeServer, ServerHandle

from longbatch.server.config import ApiKey, Limits, ServerConfig

from support import eventually

KEYS = (ApiKey("key-a", "a"), ApiKey("key-b", "b"))
A = {"x-goog-api-key": "key-a"}
B = {"x-goog-api-key": "key-b"}
REQUEST = {"contents": [{"parts": [{"text": "hi"}]}]}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
    async with http.request(method, url, **kw) as r:
        body = await r.read()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = body
        return r.status, parsed, dict(r.headers)


def _error(body: Any, status: int, code: str, reason: str | None = None) -> dict[str, Any]:
    """The Google error body's parts, checked."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == status and error["status"] == code, error
    assert error["message"]
    info = next(d for d in error["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
    assert info["domain"] == "longbatch.dev"
    if reason is not None:
        assert info["reason"] == reason, info
    return dict(error)


def _violations(error: dict[str, Any]) -> list[tuple[str, str]]:
    bad = [d for d in error["details"] if d["@type"] == "type.googleapis.com/google.rpc.BadRequest"]
    return [(v["field"], v["description"]) for b in bad for v in b["fieldViolations"]]


async def _keyed(make_server: MakeServer, **limits: Any) -> ServerHandle:
    return await make_server(ServerConfig(api_keys=KEYS, limits=replace(Limits(), **limits)))


async def _create(http: aiohttp.ClientSession, server: ServerHandle, n: int = 1, model: str = "echo",
                  headers: dict[str, str] = A) -> str:
    body = {"batch": {"inputConfig": {"requests": {"requests": [{"request": REQUEST}] * n}}}}
    status, op, _ = await _call(http, "POST", f"{server.http}/v1beta/models/{model}:batchGenerateContent",
                                json=body, headers=headers)
    assert status == 200, op
    return str(op["name"])


async def _done(http: aiohttp.ClientSession, server: ServerHandle, name: str, headers: dict[str, str] = A) -> Any:
    async def check() -> Any:
        _, op, _ = await _call(http, "GET", f"{server.http}/v1beta/{name}", headers=headers)
        return op if op.get("done") else None

    return await eventually(check, within=30, what=f"{name} done")


async def test_create_bad_bodies(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await _keyed(make_server, max_create_bytes=64 << 10)
    url = f"{server.http}/v1beta/models/echo:batchGenerateContent"
    cases: list[tuple[dict[str, Any], int, str, str, str]] = [
        # (request kwargs, status, code, reason, a word the message must hold)
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "INVALID_ARGUMENT",
         "INVALID_JSON", "JSON"),
        ({"data": b"[1, 2]", "headers": {"Content-Type": "application/json"}}, 400, "INVALID_ARGUMENT",
         "INVALID_JSON", "object"),
        ({"json": {"batch": {"displayName": 5}}}, 400, "INVALID_ARGUMENT", "INVALID_REQUEST_BODY", "displayName"),
        ({"json": {"batch": {"inputConfig": {"requests": {"requests": [{"request": {"nope": 1}}]}}}}}, 400,
         "INVALID_ARGUMENT", "INVALID_REQUEST_BODY", "nope"),
        ({"json": {"batch": {"priority": "high"}}}, 400, "INVALID_ARGUMENT", "INVALID_REQUEST_BODY", "priority"),
        ({"json": {"unknownTopLevel": True}}, 400, "INVALID_ARGUMENT", "INVALID_REQUEST_BODY", "unknownTopLevel"),
        ({"data": b"batch=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415,
         "INVALID_ARGUMENT", "UNSUPPORTED_CONTENT_TYPE", "application/json"),
        ({"json": {"batch": {"displayName": "x" * (70 << 10)}}}, 413, "RESOURCE_EXHAUSTED", "REQUEST_TOO_LARGE",
         "limit"),
        ({"json": {}}, 400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "batch"),
    ]
    for kwargs, status, code, reason, word in cases:
        got, body, _ = await _call(http, "POST", url, headers={**A, **kwargs.pop("headers", {})}, **kwargs)
        assert got == status, (kwargs, body)
        error = _error(body, status, code, reason)
        assert word in error["message"], (word, error["message"])

    # The shared validation: violations name the field, as over gRPC.
    got, body, _ = await _call(http, "POST", url, headers=A, json={"batch": {"inputConfig": {"requests": {
        "requests": [{"request": REQUEST}, {"request": {"contents": []}}]}}}})
    error = _error(body, 400, "INVALID_ARGUMENT")
    assert any(f.startswith("batch.input_config.requests.requests[1]") for f, _ in _violations(error)), error
    # The URL's model wins; a body naming another is refused.
    got, body, _ = await _call(http, "POST", url, headers=A, json={"batch": {"model": "models/other", "inputConfig": {
        "requests": {"requests": [{"request": REQUEST}]}}}})
    assert got == 400 and "models/echo" in body["error"]["message"]
    # Unknown model, unknown method.
    got, body, _ = await _call(http, "POST", f"{server.http}/v1beta/models/none:batchGenerateContent", headers=A,
                               json={"batch": {"inputConfig": {"requests": {"requests": [{"request": REQUEST}]}}}})
    _error(body, 404, "NOT_FOUND", "MODEL_NOT_FOUND")
    got, body, _ = await _call(http, "POST", f"{server.http}/v1beta/models/echo:generateContent", headers=A, json={})
    _error(body, 404, "NOT_FOUND", "METHOD_NOT_FOUND")
    # Nothing of the above was created.
    _, listed, _ = await _call(http, "GET", f"{server.http}/v1beta/batches", headers=A)
    assert listed == {"operations": []}


async def test_routes_methods_and_names(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await _keyed(make_server)
    got, body, _ = await _call(http, "GET", f"{server.http}/v2/batches", headers=A)
    _error(body, 404, "NOT_FOUND", "ROUTE_NOT_FOUND")
    got, body, headers = await _call(http, "PUT", f"{server.http}/v1beta/batches", headers=A)
    _error(body, 405, "UNIMPLEMENTED", "METHOD_NOT_ALLOWED")
    assert "GET" in headers["Allow"]
    got, body, _ = await _call(http, "GET", f"{server.http}/v1beta/batches/NotAnId", headers=A)
    _error(body, 400, "INVALID_ARGUMENT", "INVALID_NAME")
    got, body, _ = await _call(http, "POST", f"{server.http}/v1beta/batches/abc:explode", headers=A)
    _error(body, 404, "NOT_FOUND", "METHOD_NOT_FOUND")
    got, body, _ = await _call(http, "GET", f"{server.http}/v1/batches/abc", headers=A)
    _error(body, 404, "NOT_FOUND", "BATCH_NOT_FOUND")
    got, body, _ = await _call(http, "GET", f"{server.http}/v1/models/none", headers=A)
    _error(body, 404, "NOT_FOUND", "MODEL_NOT_FOUND")
    got, body, _ = await _call(http, "GET", f"{server.http}/v1/models", headers=A)
    assert got == 200 and [m["name"] for m in body["models"]] == ["models/echo", "models/echo-slow"]
    assert body["models"][0]["supportedGenerationMethods"] == ["batchGenerateContent", "asyncBatchEmbedContent"]
    got, body, _ = await _call(http, "GET", f"{server.http}/v1beta/models/echo", headers=A)
    assert got == 200 and body["name"] == "models/echo"


async def test_auth_and_tenants(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await _keyed(make_server)
    got, body, _ = await _call(http, "GET", f"{server.http}/v1beta/batches")
    _error(body, 401, "UNAUTHENTICATED", "API_KEY_MISSING")
    got, body, _ = await _call(http, "GET", f"{server.http}/v1beta/batches", headers={"x-goog-api-key": "wrong"})
    _error(body, 401, "UNAUTHENTICATED", "API_KEY_INVALID")
    got, _, _ = await _call(http, "GET", f"{server.http}/v1beta/batches?key=key-a")
    assert got == 200
    got, _, _ = await _call(http, "GET", f"{server.http}/v1beta/batches",
                            headers={"Authorization": "Bearer key-b"})
    assert got == 200
    # No key needed for health and metrics.
    got, _, _ = await _call(http, "GET", f"{server.http}/healthz")
    assert got == 200

    name = await _create(http, server)
    batch = f"{server.http}/v1beta/{name}"
    for method, url in [("GET", batch), ("POST", batch + ":cancel"), ("DELETE", batch),
                        ("PATCH", batch + ":updateGenerateContentBatch?updateMask=displayName")]:
        got, body, _ = await _call(http, method, url, headers=B, json={"displayName": "x"})
        _error(body, 404, "NOT_FOUND", "BATCH_NOT_FOUND")
    _, listed, _ = await _call(http, "GET", f"{server.http}/v1beta/batches", headers=B)
    assert listed == {"operations": []}
    await _done(http, server, name)
    got, _, _ = await _call(http, "DELETE", batch, headers=A)
    assert got == 200


async def test_list_paging_filters_and_bad_tokens(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await _keyed(make_server)
    names = [await _create(http, server) for _ in range(5)]
    for name in names:
        await _done(http, server, name)
    seen: list[str] = []
    token = ""
    for _ in range(10):
        got, page, _ = await _call(http, "GET", f"{server.http}/v1/batches?pageSize=2&pageToken={token}", headers=A)
        assert got == 200 and len(page["operations"]) <= 2
        seen += [op["name"] for op in page["operations"]]
        # No output in lists, and never an empty token.
        assert all("output" not in op["metadata"] for op in page["operations"])
        token = page.get("nextPageToken", "")
        assert "nextPageToken" not in page or token
        if not token:
            break
    assert seen == names[::-1]
    got, page, _ = await _call(http, "GET", f"{server.http}/v1/batches?filter=state%3DSUCCEEDED", headers=A)
    assert got == 200 and len(page["operations"]) == 5
    got, page, _ = await _call(http, "GET", f"{server.http}/v1/batches?filter=state%3DRUNNING", headers=A)
    assert page == {"operations": []}
    for query, reason in [("filter=colour%3Dblue", "INVALID_FILTER"), ("pageToken=garbage", None),
                          ("pageSize=abc", None), ("pageSize=-1", None)]:
        got, body, _ = await _call(http, "GET", f"{server.http}/v1/batches?{query}", headers=A)
        _error(body, 400, "INVALID_ARGUMENT", reason)
    # A token of one filter does not serve another.
    _, first, _ = await _call(http, "GET", f"{server.http}/v1/batches?pageSize=1", headers=A)
    got, body, _ = await _call(http, "GET", f"{server.http}/v1/batches?pageSize=1&filter=done%3Dtrue&pageToken="
                               + first["nextPageToken"], headers=A)
    _error(body, 400, "INVALID_ARGUMENT")


async def test_update_cancel_delete_rules(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await _keyed(make_server)
    slow = await _create(http, server, n=300, model="echo-slow")
    url = f"{server.http}/v1beta/{slow}"
    got, batch, _ = await _call(http, "PATCH", url + ":updateGenerateContentBatch?updateMask=displayName,priority",
                                headers=A, json={"displayName": "renamed", "priority": "7"})
    assert got == 200 and batch["displayName"] == "renamed" and batch["priority"] == "7"
    for query, body, reason in [
        ("updateMask=model", {"model": "models/x"}, "FIELD_NOT_UPDATABLE"),
        ("", {"displayName": "y"}, None),
        ("updateMask=displayName", {"displayName": "y", "name": "batches/other"}, None),
    ]:
        got, err, _ = await _call(http, "PATCH", f"{url}:updateGenerateContentBatch?{query}", headers=A, json=body)
        _error(err, 400, "INVALID_ARGUMENT", reason)
    got, err, _ = await _call(http, "PATCH", f"{url}:updateEmbedContentBatch?updateMask=displayName", headers=A,
                              json={"displayName": "y"})
    _error(err, 400, "INVALID_ARGUMENT", "WRONG_BATCH_KIND")
    got, err, _ = await _call(http, "DELETE", url, headers=A)
    _error(err, 400, "FAILED_PRECONDITION", "BATCH_NOT_DONE")
    got, body, _ = await _call(http, "POST", url + ":cancel", headers=A)
    assert got == 200 and body == {}
    op = await _done(http, server, slow)
    assert op["metadata"]["state"] == "BATCH_STATE_CANCELLED" and op["error"]["code"] == 1
    got, body, _ = await _call(http, "POST", url + ":cancel", headers=A)  # done: a no-op
    assert got == 200
    got, body, _ = await _call(http, "DELETE", url, headers=A)
    assert got == 200 and body == {}
    got, body, _ = await _call(http, "GET", url, headers=A)
    _error(body, 404, "NOT_FOUND")


async def test_operation_shape_for_the_sdk(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    """A done inline batch: output in metadata.output (twice nested), Gemini's
    enum names, item errors with string details."""
    server = await _keyed(make_server)
    name = await _create(http, server, n=2)
    op = await _done(http, server, name)
    meta = op["metadata"]
    assert meta["state"] == "BATCH_STATE_SUCCEEDED" and meta["model"] == "models/echo"
    assert meta["batchStats"]["requestCount"] == "2"
    items = meta["output"]["inlinedResponses"]["inlinedResponses"]
    assert [i["response"]["candidates"][0]["finishReason"] for i in items] == ["STOP", "STOP"]
    assert op["response"]["inlinedResponses"] == meta["output"]["inlinedResponses"]
    assert op["done"] is True and meta["createTime"].endswith("Z")


async def _upload_start(http: aiohttp.ClientSession, server: ServerHandle, size: int | None = None,
                        headers: dict[str, str] = A) -> str:
    start = {"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start", **headers}
    if size is not None:
        start["X-Goog-Upload-Header-Content-Length"] = str(size)
    got, body, h = await _call(http, "POST", f"{server.http}/upload/v1beta/files", headers=start,
                               json={"file": {"display_name": "d", "mime_type": "application/jsonl"}})
    assert got == 200, body
    assert h["X-Goog-Upload-Status"] == "active"
    return h["X-Goog-Upload-URL"]


def _chunk(command: str, offset: int) -> dict[str, str]:
    return {"X-Goog-Upload-Command": command, "X-Goog-Upload-Offset": str(offset)}


async def test_resumable_upload_rules(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await _keyed(make_server, max_file_bytes=1 << 20)
    url = await _upload_start(http, server, size=10)
    assert url.startswith(server.http + "/upload/v1beta/files?upload_id=")
    # Chunks need no key; a wrong offset is refused and the session lives on.
    got, body, h = await _call(http, "POST", url, headers=_chunk("upload", 0), data=b"abcde")
    assert got == 200 and h["X-Goog-Upload-Status"] == "active"
    got, body, h = await _call(http, "POST", url, headers=_chunk("upload", 3), data=b"fghij")
    _error(body, 400, "INVALID_ARGUMENT", "UPLOAD_OFFSET_MISMATCH")
    assert h["X-Goog-Upload-Status"] == "active"
    got, _, h = await _call(http, "POST", url, headers={"X-Goog-Upload-Command": "query"})
    assert h["X-Goog-Upload-Size-Received"] == "5"
    got, body, h = await _call(http, "POST", url, headers=_chunk("upload, finalize", 5), data=b"fghij")
    assert got == 200 and h["X-Goog-Upload-Status"] == "final"
    file = body["file"]
    assert file["sizeBytes"] == "10" and file["state"] == "ACTIVE" and file["source"] == "UPLOADED"
    got, data, _ = await _call(http, "GET", f"{server.http}/v1beta/{file['name']}:download?alt=media", headers=A)
    assert got == 200 and data == b"abcdefghij"
    # Finished: the id is spent.
    got, body, h = await _call(http, "POST", url, headers=_chunk("upload", 10), data=b"x")
    _error(body, 404, "NOT_FOUND", "UPLOAD_NOT_FOUND")
    assert h["X-Goog-Upload-Status"] == "final"

    # A declared size the bytes do not match; a file over the limit; an empty one.
    url = await _upload_start(http, server, size=3)
    got, body, h = await _call(http, "POST", url, headers=_chunk("upload, finalize", 0), data=b"12")
    _error(body, 400, "INVALID_ARGUMENT", "UPLOAD_SIZE_MISMATCH")
    assert h["X-Goog-Upload-Status"] == "final"
    url = await _upload_start(http, server)
    big = io.BytesIO(b"x" * (2 << 20))
    got, body, h = await _call(http, "POST", url, headers=_chunk("upload, finalize", 0), data=big)
    _error(body, 429, "RESOURCE_EXHAUSTED", "FILE_TOO_LARGE")
    url = await _upload_start(http, server)
    got, body, _ = await _call(http, "POST", url, headers=_chunk("upload, finalize", 0), data=b"")
    _error(body, 400, "INVALID_ARGUMENT", "FILE_EMPTY")
    # Start errors: no protocol, a chosen name, a bad MIME type, no key.
    got, body, _ = await _call(http, "POST", f"{server.http}/upload/v1beta/files", headers=A, data=b"x")
    _error(body, 400, "INVALID_ARGUMENT", "UPLOAD_PROTOCOL_MISSING")
    start = {"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"}
    got, body, _ = await _call(http, "POST", f"{server.http}/upload/v1beta/files", headers={**A, **start},
                               json={"file": {"name": "files/mine"}})
    _error(body, 400, "INVALID_ARGUMENT", "FILE_NAME_NOT_SETTABLE")
    got, body, _ = await _call(http, "POST", f"{server.http}/upload/v1beta/files", headers={**A, **start},
                               json={"file": {"mimeType": "not a type"}})
    _error(body, 400, "INVALID_ARGUMENT")
    got, body, _ = await _call(http, "POST", f"{server.http}/upload/v1beta/files", headers=start, json={})
    _error(body, 401, "UNAUTHENTICATED")
    assert len(server.running.http.uploads) == 0 if server.running.http else False
    # Only the one good file exists.
    _, listed, _ = await _call(http, "GET", f"{server.http}/v1beta/files", headers=A)
    assert [f["sizeBytes"] for f in listed["files"]] == ["10"]


async def test_upload_finalize_alone_and_cancel(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await _keyed(make_server)
    assert server.running.http is not None
    uploads = server.running.http.uploads
    # The bytes in one chunk, then a bodiless finalize.
    url = await _upload_start(http, server, size=6)
    got, _, h = await _call(http, "POST", url, headers=_chunk("upload", 0), data=b"abcdef")
    assert got == 200 and h["X-Goog-Upload-Status"] == "active"
    got, body, h = await _call(http, "POST", url, headers=_chunk("finalize", 6))
    assert got == 200 and h["X-Goog-Upload-Status"] == "final" and body["file"]["sizeBytes"] == "6"
    # A cancelled upload is gone with what it had received.
    url = await _upload_start(http, server)
    await _call(http, "POST", url, headers=_chunk("upload", 0), data=b"xyz")
    got, _, h = await _call(http, "POST", url, headers={"X-Goog-Upload-Command": "cancel"})
    assert got == 200 and h["X-Goog-Upload-Status"] == "cancelled"
    assert len(uploads) == 0
    got, body, h = await _call(http, "POST", url, headers=_chunk("upload, finalize", 3), data=b"z")
    _error(body, 404, "NOT_FOUND", "UPLOAD_NOT_FOUND")
    # An unknown command ends the upload too, and says which ones exist.
    url = await _upload_start(http, server)
    got, body, h = await _call(http, "POST", url, headers={"X-Goog-Upload-Command": "rewind"})
    error = _error(body, 400, "INVALID_ARGUMENT", "UPLOAD_COMMAND_INVALID")
    assert "finalize" in error["message"] and h["X-Goog-Upload-Status"] == "final"
    assert len(uploads) == 0
    _, listed, _ = await _call(http, "GET", f"{server.http}/v1beta/files", headers=A)
    assert [f["sizeBytes"] for f in listed["files"]] == ["6"]
    assert not any((server.data_dir / "files" / ".tmp").iterdir())


async def test_an_upload_cut_midway_leaves_nothing(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await _keyed(make_server)
    url = await _upload_start(http, server)
    got, _, _ = await _call(http, "POST", url, headers=_chunk("upload", 0), data=b"a" * 100_000)
    assert got == 200
    # The next chunk promises 4 MiB, sends 1 MiB and the connection drops.
    target = url.removeprefix(server.http)
    _, writer = await asyncio.open_connection("127.0.0.1", server.running.http_port)
    writer.write(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Goog-Upload-Command: upload, finalize\r\n"
                 f"X-Goog-Upload-Offset: 100000\r\nContent-Length: {4 << 20}\r\n\r\n".encode() + b"b" * (1 << 20))
    await writer.drain()
    assert server.running.http is not None
    uploads = server.running.http.uploads
    writer.close()
    await eventually(lambda: len(uploads) == 0, within=10, what="the cut upload dropped")
    _, listed, _ = await _call(http, "GET", f"{server.http}/v1beta/files", headers=A)
    assert listed == {"files": []}
    tmp = server.data_dir / "files" / ".tmp"
    await eventually(lambda: not any(tmp.iterdir()), within=10, what="no temp file left")
    assert [p.name for p in (server.data_dir / "files").iterdir()] == [".tmp"]


async def test_an_idle_upload_is_dropped(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await _keyed(make_server)
    assert server.running.http is not None
    uploads = server.running.http.uploads
    uploads.idle_timeout_s = 0.2
    url = await _upload_start(http, server)
    await _call(http, "POST", url, headers=_chunk("upload", 0), data=b"abc")
    await eventually(lambda: len(uploads) == 0, within=10, what="the idle upload dropped")
    _, body, _ = await _call(http, "POST", url, headers=_chunk("upload, finalize", 3), data=b"d")
    _error(body, 404, "NOT_FOUND", "UPLOAD_NOT_FOUND")
    assert not any((server.data_dir / "files" / ".tmp").iterdir())


async def test_multipart_and_media_uploads_and_downloads(make_server: MakeServer, http: aiohttp.ClientSession,
                                                        tmp_path: Path) -> None:
    server = await _keyed(make_server)
    payload = b"".join(json.dumps({"request": REQUEST}).encode() + b"\n" for _ in range(3))
    with aiohttp.MultipartWriter("related") as mp:
        mp.append_json({"file": {"displayName": "multi"}})
        mp.append(payload, {"Content-Type": "application/jsonl"})
    got, body, h = await _call(http, "POST", f"{server.http}/upload/v1beta/files?uploadType=multipart",
                               headers=A, data=mp)
    assert got == 200 and h["X-Goog-Upload-Status"] == "final", body
    multi = body["file"]
    assert multi["displayName"] == "multi" and multi["sizeBytes"] == str(len(payload))
    got, body, _ = await _call(http, "POST", f"{server.http}/upload/v1/files?uploadType=media",
                               headers={**A, "Content-Type": "application/jsonl"}, data=payload)
    assert got == 200 and body["file"]["mimeType"] == "application/jsonl"
    media = body["file"]
    for url in (f"{server.http}/v1beta/{multi['name']}:download?alt=media", multi["downloadUri"]):
        async with http.get(url, headers=A) as r:
            assert r.status == 200 and r.content_length == len(payload)
            assert await r.read() == payload
    got, body, _ = await _call(http, "GET", f"{server.http}/v1beta/{multi['name']}:download", headers=A)
    _error(body, 400, "INVALID_ARGUMENT", "ALT_MEDIA_REQUIRED")
    # Another tenant sees none of it.
    for method, url in [("GET", f"{server.http}/v1beta/{multi['name']}"),
                        ("GET", f"{server.http}/v1beta/{multi['name']}:download?alt=media"),
                        ("DELETE", f"{server.http}/v1beta/{multi['name']}")]:
        got, body, _ = await _call(http, method, url, headers=B)
        _error(body, 404, "NOT_FOUND", "FILE_NOT_FOUND")
    # Paging over files; a file read by a running batch cannot go.
    _, page, _ = await _call(http, "GET", f"{server.http}/v1beta/files?pageSize=1", headers=A)
    assert [f["name"] for f in page["files"]] == [media["name"]] and page["nextPageToken"]
    _, page, _ = await _call(http, "GET", f"{server.http}/v1beta/files?pageSize=1&pageToken={page['nextPageToken']}",
                             headers=A)
    assert [f["name"] for f in page["files"]] == [multi["name"]] and "nextPageToken" not in page
    got, body, _ = await _call(http, "GET", f"{server.http}/v1beta/files?pageToken=nope", headers=A)
    _error(body, 400, "INVALID_ARGUMENT")
    got, body, _ = await _call(http, "DELETE", f"{server.http}/v1beta/{multi['name']}", headers=A)
    assert got == 200 and body == {}
    # A bad multipart body.
    got, body, _ = await _call(http, "POST", f"{server.http}/upload/v1beta/files?uploadType=multipart",
                               headers={**A, "Content-Type": "multipart/related"}, data=b"garbage")
    _error(body, 400, "INVALID_ARGUMENT", "MULTIPART_INVALID")
