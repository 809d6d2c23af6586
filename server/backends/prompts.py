"""Task-type prompt templates for embedding models: the ``prompts`` and ``default_title`` options.

Gemini's ``EmbedContentRequest`` says what an embedding is for (``task_type``)
and may carry a document ``title``; an open embedding model is told the same
by a prefix it was trained with (e5: ``query: ``/``passage: ``, nomic:
``search_query: ``/``search_document: ``, EmbeddingGemma: ``task: search
result | query: ``). Both embedding backends (``openai`` and
``sentence-transformers``) read the same table::

    prompts = { RETRIEVAL_QUERY = "query: {text}", RETRIEVAL_DOCUMENT = "passage: {title} {text}",
                default = "{text}" }

Keys are task type names in any case, with or without ``TASK_TYPE_``, or
``default`` for a request whose task type is unset or not listed. A template
holds ``{text}`` and may hold ``{title}`` (the request's title, or
``default_title``). Without a template the text is embedded as it is and
task type and title are not used: right for a model trained without
prefixes (all-MiniLM-L6-v2), and documented as such.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping

from longbatch.v1 import content_pb2

from ..config import ConfigError

__all__ = ["EmbedPrompts"]

_TASK_PREFIX = "TASK_TYPE_"
TASK_TYPES = {v.name.removeprefix(_TASK_PREFIX): v.number for v in content_pb2.TaskType.DESCRIPTOR.values
              if v.number != 0}
"""Task type names as Gemini spells them, to their TaskType numbers."""
_FIELDS = frozenset({"text", "title"})

Error = Callable[[str, str], ConfigError]
"""Builds the one-line ConfigError about an option key: ``error("prompts.X", "must …")``."""


class EmbedPrompts:
    """The templates of one model, by TaskType number."""

    def __init__(self, by_type: Mapping[int, str] | None = None, default: str | None = None,
                 default_title: str = "") -> None:
        """Args:
            by_type: templates by TaskType number, already checked.
            default: the template for any other task type; None for the text alone.
            default_title: what ``{title}`` becomes for a request without a title.
        """
        self._by_type = dict(by_type or {})
        self._default = default
        self._default_title = default_title

    @classmethod
    def from_options(cls, table: object, default_title: object, error: Error) -> EmbedPrompts:
        """Read and check the ``prompts`` table (None when unset) and ``default_title``.

        Raises:
            ConfigError: from ``error``, naming the key at fault.
        """
        if default_title is None:
            default_title = ""
        if not isinstance(default_title, str):
            raise error("default_title", f"must be a string, got {default_title!r}")
        if table is None:
            return cls(default_title=default_title)
        if not isinstance(table, dict):
            raise error("prompts", 'must be a table like { RETRIEVAL_QUERY = "query: {text}" }')
        by_type: dict[int, str] = {}
        default: str | None = None
        for key, template in table.items():
            at = f"prompts.{key}"
            if not isinstance(template, str):
                raise error(at, f'must be a string like "query: {{text}}", got {template!r}')
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            except ValueError as e:
                raise error(at, f"is not a template ({e}); write a literal brace as {{{{ or }}}}") from None
            if odd := fields - _FIELDS:
                raise error(at, f"has an unknown placeholder {{{sorted(odd)[0]}}} (known: {{text}}, {{title}})")
            if "text" not in fields:
                raise error(at, "must contain {text}")
            if key.lower() == "default":
                default = template
                continue
            number = TASK_TYPES.get(key.upper().removeprefix(_TASK_PREFIX))
            if number is None:
                raise error(at, f"is not a task type (known: {', '.join(sorted(TASK_TYPES))}, default)")
            by_type[number] = template
        return cls(by_type, default, default_title)

    def apply(self, text: str, request: content_pb2.EmbedContentRequest) -> str:
        """``text`` (the request's parts, joined) in its task type's template."""
        template = self._by_type.get(request.task_type, self._default)
        if template is None:
            return text
        title = request.title if request.HasField("title") else self._default_title
        return template.format(text=text, title=title)
