"""Synchronous validation of create and update requests.

Every problem becomes a ``google.rpc.BadRequest`` field violation whose path
points at the field (``batch.input_config.requests.requests[17].request``);
up to ``MAX_VIOLATIONS`` are reported at once so a client can fix them all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from longbatch.v1 import batch_pb2, content_pb2

from .config import Limits
from .domain import BatchKind, NewItem
from .errors import InvalidArgument
from .netguard import AllowList, host_problem, malformed_host

MAX_VIOLATIONS = 100
MAX_DISPLAY_NAME = 512
MAX_REQUEST_ID = 128
MAX_WEBHOOKS = 10
MAX_USER_METADATA_BYTES = 16 << 10
"""Serialized bytes of ``webhook_config.user_metadata``: it is copied into
the stored body of every delivery, up to ``MAX_WEBHOOKS`` times."""
_ID = re.compile(r"[a-z0-9]{1,64}")
_MODEL = re.compile(r"models/[a-z0-9][a-z0-9._-]{0,62}")


def _show(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def parse_name(name: str, collection: str, field: str = "name") -> str:
    """The id in ``{collection}/{id}``, or InvalidArgument naming ``field``."""
    prefix = collection + "/"
    if name.startswith(prefix) and _ID.fullmatch(name[len(prefix):]):
        return name[len(prefix):]
    problem = "is required" if not name else f"must look like '{collection}/ID', got {_show(name)}"
    raise InvalidArgument(f"{field} {problem}", reason="INVALID_NAME", violations=[(field, problem)])


class Violations:
    """Collects field violations; raises them together."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.total = 0

    def add(self, field: str, description: str) -> None:
        """Record one problem."""
        self.total += 1
        if len(self.items) < MAX_VIOLATIONS:
            self.items.append((field, description))

    def raise_if_any(self, what: str) -> None:
        """Raise InvalidArgument listing the problems, if there are any."""
        if not self.items:
            return
        first_field, first = self.items[0]
        more = f" (and {self.total - 1} more)" if self.total > 1 else ""
        raise InvalidArgument(f"invalid {what}: {first_field} {first}{more}", violations=self.items)


@dataclass(frozen=True)
class ValidBatch:
    """A create request that passed validation."""

    kind: BatchKind
    model: str
    display_name: str
    priority: int
    file_name: str | None
    items: list[NewItem]
    webhook: bytes | None


def validate_model_name(model: str, v: Violations, field: str = "batch.model") -> None:
    """Check the shape of a model name."""
    if not model:
        v.add(field, "is required")
    elif not _MODEL.fullmatch(model):
        v.add(field, f"must look like 'models/NAME', got {_show(model)}")


def validate_create(
    batch: batch_pb2.GenerateContentBatch | batch_pb2.EmbedContentBatch, request_id: str, limits: Limits,
    webhook_allow: AllowList | None = None,
) -> ValidBatch:
    """Validate a create request; raise InvalidArgument with every violation.

    ``webhook_allow`` is the server's ``[webhooks] allow``: with it, a webhook
    URI whose host is a refused literal address or a ``localhost`` name is a
    violation here. Without it that check is left to delivery time, where the
    webhook dispatcher refuses the same URIs (see ``netguard``).
    """
    v = Violations()
    kind = BatchKind.GENERATE if isinstance(batch, batch_pb2.GenerateContentBatch) else BatchKind.EMBED
    validate_model_name(batch.model, v)
    if len(batch.display_name) > MAX_DISPLAY_NAME:
        v.add("batch.display_name", f"is {len(batch.display_name)} characters; the limit is {MAX_DISPLAY_NAME}")
    if len(request_id) > MAX_REQUEST_ID:
        v.add("request_id", f"is {len(request_id)} characters; the limit is {MAX_REQUEST_ID}")
    _validate_webhooks(batch.webhook_config, v, webhook_allow)
    webhook = batch.webhook_config.SerializeToString() if batch.HasField("webhook_config") else None

    items: list[NewItem] = []
    file_name: str | None = None
    source = batch.input_config.WhichOneof("source")
    if source is None:
        v.add("batch.input_config", "must set requests or file_name")
    elif source == "file_name":
        file_name = batch.input_config.file_name
        if not file_name.startswith("files/") or not _ID.fullmatch(file_name[6:]):
            v.add("batch.input_config.file_name", f"must look like 'files/ID', got {_show(file_name)}")
    else:
        items = _validate_inlined(batch.input_config.requests.requests, kind, batch.model, limits, v)
    v.raise_if_any("batch")
    return ValidBatch(kind, batch.model, batch.display_name, batch.priority, file_name, items, webhook)


