"""What every REST handler needs from a request: the caller's tenant, the
API version it used, where it reached us, its JSON body and query values."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web
from google.rpc import code_pb2

from ..errors import InvalidArgument
from .codec import dumps, parse_json
from .errors import HttpError

MAX_BODY: Final = web.AppKey("max_body", int)
"""Bytes a JSON request body may have."""
_TENANT: Final = web.RequestKey("tenant", str)
_JSON_TYPES = ("application/json", "text/json")


def set_tenant(request: web.Request, tenant: str) -> None:
    """Record the authenticated tenant of ``request`` (the middleware does)."""
    request[_TENANT] = tenant


def tenant(request: web.Request) -> str:
    """The authenticated tenant of ``request``."""
    return request[_TENANT]


def version(request: web.Request) -> str:
    """The API version in the path: ``v1beta`` or ``v1`` (after ``/upload``
    or ``/download`` for those routes)."""
    parts = request.path.split("/", 3)
    return parts[2] if parts[1] in ("upload", "download") else parts[1]


def base_url(request: web.Request) -> str:
    """``scheme://host:port`` as the client reached this server.

    From the request's own Host header: answers go back to the client that
    sent it, so a client can only point itself elsewhere.
    """
    return f"{request.scheme}://{request.host}"


async def json_body(request: web.Request, what: str) -> dict[str, Any]:
    """The body as a JSON object: JSON content type (or none), within the
    size limit, an object."""
    content_type = request.headers.get("Content-Type", "")
    if request.body_exists and content_type and content_type.split(";")[0].strip().lower() not in _JSON_TYPES:
        raise HttpError(415, 3, f"the {what} must be JSON: send 'Content-Type: application/json', "
                                f"not {content_type[:80]!r}",
                        reason="UNSUPPORTED_CONTENT_TYPE", violations=[("Content-Type", "must be application/json")])
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY]
        raise HttpError(413, 8, f"the {what} is over the limit of {limit} bytes; send large jobs as a file "
                                "(upload it, then create the batch with inputConfig.fileName)",
                        reason="REQUEST_TOO_LARGE", violations=[("body", f"over {limit} bytes")]) from None
    return parse_json(body, what)


def page_size(request: web.Request) -> int:
    """``pageSize`` from the query: a non-negative integer, 0 if absent."""
    return int_param(request, "pageSize", "page_size")


def int_param(request: web.Request, name: str, alias: str | None = None) -> int:
    """An integer query parameter (by its camelCase name or snake_case alias), 0 if absent."""
    raw = request.query.get(name, request.query.get(alias, "") if alias else "")
    if raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"{name} must be an integer, got {raw[:40]!r}",
                              violations=[(name, "must be an integer")]) from None
    if not 0 <= value < 2**31:
        raise InvalidArgument(f"{name} must be between 0 and 2147483647, got {value}",
                              violations=[(name, "out of range")])
    return value


def str_param(request: web.Request, name: str, alias: str | None = None) -> str:
    """A string query parameter by its camelCase name or snake_case alias, '' if absent."""
    return request.query.get(name, request.query.get(alias, "") if alias else "")


def json_response(body: bytes) -> web.Response:
    """A 200 answer with a JSON body (the SDK takes only 200 as success)."""
    return web.Response(body=body, content_type="application/json")


EMPTY = b"{}"
"""The body of a cancel or delete."""


def page(key: str, items: list[Any], token: str) -> web.Response:
    """A list page: ``{key: items}``, and ``nextPageToken`` only when another
    page follows (the SDK would ask for a page after an empty token)."""
    body: dict[str, Any] = {key: items}
    if token:
        body["nextPageToken"] = token
    return json_response(dumps(body))


def split_action(request: web.Request, method: str, collection: str,
                 allowed: tuple[str, ...] = ("",)) -> tuple[str, str]:
    """``{id}:{action}`` of the path's last segment, the action one of
    ``allowed`` ('' for none), else 404 naming what was asked."""
    name, _, action = request.match_info["tail"].partition(":")
    if action not in allowed:
        raise HttpError(404, code_pb2.NOT_FOUND, f"no method {method} {collection}/{name[:80]}:{action[:60]}",
                        reason="METHOD_NOT_FOUND")
    return name, action


def byte_count_header(request: web.Request, name: str, reason: str) -> int | None:
    """A header holding a byte count or offset, None when absent."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise InvalidArgument(f"{name} must be a number of bytes, got {raw[:40]!r}", reason=reason,
                              violations=[(name, "must be a number of bytes")])
    return value
