"""The ``openai`` backend: any OpenAI-compatible server (vLLM, SGLang, llama.cpp,
llama-cpp-python, Ollama's ``/v1``, LM Studio, TGI, Infinity, LiteLLM, OpenAI).

Generation is ``POST {base_url}/chat/completions``, one call per request (or
``n`` single calls, see below); embedding is ``POST {base_url}/embeddings``
with the inputs of many requests in one call (:class:`~.batching.MicroBatcher`,
up to ``embed_batch_size``). Transport and statuses follow :mod:`.httpcommon`.

The mapping, both ways (docs/backends.md has the same table for users)::

    GenerateContentRequest              chat/completions body
    ----------------------------------  -----------------------------------------------
    contents[i].role "user" or ""       messages[i].role "user"
    contents[i].role "model"            messages[i].role "assistant"
    contents[i].role anything else      item error INVALID_ARGUMENT
    contents[i].parts[].text            messages[i].content, the texts joined with ""
    a part that is not text             item error INVALID_ARGUMENT
    system_instruction (texts joined)   messages[0] {"role": "system"}; with
                                        system_role = false: prefixed to the first
                                        user turn, "{system}\\n\\n{turn}"
    temperature, top_p                  temperature, top_p
    top_k                               top_k (supports_top_k = true, the default),
                                        else item error INVALID_ARGUMENT
    max_output_tokens                   {max_tokens_field} ("max_tokens"), always sent:
                                        default_max_tokens (1024) when unset
    stop_sequences                      stop (a list)
    candidate_count > 1                 n (supports_n = true, the default); where
                                        the answer has fewer choices, the missing
                                        ones come from single calls (seed + i when a
                                        seed is set), and from then on every such
                                        request fans out at once
    seed                                seed
    response_mime_type "application/json" response_format {"type": "json_object"}
    response_mime_type "" / "text/plain"  nothing
    response_mime_type anything else    item error INVALID_ARGUMENT
    model                               nothing: the body's model is remote_model
    any other field set                 item error INVALID_ARGUMENT

    chat/completions answer             GenerateContentResponse
    ----------------------------------  -----------------------------------------------
    choices[i].message.content          candidates[i].content {role "model", parts [{text}]}
    choices[i].index                    candidates[i].index
    finish_reason stop, eos_token,      finish_reason STOP
      stop_sequence, tool_calls,
      function_call
    finish_reason length                MAX_TOKENS
    finish_reason content_filter        SAFETY
    finish_reason null or other         OTHER
    usage.prompt_tokens                 usage_metadata.prompt_token_count
    usage.completion_tokens             usage_metadata.candidates_token_count (summed
                                        over fanned-out calls)
    usage.total_tokens                  usage_metadata.total_token_count
    model                               model_version
    id, reasoning, cached and reasoning nothing: the proto has no field for them
      token counts

    EmbedContentRequest                 embeddings body / answer
    ----------------------------------  -----------------------------------------------
    content.parts[].text                input[j] (texts joined with "\n", as the
                                        sentence-transformers backend does), many
                                        requests per call; non-text part: INVALID_ARGUMENT
    task_type, title                    the prompts[task type] (or prompts.default)
                                        template's {title} and {text}; with no
                                        template the text alone
    output_dimensionality d             dimensions d (supports_dimensions = true); else,
                                        and whenever the server answers more, the
                                        vector is cut to d and scaled back to unit
                                        length here; fewer than d: INVALID_ARGUMENT
    data[k].embedding by data[k].index  embedding.values

Errors: a non-2xx answer is an item error carrying the server's message, read
from any of the error bodies vLLM (both shapes), llama.cpp, Ollama, OpenAI,
TGI and Infinity send; 429 with ``insufficient_quota`` is not retried (the
quota will not come back by itself). A 2xx that is not the expected JSON is
``INTERNAL`` with an excerpt. A many-input embeddings call refused with
400/413/422 is split in halves until the inputs at fault are found alone, so
only they fail.

This module is on the hot path of every request (the CPU per request of a
batch should stay within 1.2x that of a bare HTTP client doing the same
calls): the chat body is built with orjson straight from the message's set
fields (``ListFields``, which also finds fields we do not map), and the answer
is written as protobuf wire bytes straight from the decoded JSON.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from typing import Any

import orjson
from google.rpc import code_pb2

from longbatch.v1 import content_pb2

from ..config import ModelConfig
from ..wire import tagged, varint
from .base import BackendError
from .batching import MicroBatcher
from .httpcommon import HttpClient, OptionReader, error_detail, header_safe
from .prompts import EmbedPrompts

log = logging.getLogger("longbatch.backends.openai")

OPTIONS = (
    "base_url", "api_key", "remote_model", "timeout", "connect_timeout", "supports_top_k", "supports_n",
    "supports_dimensions", "system_role", "max_tokens_field", "default_max_tokens", "embed_batch_size",
    "embed_max_wait", "prompts", "default_title", "extra_body", "headers",
)
"""The keys an openai model's table may hold besides the common ones."""

MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
DEFAULT_MAX_TOKENS = 1024
DEFAULT_EMBED_BATCH = 64
DEFAULT_EMBED_WAIT_S = 0.005
_MAX_FANOUT = 64  # candidates of one request; each is a call when the server ignores n

_F = content_pb2.FinishReason
FINISH_REASONS: dict[Any, int] = {
    "stop": _F.FINISH_REASON_STOP,
    "length": _F.FINISH_REASON_MAX_TOKENS,
    "content_filter": _F.FINISH_REASON_SAFETY,
    "tool_calls": _F.FINISH_REASON_STOP,
    "function_call": _F.FINISH_REASON_STOP,
    "eos_token": _F.FINISH_REASON_STOP,       # TGI
    "stop_sequence": _F.FINISH_REASON_STOP,   # TGI
}
"""OpenAI finish_reason → FinishReason; anything else (null included) is OTHER."""
_OTHER = _F.FINISH_REASON_OTHER

_TASK_PREFIX = "TASK_TYPE_"
_TASK_NUMBERS = {v.name.removeprefix(_TASK_PREFIX): v.number for v in content_pb2.TaskType.DESCRIPTOR.values
                 if v.number != 0}

# Wire tags of GenerateContentResponse and its parts (content.proto).
_T_CANDIDATE = b"\x0a"        # GenerateContentResponse.candidates = 1
_T_USAGE = b"\x12"            # GenerateContentResponse.usage_metadata = 2
_T_VERSION = b"\x22"          # GenerateContentResponse.model_version = 4
_T_CONTENT = b"\x0a"          # Candidate.content = 1
_T_FINISH = b"\x10"           # Candidate.finish_reason = 2
_T_INDEX = b"\x18"            # Candidate.index = 3
_T_PART = b"\x0a"             # Content.parts = 1
_T_TEXT = b"\x12"             # Part.text = 2
_ROLE_MODEL = b"\x12\x05model"  # Content.role = 2, "model"
_FINISH_BYTES = {reason: _T_FINISH + varint(reason) for reason in set(FINISH_REASONS.values()) | {_OTHER}}
_INT32_MAX = (1 << 31) - 1


# Request fields the body does not carry: none today (model is in the body as
# remote_model). A field added to the proto lands here and is refused until
# it is mapped, rather than dropped.
_UNMAPPED_REQUEST_FIELDS = frozenset(
    f.name for f in content_pb2.GenerateContentRequest.DESCRIPTOR.fields
) - {"model", "contents", "system_instruction", "generation_config"}


class _Invalid(Exception):
    """A request field this backend cannot honour (becomes INVALID_ARGUMENT)."""


