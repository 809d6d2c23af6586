"""longbatch.v1.ModelService: the configured models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from longbatch.v1 import model_pb2, model_pb2_grpc

from ..backends import supported_kinds
from ..config import ModelConfig
from ..domain import BatchKind
from ..errors import NotFound
from ..paging import PageTokens, read_page_request
from ..validate import Violations, validate_model_name

Context = grpc.aio.ServicerContext[Any, Any]
_METHODS = {BatchKind.GENERATE: "batchGenerateContent", BatchKind.EMBED: "asyncBatchEmbedContent"}


# Backends that talk to a model server over HTTP, whose base URL is shown.
_HTTP_BACKENDS = frozenset({"gemini-http", "openai"})


def model_message(m: ModelConfig) -> model_pb2.Model:
    """The Model resource for a configured model.

    ``base_url`` is the HTTP backends' option as validated at start (which
    refuses credentials in it); the API key is never shown.
    """
    base_url = m.options.get("base_url") if m.backend in _HTTP_BACKENDS else None
    kinds = supported_kinds(m.backend)
    methods = [name for kind, name in _METHODS.items() if kind in kinds]
    return model_pb2.Model(name=m.name, display_name=m.display_name or m.name.removeprefix("models/"),
                           backend=m.backend, supported_methods=methods, max_concurrency=m.max_concurrency,
                           base_url=base_url.strip().rstrip("/") if isinstance(base_url, str) else "")


class ModelService(model_pb2_grpc.ModelServiceServicer):
    """Lists and gets models, in name order."""

    def __init__(self, models: Sequence[ModelConfig], page_tokens: PageTokens) -> None:
        self._models = sorted(models, key=lambda m: m.name)
        self._tokens = page_tokens

    async def ListModels(
        self, request: model_pb2.ListModelsRequest, context: Context
    ) -> model_pb2.ListModelsResponse:
        """A page of models."""
        return await self.list_models(request.page_size, request.page_token)

    async def GetModel(
        self, request: model_pb2.GetModelRequest, context: Context
    ) -> model_pb2.Model:
        """One model by name."""
        return self.get_model(request.name)

    async def list_models(self, page_size: int, page_token: str) -> model_pb2.ListModelsResponse:
        """A page of models in name order (both surfaces' rule)."""
        size, after = read_page_request(self._tokens, page_size, page_token, "models", str)
        start = 0
        if after is not None:
            start = next((i for i, m in enumerate(self._models) if m.name > str(after)), len(self._models))
        page = self._models[start:start + size]
        more = start + size < len(self._models)
        token = self._tokens.encode("models", (page[-1].name,)) if more and page else ""
        return model_pb2.ListModelsResponse(models=[model_message(m) for m in page], next_page_token=token)

    def get_model(self, name: str) -> model_pb2.Model:
        """One model by name, or NotFound (both surfaces' rule)."""
        v = Violations()
        validate_model_name(name, v, "name")
        v.raise_if_any("name")
        for m in self._models:
            if m.name == name:
                return model_message(m)
        raise NotFound(f"{name} not found", reason="MODEL_NOT_FOUND")
