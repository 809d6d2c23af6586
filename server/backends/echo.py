"""The built-in ``echo`` backend: a deterministic test model.

Generation echoes the prompt (the text of the last turn) back as the model's
answer; embeddings are a stable unit vector derived from a SHA-256 of the
text, of the requested dimension. Useful for tests, demos and benchmarks; it
is not a language model.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct

from google.rpc import code_pb2

from longbatch.v1 import content_pb2

from .base import BackendError

DEFAULT_DIMENSION = 768
MAX_DIMENSION = 4096
_FINISH = content_pb2.FinishReason


class EchoBackend:
    """Echoes prompts; hashes text into embeddings."""

    def __init__(self, latency_s: float = 0.0, model_version: str = "echo-1") -> None:
        self._latency_s = latency_s
        self._version = model_version

    async def generate(self, request: content_pb2.GenerateContentRequest) -> content_pb2.GenerateContentResponse:
        """Answer with the last turn's text, cut to max_output_tokens words."""
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        if not request.contents:
            raise BackendError(code_pb2.INVALID_ARGUMENT, "request has no contents")
        prompt = " ".join(p.text for p in request.contents[-1].parts if p.HasField("text"))
        prompt_tokens = sum(len(p.text.split()) for c in request.contents for p in c.parts if p.HasField("text"))
        words = prompt.split()
        finish = _FINISH.FINISH_REASON_STOP
        cfg = request.generation_config
        if cfg.HasField("max_output_tokens") and len(words) > cfg.max_output_tokens:
            words = words[: max(cfg.max_output_tokens, 0)]
            prompt = " ".join(words)
            finish = _FINISH.FINISH_REASON_MAX_TOKENS
        n = cfg.candidate_count if cfg.HasField("candidate_count") and cfg.candidate_count > 0 else 1
        response = content_pb2.GenerateContentResponse(model_version=self._version)
        for i in range(n):
            cand = response.candidates.add(index=i, finish_reason=finish)
            cand.content.role = "model"
            cand.content.parts.add(text=prompt)
        out_tokens = len(words) * n
        response.usage_metadata.prompt_token_count = prompt_tokens
        response.usage_metadata.candidates_token_count = out_tokens
        response.usage_metadata.total_token_count = prompt_tokens + out_tokens
        return response

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
