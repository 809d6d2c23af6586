"""Model backends, chosen per model from the server config."""

from __future__ import annotations

from ..config import ConfigError, ModelConfig
from ..domain import BatchKind
from .base import Backend, BackendError
from .echo import EchoBackend
from .gemini_http import GeminiHttpBackend
from .openai import OpenAIBackend

__all__ = ["Backend", "BackendError", "EchoBackend", "GeminiHttpBackend", "OpenAIBackend", "create_backend",
           "supported_kinds"]

_EMBED_ONLY = frozenset({"sentence-transformers"})


def supported_kinds(backend: str) -> frozenset[BatchKind]:
    """The batch kinds a backend can run: a batch of another kind is refused at create."""
    return frozenset({BatchKind.EMBED}) if backend in _EMBED_ONLY else frozenset(BatchKind)


def create_backend(model: ModelConfig) -> Backend:
    """Build the backend a model's config names.

    Raises:
        ConfigError: the backend is unknown or its options are bad.
    """
    if model.backend == "echo":
        return EchoBackend(latency_s=model.latency_s)
    if model.backend == "gemini-http":
        return GeminiHttpBackend.from_config(model)
    if model.backend == "sentence-transformers":
        # Imported here: only a model that uses it needs the optional extra.
        from .sentence_transformers import SentenceTransformersBackend
        return SentenceTransformersBackend.from_config(model)
    if model.backend == "openai":
        return OpenAIBackend.from_config(model)
    raise ConfigError(f"{model.name}: unknown backend {model.backend!r} "
                      "(built in: echo, gemini-http, openai, sentence-transformers)")
