"""The built-in ``echo`` backend: a deterministic test model.

Generation echoes the prompt (the text of the last turn) back as the model's
answer; embeddings are a stable unit vector derived from a SHA-256 of the
text, of the requested dimension. Useful for tests, demos and benchmarks; it
is not a language model.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import struct
from collections.abc import Callable

from google.rpc import code_pb2

from longbatch.v1 import content_pb2

from ..wire import length_delimited, read_varint, tagged, varint, varint_field
from .base import BackendError

DEFAULT_DIMENSION = 768
MAX_DIMENSION = 4096
_FINISH = content_pb2.FinishReason


class EchoBackend:
    """Echoes prompts; hashes text into embeddings."""

    def __init__(self, latency_s: float = 0.0, model_version: str = "echo-1") -> None:
        self._latency_s = latency_s
        self._version = model_version
        self._version_field = length_delimited(4, model_version.encode()) if model_version else b""

    async def generate(self, request: content_pb2.GenerateContentRequest) -> content_pb2.GenerateContentResponse:
        """Answer with the last turn's text, cut to max_output_tokens words."""
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        return self._answer(request)

    def _answer(self, request: content_pb2.GenerateContentRequest) -> content_pb2.GenerateContentResponse:
        if not request.contents:
            raise BackendError(code_pb2.INVALID_ARGUMENT, "request has no contents")
        prompt = " ".join([p.text for p in request.contents[-1].parts if p.HasField("text")])
        words = prompt.split()
        prompt_tokens = len(words) if len(request.contents) == 1 else sum(
            len(p.text.split()) for c in request.contents for p in c.parts if p.HasField("text"))
        finish = _FINISH.FINISH_REASON_STOP
        n = 1
        if request.HasField("generation_config"):
            cfg = request.generation_config
            if cfg.HasField("max_output_tokens") and len(words) > cfg.max_output_tokens:
                words = words[: max(cfg.max_output_tokens, 0)]
                prompt = " ".join(words)
                finish = _FINISH.FINISH_REASON_MAX_TOKENS
            if cfg.HasField("candidate_count") and cfg.candidate_count > 0:
                n = cfg.candidate_count
        out_tokens = len(words) * n
        # One nested constructor call: building field by field costs twice as much.
        return content_pb2.GenerateContentResponse(
            candidates=[
                content_pb2.Candidate(
                    content=content_pb2.Content(role="model", parts=[content_pb2.Part(text=prompt)]),
                    finish_reason=finish, index=i,
                )
                for i in range(n)
            ],
            usage_metadata=content_pb2.UsageMetadata(
                prompt_token_count=prompt_tokens, candidates_token_count=out_tokens,
                total_token_count=prompt_tokens + out_tokens,
            ),
            model_version=self._version,
        )

    def _answer_raw(self, payload: bytes) -> bytes:
        """``_answer`` on serialized messages, built on the wire directly.

        Equal byte for byte to ``_answer(...).SerializeToString()``; requests
        with a generation config or several turns take the message path. Echo
        stands in for a model in benchmarks, so its own cost (~2.7 µs here
        against ~20 µs through messages) should not hide the service's.
        """
        prompt = _plain_prompt(payload)
        if prompt is None:
            request = _parse_request(payload)
            if request.HasField("generation_config") or len(request.contents) != 1:
                return self._answer(request).SerializeToString()
            parts = request.contents[0].parts
            prompt = " ".join([p.text for p in parts if p.HasField("text")]).encode()
        # str.split() also splits at Unicode spaces and at \x1c-\x1f, which bytes.split() does not.
        tokens = len(prompt.translate(_SEPARATORS_TO_SPACE).split()) if prompt.isascii() else len(
            prompt.decode().split())
        n = len(prompt)
        head = _HEADS[n] if n < _TABLE else _candidate_head(n)
        return (head + prompt + _ROLE_AND_FINISH + (_USAGES[tokens] if tokens < _TABLE else _usage(tokens))
                + self._version_field)

    async def generate_raw(self, payload: bytes) -> bytes:
        """``generate`` on serialized messages (see ``_answer_raw``)."""
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        return self._answer_raw(payload)

    @property
    def bulk(self) -> bool:
        """Bulk answers only without simulated latency (which is per request)."""
        return not self._latency_s

    async def generate_raw_many(self, payloads: list[bytes]) -> list[bytes]:
        """``generate_raw`` for each payload, in order, on the loop: for
        batches too small for the worker processes (see
        ``portable_generate``). Sending only the answering there, while the
        server read and committed, cost more than the ~2 µs it saved."""
        answer = self._answer_raw
        return [answer(p) for p in payloads]

    def portable_generate(self) -> Callable[[list[bytes]], list[bytes]] | None:
        """``generate_raw_many`` as a picklable function for worker processes
        (see PortableGenerate); None with simulated latency."""
        return None if self._latency_s else functools.partial(answer_many, self._version)

    async def embed(self, request: content_pb2.EmbedContentRequest) -> content_pb2.EmbedContentResponse:
        """A unit vector that depends only on the text, title and task type."""
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        dim = request.output_dimensionality if request.HasField("output_dimensionality") else DEFAULT_DIMENSION
        if not 1 <= dim <= MAX_DIMENSION:
            raise BackendError(code_pb2.INVALID_ARGUMENT, f"output_dimensionality must be 1..{MAX_DIMENSION}")
        text = "\n".join(p.text for p in request.content.parts if p.HasField("text"))
        seed = hashlib.sha256(f"{request.task_type}\x00{request.title}\x00{text}".encode()).digest()
        values = hash_vector(seed, dim)
        response = content_pb2.EmbedContentResponse()
        response.embedding.values.extend(values)
        return response

    async def aclose(self) -> None:
        """Nothing to release."""


