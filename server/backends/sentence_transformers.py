"""The ``sentence-transformers`` backend: an embedding model in the server process.

The model is loaded once from a local folder (or a name already in the local
Hugging Face cache; nothing is ever downloaded) and every ``encode`` runs on
one dedicated thread, ``longbatch-encode``: the only place this module
touches torch or numpy. The event loop never waits on the model.

The executor calls :meth:`SentenceTransformersBackend.embed` once per request,
from every running embed batch of the model at once. A :class:`MicroBatcher`
turns those calls into ``encode`` calls of up to ``group_size`` texts, waiting
at most ``max_wait`` for a group to fill, one group at a time, so the next
group gathers while the current one encodes: batched encode is ~4.5 times faster
per text than one text per call on a CPU. ``encode`` sorts a group by length
before cutting it into forward passes of ``batch_size`` texts, so a group of
several batches pads less than one of a single batch in arrival order.

Model options (extra keys of the model's ``[[models]]`` table):

* ``model`` (required): a folder holding a sentence-transformers (or plain
  transformers) model, relative to the server's working directory, or a
  model id such as ``sentence-transformers/all-MiniLM-L6-v2`` that is already
  in the local Hugging Face cache.
* ``device``: ``cpu`` (default), ``cuda``, ``cuda:1``, ``mps``, …
* ``batch_size``: texts per forward pass of the model (default 64).
* ``group_size``: texts per ``encode`` call at most (default 4 times ``batch_size``).
* ``max_wait``: how long a group waits to fill, a duration (default ``5ms``).
* ``normalize``: return unit-length vectors (default true); false returns
  the model's raw vectors.
* ``prompts``: a table from task type to a template with ``{text}`` and,
  optionally, ``{title}``, e.g. ``RETRIEVAL_QUERY = "query: {text}"``. Keys
  are Gemini task type names (``RETRIEVAL_DOCUMENT``, with or without the
  ``TASK_TYPE_`` prefix, any case) or ``default`` for a request whose task
  type is unset or not listed. Without a template the text is embedded as
  it is, and task type and title are ignored (right for all-MiniLM-L6-v2).
* ``default_title``: what ``{title}`` becomes in a request without a title
  (default empty).

``output_dimensionality`` below the model's dimension keeps the first
components and scales them back to unit length (unless ``normalize`` is
false, when they are only cut); above it is an ``INVALID_ARGUMENT`` item
error. A non-text part is ``INVALID_ARGUMENT``; generation is
``UNIMPLEMENTED``. Texts longer than the model's ``max_seq_length`` tokens
are cut by the model, as sentence-transformers does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.rpc import code_pb2

from longbatch.v1 import content_pb2

from ..config import ConfigError, ModelConfig, parse_duration
from .base import BackendError
from .batching import MicroBatcher
from .prompts import EmbedPrompts

__all__ = ["SentenceTransformersBackend"]

log = logging.getLogger("longbatch.backends.sentence_transformers")

_OPTIONS = frozenset({"model", "device", "batch_size", "group_size", "max_wait", "normalize", "prompts",
                      "default_title"})
_GROUP_BATCHES = 4
"""Default group_size in batches. bench_local_embed (all-MiniLM-L6-v2, 2 CPU
cores, 10k texts of 17-28 tokens): 5.4 CPU ms per text with groups of one
batch, 4.7-5.0 with groups of four, 4.8 with eight; four keeps a group's
encode under a second."""
_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:\d+)?")
# A Hugging Face model id: "name" or "owner/name".
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_TASK_PREFIX = "TASK_TYPE_"
_TASK_TYPES = {
    name.removeprefix(_TASK_PREFIX): number
    for name, number in content_pb2.TaskType.items()
    if number != content_pb2.TASK_TYPE_UNSPECIFIED
}
_DEFAULT_KEY = "default"
_FIELDS = frozenset({"text", "title"})
_MAX_BATCH_SIZE = 4096
_MAX_GROUP_SIZE = 65536


@dataclass(frozen=True)
class _Item:
    """One request as the encode thread needs it."""

    text: str
    dim: int | None


class SentenceTransformersBackend:
    """Embeds with a sentence-transformers model on one dedicated thread,
    many requests per ``encode`` call."""

    def __init__(self, *, name: str, model_path: str, device: str = "cpu", batch_size: int = 64,
                 group_size: int | None = None, max_wait_s: float = 0.005, normalize: bool = True,
                 prompts: EmbedPrompts | None = None) -> None:
        """Start loading the model on the encode thread and return at once.

        The first group of requests waits for the load (a few seconds, most
        of it importing torch); a model that fails to load fails every
        request with FAILED_PRECONDITION and the reason.

        Args:
            name: the longbatch model name, for messages.
            model_path: a folder holding the model, already checked to exist.
            device: torch device to run on.
            batch_size: texts per forward pass.
            group_size: texts per ``encode`` call at most; None for
                ``4 * batch_size``.
            max_wait_s: how long a group waits to fill.
            normalize: return unit-length vectors.
            prompts: task-type templates (:mod:`.prompts`).
        """
        self._name = name
        self._path = model_path
        self._device = device
        self._batch_size = batch_size
        self._normalize = normalize
        self._prompts = prompts or EmbedPrompts()
        self._dim: int | None = None
        self._model: Any = None
        self._load_error: BackendError | None = None
        self.encode_calls = 0
        """``encode`` calls made for requests so far (the warm-up not counted)."""
        self.encoded_texts = 0
        """Texts encoded for requests so far."""
        self.encode_seconds = 0.0
        """Wall time spent inside those ``encode`` calls."""
        # One thread: torch already spreads one encode over the cores, and
        # two encodes at once would only contend for them.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="longbatch-encode")
        self._thread.submit(self._load)  # first on the one thread: every encode runs after it
        self._batcher: MicroBatcher[_Item, list[float]] = MicroBatcher(
            self._encode_group, max_size=group_size or _GROUP_BATCHES * batch_size, max_wait_s=max_wait_s,
            max_in_flight=1)

    @classmethod
    def from_config(cls, model: ModelConfig) -> SentenceTransformersBackend:
        """Validate a model's options, find its files and start loading it.

        Raises:
            ConfigError: an option is unknown, missing or malformed, the model
                is not on this machine, or sentence-transformers is not installed.
        """
        where = f"{model.name} (backend sentence-transformers)"
        opts = model.options
        if unknown := sorted(set(opts) - _OPTIONS):
            raise ConfigError(f"{where}: unknown options {', '.join(unknown)} (known: {', '.join(sorted(_OPTIONS))})")
        if "model" not in opts:
            raise ConfigError(f"{where}: model is required, e.g. model = \"./models/all-MiniLM-L6-v2\"")
        ref = opts["model"]
        if not isinstance(ref, str) or not ref.strip():
            raise ConfigError(f"{where}: model must be a folder or a cached model id, got {ref!r}")
        device = opts.get("device", "cpu")
        if not isinstance(device, str) or not _DEVICE.fullmatch(device):
            raise ConfigError(f"{where}: device must be a torch device like 'cpu', 'cuda' or 'cuda:1', got {device!r}")
        batch_size = opts.get("batch_size", 64)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= _MAX_BATCH_SIZE:
            raise ConfigError(f"{where}: batch_size must be an integer from 1 to {_MAX_BATCH_SIZE}, got {batch_size!r}")
        group_size = opts.get("group_size", _GROUP_BATCHES * batch_size)
        if not isinstance(group_size, int) or isinstance(group_size, bool) or not 1 <= group_size <= _MAX_GROUP_SIZE:
            raise ConfigError(f"{where}: group_size must be an integer from 1 to {_MAX_GROUP_SIZE}, got {group_size!r}")
        max_wait_s = parse_duration(opts.get("max_wait", "5ms"), f"{where}: max_wait")
        if max_wait_s > 10:
            raise ConfigError(f"{where}: max_wait must be at most 10s: each request waits that long for company")
        normalize = opts.get("normalize", True)
        if not isinstance(normalize, bool):
            raise ConfigError(f"{where}: normalize must be true or false, got {normalize!r}")
        prompts = EmbedPrompts.from_options(opts.get("prompts"), opts.get("default_title"),
                                            lambda key, why: ConfigError(f"{where}: {key} {why}"))
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ConfigError(f"{where}: the sentence-transformers package is not installed; "
                              "pip install 'longbatch[local]'")
        path = _resolve_model(ref, where)
        if model.max_concurrency < group_size:
            # Not an error: it works, but each group holds at most
            # max_concurrency texts, so the model pads more per text.
            log.warning("%s: max_concurrency %d is below group_size %d, so an encode call gets at most %d texts; "
                        "set max_concurrency = %d", where, model.max_concurrency, group_size, model.max_concurrency,
                        group_size)
        return cls(name=model.name, model_path=path, device=device, batch_size=batch_size, group_size=group_size,
                   max_wait_s=max_wait_s,
                   normalize=normalize, prompts=prompts)

    # -- Backend protocol ------------------------------------------------------------

    async def generate(self, request: content_pb2.GenerateContentRequest) -> content_pb2.GenerateContentResponse:
        """Always fails: an embedding model does not generate."""
        raise BackendError(code_pb2.UNIMPLEMENTED,
                           f"{self._name} is an embedding model (backend sentence-transformers): "
                           "it answers embed batches only")

    async def embed(self, request: content_pb2.EmbedContentRequest) -> content_pb2.EmbedContentResponse:
        """Embed one request, in a group with whatever else is waiting.

        Raises:
            BackendError: INVALID_ARGUMENT for a non-text part or an
                ``output_dimensionality`` above the model's; FAILED_PRECONDITION
                when the model did not load.
        """
        text = self._text(request)
        dim = request.output_dimensionality if request.HasField("output_dimensionality") else None
        if dim is not None:
            known = self._dim  # set once the model has loaded; the encode thread checks again
            if dim < 1 or (known is not None and dim > known):
                raise _bad_dimension(dim, known)
        values = await self._batcher.submit(_Item(text, dim))
        return content_pb2.EmbedContentResponse(embedding=content_pb2.ContentEmbedding(values=values))

    async def aclose(self) -> None:
        """Finish the group under way, fail those gathering, stop the thread."""
        await self._batcher.aclose()
        # Waits for a load still under way (at most a few seconds): a thread
        # left importing torch would hold the interpreter's exit anyway.
        await asyncio.to_thread(self._thread.shutdown, True, cancel_futures=True)
        self._model = None
        if self.encode_calls:
            log.info("%s: encoded %d texts in %d encode calls, %.1fs", self._name, self.encoded_texts,
                     self.encode_calls, self.encode_seconds)

    # -- on the event loop ---------------------------------------------------------

    def _text(self, request: content_pb2.EmbedContentRequest) -> str:
        """The text to encode: the parts joined, put in the task type's template."""
        parts = request.content.parts
        for k, part in enumerate(parts):
            kind = part.WhichOneof("data")
            if kind != "text":
                raise BackendError(code_pb2.INVALID_ARGUMENT,
                                   f"content.parts[{k}] is {kind or 'empty'}: the sentence-transformers backend "
                                   "embeds text only")
        return self._prompts.apply("\n".join([p.text for p in parts]), request)

    async def _encode_group(self, items: list[_Item]) -> list[list[float] | BackendError]:
        # The boundary between the loop and the model: everything past it
        # runs on the encode thread.
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._encode, items)

    # -- on the encode thread ------------------------------------------------------

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            from sentence_transformers import SentenceTransformer

            try:  # the per-file "Loading weights" bar would go to the server's stderr
                from transformers.utils import logging as hf_logging
                hf_logging.disable_progress_bar()
            except (ImportError, AttributeError):
                pass
            model = SentenceTransformer(self._path, device=self._device, local_files_only=True)
            # One encode now: it gives the dimension on any version of the
            # library, and the first group does not pay for lazy set-up.
            warm = model.encode(["warm-up"], convert_to_numpy=True, show_progress_bar=False)
        except Exception as e:
            log.exception("%s: cannot load the sentence-transformers model %s", self._name, self._path)
            self._load_error = BackendError(code_pb2.FAILED_PRECONDITION,
                                            f"{self._name}: the model {self._path} did not load: "
                                            f"{type(e).__name__}: {_first_line(e)}")
            return
        self._dim = int(warm.shape[1])
        self._model = model
        log.info("%s: loaded %s on %s (%d dimensions) in %.1fs on thread %s", self._name, self._path, self._device,
                 self._dim, time.perf_counter() - started, threading.current_thread().name)

    def _encode(self, items: list[_Item]) -> list[list[float] | BackendError]:
        """Vectors for a group, one entry per item, truncated as each asks."""
        import numpy as np  # a dependency of sentence-transformers, so present once the model loaded

        if self._load_error is not None:
            raise self._load_error
        model, full = self._model, self._dim
        if model is None or full is None:
            raise BackendError(code_pb2.UNAVAILABLE, f"{self._name}: the model is shut down")
        started = time.perf_counter()
        vectors = model.encode([item.text for item in items], batch_size=self._batch_size, convert_to_numpy=True,
                               normalize_embeddings=self._normalize, show_progress_bar=False)
        self.encode_seconds += time.perf_counter() - started
        self.encode_calls += 1
        self.encoded_texts += len(items)
        out: list[list[float] | BackendError] = []
        for item, row in zip(items, vectors, strict=True):
            if item.dim is None or item.dim == full:
                out.append(row.tolist())
            elif item.dim > full:
                out.append(_bad_dimension(item.dim, full))
            else:
                cut = row[: item.dim]
                if self._normalize:
                    # Matryoshka-style: the leading components, back to unit length.
                    norm = float(np.linalg.norm(cut))
                    if norm > 0.0:
                        cut = cut / norm
                out.append(cut.tolist())
        return out


def _bad_dimension(dim: int, full: int | None) -> BackendError:
    within = f"1..{full} for this model" if full is not None else "at least 1"
    return BackendError(code_pb2.INVALID_ARGUMENT, f"output_dimensionality {dim} is out of range: must be {within}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _resolve_model(ref: str, where: str) -> str:
    """The folder of the model ``ref`` names, without any network access."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise ConfigError(f"{where}: model: {ref} holds no model (no modules.json or config.json)")
        return str(folder.resolve())
    if ref.startswith((".", "/", "~")) or not _REPO_ID.fullmatch(ref):
        raise ConfigError(f"{where}: model: no folder {ref}")
    # An id: only a copy already in the local cache will do.
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(ref, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and kin: it is not here
        raise ConfigError(f"{where}: model: no folder {ref} and no {ref} in the local Hugging Face cache "
                          "(models are never downloaded; copy it here first)") from None