class OpenAIBackend:
    """Calls an OpenAI-compatible server; see the module docstring."""

    def __init__(self, *, model_name: str, base_url: str, remote_model: str, api_key: str | None = None,
                 timeout_s: float | None = None, connect_timeout_s: float | None = 10.0,
                 max_concurrency: int = 64, supports_top_k: bool = True, supports_n: bool = True,
                 supports_dimensions: bool = False, system_role: bool = True,
                 max_tokens_field: str = "max_tokens", default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 embed_batch_size: int = DEFAULT_EMBED_BATCH, embed_max_wait_s: float = DEFAULT_EMBED_WAIT_S,
                 prompts: EmbedPrompts | None = None,
                 extra_body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> None:
        """Build the backend (options already validated); HTTP opens on the first call.

        Args:
            model_name: the longbatch model, for messages.
            base_url: up to and including ``/v1``, without a trailing slash.
            remote_model: the ``model`` sent in every body.
            api_key: sent as ``Authorization: Bearer``.
            timeout_s: per-call limit in seconds; None for none.
            connect_timeout_s: limit on opening a connection, seconds.
            max_concurrency: connections kept to the server at most.
            supports_top_k: send ``top_k``; else refuse requests that set it.
            supports_n: send ``n``; else fan out into single calls at once.
            supports_dimensions: send ``dimensions``; else cut vectors here.
            system_role: send the system instruction as a system message;
                else prefix it to the first user turn.
            max_tokens_field: ``max_tokens`` or ``max_completion_tokens``.
            default_max_tokens: sent when a request sets no limit.
            embed_batch_size: inputs per embeddings call at most.
            embed_max_wait_s: how long an embed request waits for company.
            prompts: task-type templates for embedding inputs (:mod:`.prompts`).
            extra_body: merged into every chat/completions body.
            headers: extra request headers.
        """
        self.model_name = model_name
        self.base_url = base_url
        self.remote_model = remote_model
        all_headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        if api_key:
            all_headers["Authorization"] = f"Bearer {api_key}"
        self._http = HttpClient(base_url, headers=all_headers, timeout_s=timeout_s,
                                connect_timeout_s=connect_timeout_s, max_concurrency=max_concurrency,
                                secret=api_key, name="openai")
        self._chat_url = self._http.endpoint("/chat/completions")
        self._embed_url = self._http.endpoint("/embeddings")
        self._top_k = supports_top_k
        self._n = supports_n
        self._n_ignored = False  # set once the server answered fewer choices than n
        self._system_role = system_role
        self._max_field = max_tokens_field
        self._default_max = default_max_tokens
        self._dimensions = supports_dimensions
        self._prompts = prompts or EmbedPrompts()
        self._extra = dict(extra_body or {})
        self._batcher: MicroBatcher[tuple[str, int], content_pb2.EmbedContentResponse] = MicroBatcher(
            self._embed_many, max_size=embed_batch_size, max_wait_s=embed_max_wait_s)

    @classmethod
    def from_config(cls, model: ModelConfig) -> OpenAIBackend:
        """Validate a model's options and build its backend.

        Raises:
            ConfigError: an option is missing, unknown or malformed (one line
                naming the model and the key).
        """
        opts = OptionReader(model, OPTIONS)
        base_url = opts.base_url(example="http://127.0.0.1:8000/v1")
        remote = opts.string("remote_model", model.name.removeprefix("models/"), example="'llama3.1:8b'")
        assert remote is not None
        if remote != remote.strip():
            raise opts.error("remote_model", f"must not have surrounding whitespace, got {remote!r}")
        batch = opts.integer("embed_batch_size", DEFAULT_EMBED_BATCH, lo=1, hi=4096)
        wait = opts.duration("embed_max_wait", DEFAULT_EMBED_WAIT_S, zero=True)
        max_tokens = opts.integer("default_max_tokens", DEFAULT_MAX_TOKENS, lo=1, hi=_INT32_MAX)
        assert batch is not None and wait is not None and max_tokens is not None
        return cls(
            model_name=model.name, base_url=base_url, remote_model=remote, api_key=opts.api_key(),
            timeout_s=opts.duration("timeout"), connect_timeout_s=opts.duration("connect_timeout", 10.0),
            max_concurrency=model.max_concurrency, supports_top_k=opts.flag("supports_top_k", True),
            supports_n=opts.flag("supports_n", True), supports_dimensions=opts.flag("supports_dimensions", False),
            system_role=opts.flag("system_role", True),
            max_tokens_field=opts.choice("max_tokens_field", MAX_TOKENS_FIELDS, "max_tokens"),
            default_max_tokens=max_tokens, embed_batch_size=batch, embed_max_wait_s=wait,
            prompts=EmbedPrompts.from_options(model.options.get("prompts"), model.options.get("default_title"),
                                              opts.error),
            extra_body=_extra_body(opts), headers=_headers(opts),
        )

    # -- Backend protocol ------------------------------------------------------------

    async def generate(self, request: content_pb2.GenerateContentRequest) -> content_pb2.GenerateContentResponse:
        """Answer one generation request (see :meth:`generate_raw`)."""
        return content_pb2.GenerateContentResponse.FromString(await self._generate(request))

    async def generate_raw(self, payload: bytes) -> bytes:
        """A serialized GenerateContentResponse for a serialized request.

        The executor's entry point: the answer is written as wire bytes
        straight from the server's JSON, with no response message built.
        """
        return await self._generate(content_pb2.GenerateContentRequest.FromString(payload))

    async def embed(self, request: content_pb2.EmbedContentRequest) -> content_pb2.EmbedContentResponse:
        """Answer one embedding request, in one call with other concurrent ones."""
        try:
            text = self._embed_text(request)
        except _Invalid as e:
            raise BackendError(code_pb2.INVALID_ARGUMENT, str(e), retryable=False) from None
        dim = request.output_dimensionality if request.HasField("output_dimensionality") else 0
        if dim < 0:
            raise BackendError(code_pb2.INVALID_ARGUMENT, "output_dimensionality must be positive", retryable=False)
        return await self._batcher.submit((text, dim))

    async def aclose(self) -> None:
        """Finish the embeddings calls under way, then close the connections."""
        await self._batcher.aclose()
        await self._http.aclose()

    # -- generation ------------------------------------------------------------------

    async def _generate(self, request: content_pb2.GenerateContentRequest) -> bytes:
        try:
            body, n, seed = self._chat_body(request)
        except _Invalid as e:
            raise BackendError(code_pb2.INVALID_ARGUMENT, str(e), retryable=False) from None
        if n > 1 and (self._n_ignored or not self._n):
            return await self._fan_out(body, n, seed, [], None)
        data = await self._post_json(self._chat_url, orjson.dumps(body), "chat completion")
        choices = data.get("choices")
        if not isinstance(choices, list) or (not choices and n <= 1):
            raise self._garbage(data, "chat completion")
        if len(choices) < n:
            if not self._n_ignored:
                log.info("%s: the server answered %d of n=%d choices; such requests fan out into single "
                         "calls from now on", self.model_name, len(choices), n)
                self._n_ignored = True
            return await self._fan_out(body, n, seed, choices, data)
        return _answer(choices, data.get("usage"), data.get("model"), data)

    async def _fan_out(self, body: dict[str, Any], n: int, seed: int | None, have: list[Any],
                       first: dict[str, Any] | None) -> bytes:
        """Complete ``have`` to ``n`` choices with single calls, seed + i for the i-th."""
        body.pop("n", None)
        calls = []
        for i in range(len(have), n):
            single = dict(body)
            if seed is not None:
                single["seed"] = seed + i
            calls.append(self._post_json(self._chat_url, orjson.dumps(single), "chat completion"))
        answers = await asyncio.gather(*calls)
        choices = list(have)
        usages = [] if first is None else [first.get("usage")]
        for data in answers:
            got = data.get("choices")
            if not isinstance(got, list) or not got:
                raise self._garbage(data, "chat completion")
            choices.append(got[0])
            usages.append(data.get("usage"))
        head = first if first is not None else answers[0]
        # Indexes are positions: each single call numbers its one choice 0.
        return _answer(choices, _sum_usage(usages), head.get("model"), head, renumber=True)

    def _chat_body(self, request: content_pb2.GenerateContentRequest) -> tuple[dict[str, Any], int, int | None]:
        """The chat/completions body, the candidate count and the seed.

        Raises:
            _Invalid: a field set that this backend cannot honour.
        """
        if _UNMAPPED_REQUEST_FIELDS:
            for field, _ in request.ListFields():
                if field.name in _UNMAPPED_REQUEST_FIELDS:
                    raise _Invalid(f"{field.name} is not supported by the openai backend")
        messages: list[dict[str, str]] = []
        for i, content in enumerate(request.contents):
            role = content.role
            if role == "" or role == "user":
                role = "user"
            elif role == "model":
                role = "assistant"
            else:
                raise _Invalid(f"contents[{i}].role must be 'user' or 'model', got {role!r}")
            parts = content.parts
            # One text part is nearly every turn: read it without the loop.
            if len(parts) == 1 and (part := parts[0]).WhichOneof("data") == "text":
                text = part.text
            else:
                text = _text(parts, f"contents[{i}]")
            messages.append({"role": role, "content": text})
        system = _text(request.system_instruction.parts, "system_instruction") if request.HasField(
            "system_instruction") else None
        config = request.generation_config if request.HasField("generation_config") else None
        if system is not None:
            if self._system_role:
                messages.insert(0, {"role": "system", "content": system})
            elif messages and messages[0]["role"] == "user":
                messages[0] = {"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}
            else:
                messages.insert(0, {"role": "user", "content": system})
        body: dict[str, Any] = {"model": self.remote_model, "messages": messages}
        n, seed = 1, None
        max_tokens = self._default_max
        if config is not None:
            for field, value in config.ListFields():
                name = field.name
                if name == "temperature":
                    body["temperature"] = _float32(value)
                elif name == "top_p":
                    body["top_p"] = _float32(value)
                elif name == "max_output_tokens":
                    if value < 1:
                        raise _Invalid(f"generation_config.max_output_tokens must be positive, got {value}")
                    max_tokens = value
                elif name == "stop_sequences":
                    body["stop"] = list(value)
                elif name == "candidate_count":
                    if not 1 <= value <= _MAX_FANOUT:
                        raise _Invalid(f"generation_config.candidate_count must be from 1 to {_MAX_FANOUT}, "
                                       f"got {value}")
                    n = value
                elif name == "seed":
                    body["seed"] = seed = value
                elif name == "top_k":
                    if not self._top_k:
                        raise _Invalid(f"generation_config.top_k is not supported by {self.model_name}'s server "
                                       "(its supports_top_k option is false)")
                    body["top_k"] = value
                elif name == "response_mime_type":
                    if value == "application/json":
                        body["response_format"] = {"type": "json_object"}
                    elif value != "text/plain":
                        raise _Invalid(f"generation_config.response_mime_type {value!r} is not supported "
                                       "(only text/plain and application/json)")
                else:
                    raise _Invalid(f"generation_config.{name} is not supported by the openai backend")
        body[self._max_field] = max_tokens
        if n > 1:
            body["n"] = n
        if self._extra:
            body.update(self._extra)
        return body, n, seed

    # -- embeddings ------------------------------------------------------------------

    def _embed_text(self, request: content_pb2.EmbedContentRequest) -> str:
        """The input to embed: the text parts joined, put in the task type's template."""
        return self._prompts.apply(_text(request.content.parts, "content", "\n"), request)

    async def _embed_many(self, items: list[tuple[str, int]]) -> list[content_pb2.EmbedContentResponse | BackendError]:
        """Answers for a group of (text, dimensionality) in as few calls as possible."""
        if not self._dimensions:
            return await self._embed_call(items, 0)
        # `dimensions` is per call: one call per distinct value asked for.
        by_dim: dict[int, list[int]] = {}
        for i, (_, dim) in enumerate(items):
            by_dim.setdefault(dim, []).append(i)
        results: list[content_pb2.EmbedContentResponse | BackendError] = [
            BackendError(code_pb2.INTERNAL, "no answer")] * len(items)
        groups = list(by_dim.items())
        answers = await asyncio.gather(*(self._embed_call([items[i] for i in idxs], dim) for dim, idxs in groups))
        for (_, idxs), answer in zip(groups, answers, strict=True):
            for i, r in zip(idxs, answer, strict=True):
                results[i] = r
        return results

    async def _embed_call(self, items: list[tuple[str, int]], dimensions: int) -> list[
            content_pb2.EmbedContentResponse | BackendError]:
        """One embeddings call; a refused many-input call is bisected so only bad inputs fail.

        Raises:
            BackendError: an error that is every input's (retryable, auth, …).
        """
        body: dict[str, Any] = {"model": self.remote_model, "input": [text for text, _ in items]}
        if dimensions:
            body["dimensions"] = dimensions
        try:
            data = await self._post_json(self._embed_url, orjson.dumps(body), "embeddings answer")
        except BackendError as e:
            if len(items) == 1 or e.retryable or e.code != code_pb2.INVALID_ARGUMENT:
                raise
            # 400/413/422: an input (too long, empty) or the call's size. The
            # halves tell which; the inputs at fault end up alone.
            mid = len(items) // 2
            left, right = await asyncio.gather(self._bisect(items[:mid], dimensions),
                                               self._bisect(items[mid:], dimensions))
            return left + right
        vectors = self._vectors(data, len(items))
        return [_embedding(v, dim) for v, (_, dim) in zip(vectors, items, strict=True)]

    async def _bisect(self, items: list[tuple[str, int]], dimensions: int) -> list[
            content_pb2.EmbedContentResponse | BackendError]:
        try:
            return await self._embed_call(items, dimensions)
        except BackendError as e:
            return [e] * len(items)

    def _vectors(self, data: dict[str, Any], n: int) -> list[list[float]]:
        rows = data.get("data")
        if not isinstance(rows, list) or len(rows) != n:
            got = len(rows) if isinstance(rows, list) else "no"
            raise BackendError(code_pb2.INTERNAL, f"model server answered {got} embeddings for {n} inputs: "
                               f"{self._http.body_excerpt(orjson.dumps(data))}")
        vectors: list[list[float] | None] = [None] * n
        for k, row in enumerate(rows):
            index = row.get("index", k) if isinstance(row, dict) else None
            vector = row.get("embedding") if isinstance(row, dict) else None
            if (not isinstance(index, int) or not 0 <= index < n or vectors[index] is not None
                    or not isinstance(vector, list) or not vector):
                raise self._garbage(data, "embeddings answer")
            vectors[index] = vector
        return vectors  # type: ignore[return-value]  # every slot was filled exactly once

    # -- HTTP ------------------------------------------------------------------------

    async def _post_json(self, url: Any, body: bytes, what: str) -> dict[str, Any]:
        status, raw, headers = await self._http.post(url, body)
        if not 200 <= status < 300:
            raise self._status_error(status, raw, headers)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise BackendError(code_pb2.INTERNAL, f"model server answered HTTP {status} with a body that is not "
                               f"a {what}: {self._http.body_excerpt(raw)}")
        return data

    def _status_error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> BackendError:
        try:
            message, kind = error_detail(orjson.loads(raw))
        except orjson.JSONDecodeError:
            message, kind = None, ""
        retryable = overload = None
        if status == 429 and "insufficient_quota" in kind:
            # OpenAI's "you exceeded your current quota": billing, not load.
            retryable = overload = False
        return self._http.http_error(status, raw, headers, message=message, retryable=retryable, overload=overload)

    def _garbage(self, data: dict[str, Any], what: str) -> BackendError:
        return BackendError(code_pb2.INTERNAL, f"model server answered HTTP 200 with a body that is not a {what}: "
                            f"{self._http.body_excerpt(orjson.dumps(data))}")


# -- mapping helpers (pure functions, hot path) -----------------------------------------------


def _text(parts: Any, where: str, sep: str = "") -> str:
    """The text parts of a content joined (a string: the form every server takes)."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.WhichOneof("data")
        if kind != "text":
            what = kind or "empty"
            raise _Invalid(f"{where}.parts[{j}] is {what}; the openai backend sends text parts only")
        texts.append(part.text)
    return texts[0] if len(texts) == 1 else sep.join(texts)


def _float32(value: float) -> float:
    """A float field's value as the short decimal the client most likely wrote
    (float32 0.7 reads back as 0.699999988079071)."""
    return float(f"{value:.7g}")


def _count(usage: Any, key: str) -> int:
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and 0 <= value <= _INT32_MAX else 0


def _sum_usage(usages: list[Any]) -> dict[str, int]:
    """Usage of fanned-out calls: the prompt once, completions summed."""
    prompt = _count(usages[0], "prompt_tokens") if usages else 0
    completion = sum(_count(u, "completion_tokens") for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _message_text(choice: Any) -> str | None:
    if not isinstance(choice, dict):
        return None
    message = choice.get("message")
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        return ""  # a refusal or tool call with no text
    if isinstance(content, list):  # a few servers answer content parts
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return None


def _answer(choices: list[Any], usage: Any, model: Any, data: dict[str, Any], *, renumber: bool = False) -> bytes:
    """GenerateContentResponse wire bytes from chat choices.

    Raises:
        BackendError: INTERNAL when a choice has no message.
    """
    out = []
    for i, choice in enumerate(choices):
        text = _message_text(choice)
        if text is None:
            raise BackendError(code_pb2.INTERNAL, "model server answered HTTP 200 with a choice that has no "
                               f"message: {_short(data)}")
        reason = choice.get("finish_reason")
        finish = FINISH_REASONS.get(reason, _OTHER) if isinstance(reason, str) else _OTHER
        content = tagged(_T_PART, tagged(_T_TEXT, text.encode())) + _ROLE_MODEL
        candidate = tagged(_T_CONTENT, content) + _FINISH_BYTES[finish]
        index = i if renumber else choice.get("index", i)
        if isinstance(index, int) and 0 < index <= _INT32_MAX:
            candidate += _T_INDEX + varint(index)
        out.append(tagged(_T_CANDIDATE, candidate))
    if isinstance(usage, dict):
        counts = b""
        for tag, key in ((b"\x08", "prompt_tokens"), (b"\x10", "completion_tokens"), (b"\x18", "total_tokens")):
            value = _count(usage, key)
            if value:
                counts += tag + varint(value)
        if counts:
            out.append(tagged(_T_USAGE, counts))
    if isinstance(model, str) and model:
        out.append(tagged(_T_VERSION, model.encode()))
    return b"".join(out)


def _short(data: dict[str, Any]) -> str:
    return " ".join(orjson.dumps(data)[:1024].decode("utf-8", "replace").split())


def _embedding(vector: list[Any], dim: int) -> content_pb2.EmbedContentResponse | BackendError:
    """The response for one vector, cut to ``dim`` and back to unit length when longer."""
    if dim and len(vector) < dim:
        return BackendError(code_pb2.INVALID_ARGUMENT, f"output_dimensionality {dim} is more than the "
                            f"{len(vector)} dimensions of the model's embeddings", retryable=False)
    try:
        if dim and len(vector) > dim:
            vector = vector[:dim]
            norm = math.hypot(*vector)
            if norm > 0.0:
                vector = [v / norm for v in vector]
        return content_pb2.EmbedContentResponse(embedding=content_pb2.ContentEmbedding(values=vector))
    except (TypeError, ValueError):
        return BackendError(code_pb2.INTERNAL, "model server answered an embedding that is not a list of numbers")


# -- option helpers ------------------------------------------------------------------------


def _extra_body(opts: OptionReader) -> dict[str, Any] | None:
    if "extra_body" not in opts:
        return None
    table = opts.model.options["extra_body"]
    if not isinstance(table, dict):
        raise opts.error("extra_body", "must be a table, e.g. extra_body = { repetition_penalty = 1.1 }")
    reserved = {"model", "messages", "n", "stream", *MAX_TOKENS_FIELDS}
    if clash := sorted(set(table) & reserved):
        raise opts.error("extra_body", f"must not set {', '.join(clash)} (the backend sets them per request)")
    return dict(table)


def _headers(opts: OptionReader) -> dict[str, str] | None:
    if "headers" not in opts:
        return None
    table = opts.model.options["headers"]
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise opts.error("headers", 'must be a table of strings, e.g. headers = { "OpenAI-Organization" = "org-1" }')
    reserved = {"authorization", "content-type", "accept", "content-length", "host"}
    if clash := sorted(k for k in table if k.lower() in reserved):
        raise opts.error("headers", f"must not set {', '.join(clash)} (use api_key for Authorization)")
    if not all(header_safe(k) and header_safe(v) and k.strip() == k and ":" not in k for k, v in table.items()):
        raise opts.error("headers", "names and values must be printable ASCII (no line breaks, no ':' in names)")
    return dict(table)
