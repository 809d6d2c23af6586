"""Webhook notifications: a signed POST to each configured URI when a batch ends.

API.md section 8. When a batch becomes done, one delivery per distinct URI is
stored (``webhook_deliveries``) with its JSON body fixed, so every attempt
sends and signs the same bytes. One dispatcher task sends due deliveries with
bounded concurrency over one shared aiohttp session:

- a 2xx answer delivers; any other status (redirects are not followed), a
  timeout or a connection error is retried after ``initial_backoff_s * 2**n``
  (jittered, capped at ``max_backoff_s``, at least an honoured ``Retry-After``
  or ``retry-after-ms`` on 429/503: :class:`~.retry.Backoff`, the executor's
  policy), until ``max_attempts``, after which the delivery is FAILED;
- every attempt is logged (batch, URI without query, attempt, outcome);
- the SSRF guard (``netguard``) refuses loopback, private, link-local and
  other non-public addresses unless ``[webhooks] allow`` lists them: a URI
  whose host is such a literal address (or a ``localhost`` name) fails at once
  without a connection; a name is checked on the address it resolves to, the
  one connected to, and a refused answer is a failed attempt, retried like a
  connection error (DNS may change) but never sent;
- nothing here can block or fail a batch: the batch is done before it is
  enqueued, and errors stay inside this module.

With ``WebhookConfig.include_output`` the body also carries the batch's
output (:func:`notification`): read from the store and rendered once, when
the deliveries are stored, so a retry re-sends the same bytes. A body with
its output is at most ``MAX_BODY_WITH_OUTPUT`` bytes, because it is stored
once per URI and many receivers refuse larger requests; an output that does
not fit is left out and ``output_omitted`` says so.

Several dispatchers (replicas) may share one store: each delivery is claimed
in the store before an attempt (``claim_webhook_deliveries``) for longer than
an attempt can take (``claim_s``), so no two dispatchers attempt it at once,
and an attempt's outcome is stored only under its claim (a dispatcher whose
claim ran out and was taken over stores nothing). A claim left by a
dispatcher that died runs out and the delivery is sent again. An idle
dispatcher looks for due deliveries at least every ``POLL_S``, since another
replica's enqueue does not wake it.

Crash safety: a delivery is PENDING in the store until an attempt succeeds or
the last one fails, so a restart resumes it (an attempt cut short by the
crash is sent again: delivery is at least once, and ``X-Longbatch-Delivery``
lets receivers drop repeats). A batch marked done whose deliveries were never
stored (the process died in between) is found and enqueued on start.

Request headers: ``Content-Type: application/json``,
``X-Longbatch-Delivery`` (the delivery id, the same on every attempt),
``X-Longbatch-Timestamp`` (Unix seconds of the attempt, informational), and,
when ``[webhooks] secret`` is set, ``X-Longbatch-Signature: sha256=<hex>``,
the HMAC-SHA256 of the exact body bytes (the body only, not the headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import aiohttp
import orjson
from google.protobuf import json_format

from longbatch.v1 import batch_pb2

from . import jsonout
from .config import WebhookSettings
from .convert import batch_message, timestamp
from .domain import Batch, BatchKind, ItemStatus, ResultRow, State, now_us
from .netguard import ALLOW_HINT, AllowList, ForbiddenAddress, Guard, host_problem, malformed_host
from .outputs import result_rows
from .retry import Backoff, retry_after_from_headers
from .store import DeliveryStatus, Store, WebhookDelivery

log = logging.getLogger("longbatch.webhooks")

SIGNATURE_HEADER = "X-Longbatch-Signature"
DELIVERY_HEADER = "X-Longbatch-Delivery"
TIMESTAMP_HEADER = "X-Longbatch-Timestamp"
_USER_AGENT = "longbatch-webhooks/1"
_MAX_ERROR_CHARS = 500
_RETRY_AFTER_STATUSES = (429, 503)
POLL_S = 30.0
"""Longest an idle dispatcher waits before looking for due deliveries again."""


def claim_s(settings: WebhookSettings) -> float:
    """How long a dispatcher claims a delivery for one attempt: the POST's
    whole timeout twice over, and a second for recording its outcome, so a
    claim outlasts any attempt of a live dispatcher."""
    return 2 * settings.timeout_s + 1.0

MAX_BODY_WITH_OUTPUT = 1 << 20
"""Bytes of a notification body that carries ``output`` (1 MiB).

