"""Models over HTTP: ``GET /{v}/models`` and ``GET /{v}/models/{model}``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from google.rpc import code_pb2

from longbatch.v1 import model_pb2

from ..services.models import ModelService
from . import codec
from .common import page_size, str_param
from .errors import HttpError

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
        page = await self._models.list_models(page_size(request), str_param(request, "pageToken", "page_token"))
        body: dict[str, object] = {"models": [codec.model_dict(m) for m in page.models]}
        if page.next_page_token:
            body["nextPageToken"] = page.next_page_token
        return web.Response(body=codec.dumps(body), content_type="application/json")

    async def get(self, request: web.Request) -> web.Response:
        """One model."""
        name, _, action = request.match_info["tail"].partition(":")
        if action:
            raise HttpError(404, code_pb2.NOT_FOUND, f"no method GET models/{name}:{action[:60]}",
                            reason="METHOD_NOT_FOUND")
        model: model_pb2.Model = self._models.get_model(f"models/{name}")
        return web.Response(body=codec.dumps(codec.model_dict(model)), content_type="application/json")
