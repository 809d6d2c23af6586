"""Models over HTTP: ``GET /{v}/models`` and ``GET /{v}/models/{model}``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..services.models import ModelService
from . import codec
from .common import json_response, page, page_size, split_action, str_param

if TYPE_CHECKING:
    from .app import EdgeRouter


class ModelRoutes:
    """The model routes' handlers, over the gRPC ModelService's rules (paging, lookup)."""

    def __init__(self, models: ModelService) -> None:
        self._models = models

    def add_to(self, router: EdgeRouter, version: str) -> None:
        """Register under ``/{version}``."""
        router.add_get(f"/{version}/models", self.list, name=f"{version}.models.list")
        router.add_get(f"/{version}/models/{{tail}}", self.get, name=f"{version}.models.get")

    async def list(self, request: web.Request) -> web.Response:
        """A page of models, in name order."""
        models = await self._models.list_models(page_size(request), str_param(request, "pageToken", "page_token"))
        return page("models", [codec.model_dict(m) for m in models.models], models.next_page_token)

    async def get(self, request: web.Request) -> web.Response:
        """One model."""
        name, _ = split_action(request, "GET", "models")
        return json_response(codec.dumps(codec.model_dict(self._models.get_model(f"models/{name}"))))