The body is stored once per URI (up to ``MAX_WEBHOOKS`` copies) and read
back for every attempt, and 1 MiB is the request limit many receivers ship
with (nginx's ``client_max_body_size``, aiohttp's ``client_max_size``),
whereas an inline output may reach half of ``limits.max_inline_output``
serialized, and its JSON more. A body that would be larger goes without
``output``, with ``output_omitted``."""
OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"
"""``output_omitted`` when the output's JSON would take the body over
``MAX_BODY_WITH_OUTPUT``: read it with GetOperation or StreamBatchResults."""
_OUTPUT_KEY = b',"output":'
_RENDER_ROWS = 1000
"""Inline responses rendered per hop to a thread: rendering a large
output (up to ``MAX_BODY_WITH_OUTPUT``) would hold the event loop for
tens of milliseconds."""
_RESPONSE_JSON: dict[BatchKind, Callable[[bytes], bytes]] = {
    BatchKind.GENERATE: jsonout.generate_response_json,
    BatchKind.EMBED: jsonout.embed_response_json,
}


def sign(secret: str, body: bytes) -> str:
    """The ``X-Longbatch-Signature`` value for ``body``: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def notification_body(batch: Batch, output: bytes | None = None, *, output_omitted: str | None = None) -> bytes:
    """The JSON body: ``{name, state, batch_stats, end_time, user_metadata}``,
    then ``output`` or ``output_omitted`` when given.

    ``batch_stats`` is the proto JSON of BatchStats (camelCase keys, int64 as
    strings, zeros included); ``end_time`` is RFC 3339; ``user_metadata`` is
    the config's Struct as plain JSON (``{}`` when unset). ``output`` is JSON
    already rendered (see :func:`notification`), written as it is, last.
    """
    msg = batch_message(batch)
    end = timestamp(batch.end_time_us)
    config = msg.webhook_config
    body: dict[str, object] = {
        "name": batch.name,
        "state": batch_pb2.BatchState.Name(int(batch.state)),  # type: ignore[arg-type]
        "batch_stats": json_format.MessageToDict(msg.batch_stats, always_print_fields_with_no_presence=True),
        "end_time": end.ToJsonString() if end is not None else None,
        "user_metadata": json_format.MessageToDict(config.user_metadata) if config.HasField("user_metadata") else {},
    }
    if output is not None:
        body["output"] = orjson.Fragment(output)
    elif output_omitted is not None:
        body["output_omitted"] = output_omitted
    return orjson.dumps(body)


async def notification(store: Store, batch: Batch) -> bytes:
    """The body sent about a done batch: :func:`notification_body`, with the
    batch's output when its config sets ``include_output``.

    ``output`` is what GetOperation's ``metadata.output`` holds, in proto
    JSON: ``{"inlinedResponses": {"inlinedResponses": [...]}}`` (every
    request in input order; a CANCELLED or EXPIRED batch's unfinished ones as
    their CANCELLED or DEADLINE_EXCEEDED errors) or ``{"responsesFile":
    "files/ID"}``. A FAILED batch has no output, so its body has none. An
    inline output that would take the body over ``MAX_BODY_WITH_OUTPUT`` is
    replaced by ``"output_omitted": "OUTPUT_TOO_LARGE"``.
    """
    base = notification_body(batch)
    if not batch.webhook or not batch_pb2.WebhookConfig.FromString(batch.webhook).include_output:
        return base
    if batch.state is State.FAILED:
        return base
    if batch.output_file:
        return notification_body(batch, orjson.dumps({"responsesFile": f"files/{batch.output_file}"}))
    # The body with the output is the base body with the key and the
    # output's JSON before its closing brace.
    output = await inline_output_json(store, batch, MAX_BODY_WITH_OUTPUT - len(base) - len(_OUTPUT_KEY))
    if output is None:
        return notification_body(batch, output_omitted=OUTPUT_TOO_LARGE)
    return notification_body(batch, output)