@functools.cache
def _echo(model_version: str) -> EchoBackend:
    return EchoBackend(model_version=model_version)


def answer_many(model_version: str, payloads: list[bytes]) -> list[bytes]:
    """Echo's answers to serialized requests, in order; raises BackendError
    on a request it cannot answer. Runs in worker processes."""
    answer = _echo(model_version)._answer_raw
    return [answer(p) for p in payloads]


_parse_request = content_pb2.GenerateContentRequest.FromString
_MODEL_ROLE = length_delimited(2, b"model")
_FINISH_STOP = varint_field(2, _FINISH.FINISH_REASON_STOP)
_EMPTY_USAGE = length_delimited(2, b"")
_SEPARATORS_TO_SPACE = bytes.maketrans(b"\x1c\x1d\x1e\x1f", b"    ")
_ROLE_AND_FINISH = _MODEL_ROLE + _FINISH_STOP


def _candidate_head(n: int) -> bytes:
    """What precedes an n-byte prompt in the response's candidates field,
    ``Candidate{content{parts[{text: prompt}], role: "model"}, finish_reason:
    STOP}``: the field tags and lengths, which depend on n alone."""
    text = 1 + len(varint(n)) + n
    content = 1 + len(varint(text)) + text + len(_MODEL_ROLE)
    candidate = 1 + len(varint(content)) + content + len(_FINISH_STOP)
    return b"\x0a" + varint(candidate) + b"\x0a" + varint(content) + b"\x0a" + varint(text) + b"\x12" + varint(n)


def _usage(tokens: int) -> bytes:
    """The usage_metadata field for a prompt and answer of ``tokens`` each."""
    if not tokens:
        return _EMPTY_USAGE
    return tagged(b"\x12", b"\x08" + varint(tokens) + b"\x10" + varint(tokens) + b"\x18" + varint(2 * tokens))


# Prompts and token counts below this cover nearly every request; tables
# spare building the same few bytes per answer.
_TABLE = 4096
_HEADS = [_candidate_head(n) for n in range(_TABLE)]
_USAGES = [_usage(t) for t in range(_TABLE)]


def _plain_prompt(payload: bytes) -> bytes | None:
    """The prompt of a request that is one turn of text parts, read off the
    wire (upb's parse and field access cost more than the rest of the
    answer); None for any other request, or when unsure.

    The turn may carry a role; each part must be exactly one text field,
    valid UTF-8. Texts are joined with spaces, as ``_answer`` does.
    """
    end = len(payload)
    if end < 2 or payload[0] != 0x12:
        return None
    n, pos = read_varint(payload, 1)
    if pos + n != end:
        return None  # not exactly one field holding one Content
    texts = []
    while pos < end:
        tag = payload[pos]
        n, start = read_varint(payload, pos + 1)
        pos = start + n
        if pos > end:
            return None
        if tag == 0x0A:  # Content.parts: one Part holding only its text
            if n == 0 or payload[start] != 0x12:
                return None
            m, text_at = read_varint(payload, start + 1)
            if text_at + m != pos:
                return None
            text = payload[text_at:pos]
            texts.append(text)
        elif tag == 0x12:  # Content.role
            text = payload[start:pos]
        else:
            return None
        if not text.isascii():
            try:
                text.decode()  # upb refuses a string that is not UTF-8
            except UnicodeDecodeError:
                return None
    return texts[0] if len(texts) == 1 else b" ".join(texts)


def hash_vector(seed: bytes, dim: int) -> list[float]:
    """A deterministic unit vector of ``dim`` components from ``seed``."""
    raw = bytearray()
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    ints = struct.unpack(f">{dim}I", bytes(raw[: dim * 4]))
    values = [i / 2147483647.5 - 1.0 for i in ints]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