def _validate_webhooks(config: batch_pb2.WebhookConfig, v: Violations, allow: AllowList | None) -> None:
    if len(config.uris) > MAX_WEBHOOKS:
        v.add("batch.webhook_config.uris", f"has {len(config.uris)} entries; the limit is {MAX_WEBHOOKS}")
    for i, uri in enumerate(config.uris[:MAX_WEBHOOKS]):
        field = f"batch.webhook_config.uris[{i}]"
        try:
            parts = urlsplit(uri) if len(uri) <= 2048 else None
            host = parts.hostname if parts is not None else None
            if parts is not None:
                parts.port  # noqa: B018 -- raises ValueError on a port out of range or not a number
        except ValueError:  # a bad [IPv6] literal or port
            parts = host = None
        if parts is None or parts.scheme not in ("http", "https") or not host or malformed_host(host):
            v.add(field, f"must be an http(s) URL with a host name or an IP address, got {_show(uri)}")
            continue
        problem = host_problem(host, allow) if allow is not None else None
        if problem is not None:
            v.add(field, f"{problem}: webhooks may not reach loopback, private, link-local, multicast or reserved "
                         "addresses unless the server's [webhooks] allow lists them")
    if config.HasField("user_metadata"):
        size = config.user_metadata.ByteSize()
        if size > MAX_USER_METADATA_BYTES:
            v.add("batch.webhook_config.user_metadata",
                  f"is {size} bytes serialized; the limit is {MAX_USER_METADATA_BYTES}")


def _validate_inlined(
    requests: Sequence[batch_pb2.InlinedRequest | batch_pb2.InlinedEmbedContentRequest],
    kind: BatchKind,
    model: str,
    limits: Limits,
    v: Violations,
) -> list[NewItem]:
    base = "batch.input_config.requests.requests"
    if not requests:
        v.add(base, "must not be empty")
        return []
    if len(requests) > limits.max_inlined_requests:
        v.add(base, f"has {len(requests)} requests; the limit is {limits.max_inlined_requests} per create call")
        return []
    items = []
    for i, inlined in enumerate(requests):
        where = f"{base}[{i}].request"
        if not inlined.HasField("request"):
            v.add(where, "must be set")
            continue
        req = inlined.request
        if req.model and req.model != model:
            v.add(f"{where}.model", f"names {_show(req.model)} but the batch runs {_show(model)}")
        if isinstance(req, content_pb2.GenerateContentRequest):
            validate_generate_request(req, where, v)
        else:
            validate_embed_request(req, where, v)
        payload = req.SerializeToString()
        metadata = inlined.metadata.SerializeToString() if inlined.HasField("metadata") else None
        size = len(payload) + len(metadata or b"")
        if size > limits.max_request_bytes:
            v.add(where, f"is {size} bytes with its metadata; the limit is {limits.max_request_bytes}")
        items.append(NewItem(idx=i, key="", metadata=metadata, payload=payload))
    return items


_ROLES = frozenset(("", "user", "model"))


def _content_ok(content: content_pb2.Content) -> bool:
    # The common all-valid case, without building any field path.
    parts = content.parts
    return bool(parts) and content.role in _ROLES and all(p.WhichOneof("data") for p in parts)


def _validate_content(content: content_pb2.Content, where: str, v: Violations) -> None:
    if _content_ok(content):
        return
    if not content.parts:
        v.add(f"{where}.parts", "must not be empty")
    for k, part in enumerate(content.parts):
        if part.WhichOneof("data") is None:
            v.add(f"{where}.parts[{k}]", "must set text or inline_data")
    if content.role not in _ROLES:
        v.add(f"{where}.role", f"must be 'user' or 'model', got {_show(content.role)}")


def validate_generate_request(req: content_pb2.GenerateContentRequest, where: str, v: Violations) -> None:
    """Check one generation request; violations are named under ``where``."""
    contents = req.contents
    if not contents:
        v.add(f"{where}.contents", "must not be empty")
    for j, content in enumerate(contents):
        if not _content_ok(content):
            _validate_content(content, f"{where}.contents[{j}]", v)
    if req.HasField("system_instruction"):
        _validate_content(req.system_instruction, f"{where}.system_instruction", v)
    if req.HasField("generation_config"):
        _validate_generation_config(req.generation_config, f"{where}.generation_config", v)


def _validate_generation_config(cfg: content_pb2.GenerationConfig, at: str, v: Violations) -> None:
    if cfg.HasField("candidate_count") and not 1 <= cfg.candidate_count <= 8:
        v.add(f"{at}.candidate_count", "must be between 1 and 8")
    if cfg.HasField("max_output_tokens") and cfg.max_output_tokens < 1:
        v.add(f"{at}.max_output_tokens", "must be at least 1")
    if cfg.HasField("temperature") and not 0.0 <= cfg.temperature <= 2.0:
        v.add(f"{at}.temperature", "must be between 0 and 2")
    if cfg.HasField("top_p") and not 0.0 <= cfg.top_p <= 1.0:
        v.add(f"{at}.top_p", "must be between 0 and 1")
    if cfg.HasField("top_k") and cfg.top_k < 1:
        v.add(f"{at}.top_k", "must be at least 1")
    if len(cfg.stop_sequences) > 5:
        v.add(f"{at}.stop_sequences", "must have at most 5 entries")


def validate_embed_request(req: content_pb2.EmbedContentRequest, where: str, v: Violations) -> None:
    """Check one embedding request; violations are named under ``where``."""
    if not req.HasField("content") or not req.content.parts:
        v.add(f"{where}.content.parts", "must not be empty")
    else:
        _validate_content(req.content, f"{where}.content", v)
    if req.HasField("output_dimensionality") and not 1 <= req.output_dimensionality <= 4096:
        v.add(f"{where}.output_dimensionality", "must be between 1 and 4096")