async def inline_output_json(store: Store, batch: Batch, limit: int) -> bytes | None:
    """The proto JSON of a done batch's inline output, or None as soon as it
    is seen to be longer than ``limit`` bytes (the rest is never read)."""
    parts: list[bytes] = []
    size = 0
    rows: list[ResultRow] = []

    async def render() -> bool:
        nonlocal size
        chunk = await asyncio.to_thread(_inlined_responses_json, batch.kind, rows)
        rows.clear()
        parts.append(chunk)
        size += len(chunk) + 1  # and a comma
        return size <= limit

    # Closed at once on an early return: its store read must not wait for
    # the garbage collector.
    async with contextlib.aclosing(result_rows(store, batch)) as results:
        async for row in results:
            rows.append(row)
            if len(rows) >= _RENDER_ROWS and not await render():
                return None
    if rows and not await render():
        return None
    if not parts:
        return b'{"inlinedResponses":{}}'  # proto JSON leaves an empty repeated field out
    output = b'{"inlinedResponses":{"inlinedResponses":[' + b",".join(parts) + b"]}}"
    return output if len(output) <= limit else None


def _inlined_responses_json(kind: BatchKind, rows: Sequence[ResultRow]) -> bytes:
    """``InlinedResponse`` (or ``InlinedEmbedContentResponse``) proto JSON of
    ``rows``, comma-separated; jsonout renders the messages as json_format
    would (tests/server/test_jsonout.py), several times faster."""
    response_json = _RESPONSE_JSON[kind]
    dumps = orjson.dumps
    out = []
    for row in rows:
        head = b'{"metadata":' + dumps(jsonout.struct(row.metadata)) + b"," if row.metadata is not None else b"{"
        if row.status is ItemStatus.SUCCEEDED:
            out.append(head + b'"response":' + response_json(row.result) + b"}")
        else:
            out.append(head + b'"error":' + dumps(jsonout.status(row.result)) + b"}")
    return b",".join(out)


def webhook_uris(batch: Batch) -> list[str]:
    """The distinct URIs of the batch's webhook config, in order."""
    if not batch.webhook:
        return []
    return list(dict.fromkeys(batch_pb2.WebhookConfig.FromString(batch.webhook).uris))


def deliveries_for(batch: Batch, body: bytes | None = None) -> list[WebhookDelivery]:
    """One new delivery per distinct URI of the batch's webhook config, each
    sending ``body`` (default: :func:`notification_body`, without output)."""
    uris = webhook_uris(batch)
    if not uris:
        return []
    if body is None:
        body = notification_body(batch)
    due = now_us()
    return [WebhookDelivery(id=secrets.token_urlsafe(16), batch_id=batch.id, uri=uri, body=body, attempts=0,
                            next_attempt_us=due) for uri in uris]


