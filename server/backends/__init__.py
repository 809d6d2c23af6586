"""Model backends, chosen per model from the server config."""

from __future__ import annotations

from ..config import ConfigError, ModelConfig
from .base import Backend, BackendError
from .echo import EchoBackend

__all__ = ["Backend", "BackendError", "EchoBackend", "create_backend"]


def create_backend(model: ModelConfig) -> Backend:
    """Build the backend a model's config names."""
    if model.backend == "echo":
        return EchoBackend(latency_s=model.latency_s)
    raise ConfigError(f"{model.name}: unknown backend {model.backend!r} (built in: echo)")
