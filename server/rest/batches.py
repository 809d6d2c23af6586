"""Batches over HTTP: create, get, list, cancel, delete and update, in the
Gemini REST shape. Each handler parses, calls the use cases shared with
gRPC (``BatchRequests``, ``BatchManager``, ``OperationViews``) and renders."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from aiohttp import web

from longbatch.v1 import batch_pb2

from .. import convert
from ..batch_requests import BatchRequests
from ..errors import InvalidArgument
from ..validate import parse_name
from ..views import OperationViews
from . import codec
from .common import EMPTY, json_body, json_response, page, page_size, split_action, str_param, tenant

if TYPE_CHECKING:
    from .app import EdgeRouter

_CREATE = {
    "batchGenerateContent": (batch_pb2.BatchGenerateContentRequest, "generate"),
    "asyncBatchEmbedContent": (batch_pb2.AsyncBatchEmbedContentRequest, "embed"),
}
_UPDATE = {
    "updateGenerateContentBatch": (batch_pb2.GenerateContentBatch, "generate"),
    "updateEmbedContentBatch": (batch_pb2.EmbedContentBatch, "embed"),
}
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


class BatchRoutes:
    """The batch routes' handlers."""

    def __init__(self, requests: BatchRequests, views: OperationViews) -> None:
        self._requests = requests
        self._manager = requests.manager
        self._views = views

    def add_to(self, router: EdgeRouter, version: str) -> None:
        """Register under ``/{version}``."""
        v = f"/{version}"
        router.add_get(v + "/batches/{tail}", self.get, name=f"{version}.batches.get")
        router.add_post(v + "/batches/{tail}", self.post_action, name=f"{version}.batches.action")
        router.add_delete(v + "/batches/{tail}", self.delete, name=f"{version}.batches.delete")
        router.add_patch(v + "/batches/{tail}", self.update, name=f"{version}.batches.update")
        router.add_get(v + "/batches", self.list, name=f"{version}.batches.list")
        router.add_post(v + "/models/{tail}", self.create, name=f"{version}.batches.create")

    async def create(self, request: web.Request) -> web.Response:
        """``POST /{v}/models/{model}:batchGenerateContent`` (or ``:asyncBatchEmbedContent``)."""
        model, action = split_action(request, "POST", "models", tuple(_CREATE))
        message_type, _ = _CREATE[action]
        parsed = codec.create_request(await json_body(request, "request body"), message_type(), action)
        if parsed.HasField("batch"):
            # The model is the URL's; a body naming another is a mistake worth saying.
            if parsed.batch.model and parsed.batch.model != f"models/{model}":
                raise InvalidArgument(f"batch.model is {parsed.batch.model[:80]!r} but the URL names models/{model}",
                                      violations=[("batch.model", "differs from the model in the URL")])
            parsed.batch.model = f"models/{model}"
        view = await self._requests.create(tenant(request), parsed.batch if parsed.HasField("batch") else None,
                                           parsed.request_id)
        return json_response(self._views.of(view).rendered("rest", codec.operation_json))

    async def get(self, request: web.Request) -> web.Response:
        """``GET /{v}/batches/{id}``: the batch as an Operation."""
        batch_id, _ = split_action(request, "GET", "batches")
        view = await self._views.get(tenant(request), parse_name(f"batches/{batch_id}", "batches"))
        return json_response(view.rendered("rest", codec.operation_json))

    async def list(self, request: web.Request) -> web.Response:
        """``GET /{v}/batches?pageSize=&pageToken=&filter=``: newest first."""
        batches, token = await self._manager.list(
            tenant(request), "batches", str_param(request, "filter"), page_size(request),
            str_param(request, "pageToken", "page_token"),
        )
        return page("operations", [codec.operation_dict(self._views.listed(b)) for b in batches], token)

    async def post_action(self, request: web.Request) -> web.Response:
        """``POST /{v}/batches/{id}:cancel``."""
        batch_id, _ = split_action(request, "POST", "batches", ("cancel",))
        await self._manager.cancel(tenant(request), parse_name(f"batches/{batch_id}", "batches"))
        return json_response(EMPTY)

    async def delete(self, request: web.Request) -> web.Response:
        """``DELETE /{v}/batches/{id}``: a done batch with its results."""
        batch_id, _ = split_action(request, "DELETE", "batches")
        await self._manager.delete(tenant(request), parse_name(f"batches/{batch_id}", "batches"))
        return json_response(EMPTY)

    async def update(self, request: web.Request) -> web.Response:
        """``PATCH /{v}/batches/{id}:updateGenerateContentBatch?updateMask=displayName,priority``."""
        batch_id, action = split_action(request, "PATCH", "batches", tuple(_UPDATE))
        message_type, kind = _UPDATE[action]
        body = await json_body(request, "batch")
        batch = codec.to_message(body, message_type(), "batch")
        name = f"batches/{batch_id}"
        if batch.name and batch.name != name:
            raise InvalidArgument(f"the body's name {batch.name[:80]!r} differs from the URL's {name}",
                                  violations=[("name", "differs from the URL")])
        batch.name = name
        paths = [_CAMEL.sub(lambda m: "_" + m.group(1).lower(), p.strip())
                 for p in str_param(request, "updateMask", "update_mask").split(",") if p.strip()]
        view = await self._requests.update(tenant(request), batch, paths, kind)
        return json_response(codec.batch_json(convert.batch_message(view.batch, view.output, view.waiting_reason)))