def loggable_uri(uri: str) -> str:
    """``uri`` without credentials, query or fragment (they may hold tokens)."""
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparseable uri>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class WebhookDispatcher:
    """Stores and sends webhook deliveries; see the module docstring.

    ``start`` and ``stop`` bracket its life; ``stop`` is safe to call twice or
    before ``start``. ``on_terminal`` is the executor's hook.
    """

    def __init__(self, store: Store, settings: WebhookSettings, secret: str) -> None:
        self._store = store
        self._settings = settings
        # Jitter of 20 % spreads receivers' retries yet keeps gaps growing;
        # an honoured hint is capped like a computed delay.
        self._backoff = Backoff(initial_s=settings.initial_backoff_s, max_s=settings.max_backoff_s, jitter=0.2,
                                max_hint_s=settings.max_backoff_s)
        self._secret = secret
        self._guard = Guard(AllowList.parse(settings.allow))
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._claim_s = claim_s(settings)
        self._enqueues: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Enqueue what a crash left out, then start sending."""
        for batch in await self._store.batches_missing_webhooks():
            await self._enqueue_logged(batch)  # one bad batch must not keep the server from starting
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self._settings.max_concurrency,
                resolver=self._guard.resolver(),
                # Every attempt resolves afresh and is checked on what it gets;
                # a cached answer would also outlive a DNS change for no gain.
                use_dns_cache=False,
                socket_factory=self._guard.socket_factory,
            ),
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
            headers={"User-Agent": _USER_AGENT},
            trust_env=False,  # library code never reads the environment (no proxy variables)
        )
        self._loop_task = asyncio.create_task(self._run(), name="longbatch-webhooks")

    async def stop(self, grace_s: float) -> None:
        """Stop sending: attempts in flight get ``grace_s``, then are cut short
        (they stay PENDING and are sent again on the next start)."""
        if self._stopping:
            return
        self._stopping = True
        if self._enqueues:
            await asyncio.wait(self._enqueues, timeout=grace_s)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        sends = list(self._inflight.values())
        if sends:
            _, late = await asyncio.wait(sends, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*sends, return_exceptions=True)
        for task in list(self._enqueues):
            task.cancel()
        await asyncio.gather(*self._enqueues, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- enqueueing -----------------------------------------------------------

    def on_terminal(self, batch: Batch) -> None:
        """Executor hook: store the batch's deliveries in the background, so
        ending the batch never waits on (or fails with) a webhook."""
        if not batch.webhook or self._stopping:
            return  # a batch done during shutdown is picked up by the next start's scan
        task = asyncio.create_task(self._enqueue_logged(batch), name=f"webhook-enqueue-{batch.id}")
        self._enqueues.add(task)
        task.add_done_callback(self._enqueues.discard)

    async def _enqueue_logged(self, batch: Batch) -> None:
        try:
            await self.enqueue(batch)
        except Exception:
            # The delivery rows are missing, so the next start's scan retries.
            log.exception("storing the webhook deliveries of %s failed", batch.name)

    async def enqueue(self, batch: Batch) -> None:
        """Store one PENDING delivery per URI of a done batch and wake the sender."""
        if not webhook_uris(batch):
            return  # nothing to send: the output is not worth reading
        body = await notification(self._store, batch)
        added = await self._store.add_webhook_deliveries(deliveries_for(batch, body))
        if added:
            log.info("%s: %d webhook deliveries queued", batch.name, added)
            self._wake.set()

    # -- sending --------------------------------------------------------------

    async def _run(self) -> None:
        """Send what is due; then sleep until the next due time, an enqueue or
        a finished attempt, whichever comes first."""
        while True:
            self._wake.clear()
            try:
                timeout = await self._dispatch_due()
            except Exception:
                log.exception("reading due webhook deliveries failed; retrying in 1s")
                timeout = 1.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S if timeout is None else min(timeout, POLL_S)):
                    await self._wake.wait()

    async def _dispatch_due(self) -> float | None:
        """Claim and start attempts for due deliveries; seconds until the next is due."""
        free = self._settings.max_concurrency - len(self._inflight)
        if free <= 0:
            return None  # a finishing attempt wakes the loop
        now = now_us()
        # Claimed in one write, so neither another dispatcher nor a stale
        # read of this one's (an attempt just finished) gets them again
        # while the claim lasts; recording an attempt ends its claim.
        for delivery in await self._store.claim_webhook_deliveries(now, free, self._claim_s):
            self._spawn_send(delivery)
            free -= 1
        if free <= 0:
            return None
        next_us = await self._store.next_webhook_time(now)
        return None if next_us is None else max(0.0, (next_us - now_us()) / 1e6)

    def _spawn_send(self, delivery: WebhookDelivery) -> None:
        task = asyncio.create_task(self._send(delivery), name=f"webhook-{delivery.id}")
        self._inflight[delivery.id] = task

        def finished(_: asyncio.Task[None]) -> None:
            self._inflight.pop(delivery.id, None)
            self._wake.set()

        task.add_done_callback(finished)

    async def _send(self, delivery: WebhookDelivery) -> None:
        """One attempt, then its outcome stored."""
        attempt = delivery.attempts + 1
        where = loggable_uri(delivery.uri)
        refused = self._refused(delivery.uri)
        if refused is not None:
            # The host alone decides it: every later attempt would fail the same way.
            log.warning("webhook batches/%s -> %s: attempt %d refused (%s); giving up", delivery.batch_id, where,
                        attempt, refused)
            await self._record(delivery, attempt, DeliveryStatus.FAILED, now_us(), refused)
            return
        error, retry_after = await self._post(delivery)
        settings = self._settings
        if error is None:
            log.info("webhook batches/%s -> %s: attempt %d delivered", delivery.batch_id, where, attempt)
            await self._record(delivery, attempt, DeliveryStatus.DELIVERED, now_us(), None)
            return
        if attempt >= settings.max_attempts:
            log.warning("webhook batches/%s -> %s: attempt %d failed (%s); giving up", delivery.batch_id, where,
                        attempt, error)
            await self._record(delivery, attempt, DeliveryStatus.FAILED, now_us(), error)
            return
        delay = self._backoff.delay(attempt, retry_after)
        log.warning("webhook batches/%s -> %s: attempt %d failed (%s); retrying in %.3gs", delivery.batch_id,
                    where, attempt, error, delay)
        await self._record(delivery, attempt, DeliveryStatus.PENDING, now_us() + int(delay * 1e6), error)

    def _refused(self, uri: str) -> str | None:
        """Why the URI's host is refused before any lookup, or None.

        Checked on every attempt, not only at create: a delivery stored
        under an earlier config (or before this guard existed) may point at
        a host the allow-list no longer covers.
        """
        try:
            host = urlsplit(uri).hostname
        except ValueError:
            return None  # aiohttp refuses it as an invalid URL
        if not host:
            return None
        if malformed_host(host):
            return f"the URI's host {host!r} is neither an IP address nor a host name"
        problem = host_problem(host, self._guard.allow)
        return None if problem is None else f"the URI {problem}; {ALLOW_HINT}"

    async def _post(self, delivery: WebhookDelivery) -> tuple[str | None, float | None]:
        """POST the body: (None, None) on 2xx, else (error text, Retry-After seconds)."""
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: delivery.id,
            TIMESTAMP_HEADER: str(int(time.time())),
        }
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, delivery.body)
        try:
            async with self._session.post(delivery.uri, data=delivery.body, headers=headers,
                                          allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return None, None
                retry_after = None
                if resp.status in _RETRY_AFTER_STATUSES:
                    retry_after = retry_after_from_headers(resp.headers)
                return f"HTTP {resp.status}", retry_after
        except TimeoutError:
            return f"no answer within {self._settings.timeout_s:g}s", None
        except aiohttp.InvalidURL:
            return "invalid URL", None
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, ForbiddenAddress):
                return str(e.os_error)[:_MAX_ERROR_CHARS], None  # the guard's reason, without aiohttp's wrapping
            return f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS], None
        except aiohttp.ClientResponseError as e:  # its text holds the full URL: leave that out
            return f"{type(e).__name__}: {e.status} {e.message}"[:_MAX_ERROR_CHARS], None
        except aiohttp.ClientError as e:
            return f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS], None
        except Exception as e:  # a bad URI or anything else must not end the dispatcher
            log.exception("webhook batches/%s -> %s: unexpected error", delivery.batch_id,
                          loggable_uri(delivery.uri))
            return f"{type(e).__name__}"[:_MAX_ERROR_CHARS], None

    async def _record(self, delivery: WebhookDelivery, attempts: int, status: DeliveryStatus, next_us: int,
                      error: str | None) -> None:
        try:
            if not await self._store.record_webhook_attempt(delivery.id, attempts, status, next_us, error,
                                                            claim=delivery.claim):
                # Its claim ran out mid-attempt and another dispatcher took
                # it over: that one's outcome counts (delivery is at least once).
                log.warning("webhook batches/%s -> %s: attempt %d outlasted its claim; not recorded",
                            delivery.batch_id, loggable_uri(delivery.uri), attempts)
        except Exception:
            # The row stays as it was: the attempt is made again later.
            log.exception("recording webhook attempt %d of delivery %s failed", attempts, delivery.id)
