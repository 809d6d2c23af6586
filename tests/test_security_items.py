"""Smaller leaks: secrets in a config's repr, another tenant's file in use,
request bodies parsed before the key is checked, the CLI's key file."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from conftest import MakeServer

from longbatch.client import Client, FailedPrecondition, NotFound
from longbatch.server.config import ApiKey, ServerConfig, config_from_dict
from longbatch.server.domain import BatchKind, NewBatch
from longbatch.server.edge import Authenticator, EdgeRegistrar

from support import cli


def test_model_secrets_stay_out_of_the_config_repr() -> None:
    config = config_from_dict({
        "models": [{"name": "models/remote", "backend": "openai", "base_url": "http://127.0.0.1:1/v1",
                    "api_key": "sk-upstream-secret", "headers": {"X-Token": "hdr-secret"},
                    "remote_model": "m"}],
        "api_keys": [{"key": "client-secret", "tenant": "t"}],
        "webhooks": {"secret": "hook-secret"},
    })
    text = repr(config) + str(config)
    for secret in ("sk-upstream-secret", "hdr-secret", "client-secret", "hook-secret"):
        assert secret not in text
    # What is not secret is still there to read.
    assert "http://127.0.0.1:1/v1" in text and "'remote_model': 'm'" in text and "X-Token" in text
    assert config.models[0].options["api_key"] == "sk-upstream-secret"  # the backend still gets it


async def test_another_tenants_file_in_use_is_not_found(make_server: MakeServer, tmp_path: Path) -> None:
    server = await make_server(ServerConfig(api_keys=(ApiKey("k-a", "a"), ApiKey("k-b", "b"))))
    source = tmp_path / "in.jsonl"
    source.write_text('{"request": {}}\n')
    async with Client(server.target, api_key="k-a") as a, Client(server.target, api_key="k-b") as b:
        uploaded = await a.upload_file(source)
        file_id = uploaded.name.removeprefix("files/")
        # A batch row of a's that reads the file, stored directly: the
        # executor never sees it, so it stays unfinished.
        await server.running.store.create_batch(
            NewBatch(id="inuse1", tenant="a", kind=BatchKind.GENERATE, model="models/echo", display_name="",
                     priority=0, input_file=file_id, webhook=None, request_id=None),
            [], 0,
        )
        with pytest.raises(NotFound):  # not FILE_IN_USE: that would tell b the file exists
            await b.delete_file(uploaded.name)
        with pytest.raises(FailedPrecondition) as in_use:
            await a.delete_file(uploaded.name)
        assert in_use.value.reason == "FILE_IN_USE"
        assert (await a.get_file(uploaded.name)).name == uploaded.name


async def test_the_key_is_checked_before_the_request_is_parsed() -> None:
    parsed: list[bytes] = []

    def parse(data: bytes) -> bytes:
        parsed.append(data)
        if data == b"bad":
            raise ValueError("not a message")
        return data

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    server = grpc.aio.server()
    EdgeRegistrar(server, Authenticator([ApiKey("k", "t")])).add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler("t.Echo", {
            "Echo": grpc.unary_unary_rpc_method_handler(echo, request_deserializer=parse)}),
    ])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.Echo/Echo")
            for metadata in ((), (("x-goog-api-key", "wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(b"body", metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert parsed == []  # refused without reading the body
            assert await call(b"body", metadata=(("x-goog-api-key", "k"),), timeout=10) == b"body"
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await call(b"bad", metadata=(("x-goog-api-key", "k"),), timeout=10)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert parsed == [b"body", b"bad"]
    finally:
        await server.stop(None)


async def test_the_cli_reads_the_key_from_a_file(make_server: MakeServer, tmp_path: Path) -> None:
    server = await make_server(ServerConfig(api_keys=(ApiKey("file-key", "t"),)))
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    code, out, err = await cli("--target", server.target, "--api-key-file", str(key_file), "models")
    assert code == 0 and "models/echo" in out, err
    code, out, err = await cli("--target", server.target, "models", env={"LONGBATCH_API_KEY_FILE": str(key_file)})
    assert code == 0, err
    code, _, err = await cli("--target", server.target, "--api-key", "x", "--api-key-file", str(key_file), "models")
    assert code == 2 and "not both" in err, err
    code, _, err = await cli("--target", server.target, "--api-key-file", str(tmp_path / "none"), "models")
    assert code == 1 and "cannot read the API key file" in err, err
    (tmp_path / "empty").write_text("\n")
    code, _, err = await cli("--target", server.target, "--api-key-file", str(tmp_path / "empty"), "models")
    assert code == 1 and "is empty" in err, err
    code, _, err = await cli("--target", server.target, "models")
    assert code == 1 and "UNAUTHENTICATED" in err and "--api-key-file" in err, err
