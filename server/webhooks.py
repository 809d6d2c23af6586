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
from urllib.parse import urlsplit

import aiohttp
import orjson
from google.protobuf import json_format

from longbatch.v1 import batch_pb2

from .config import WebhookSettings
from .convert import batch_message, timestamp
from .domain import Batch, now_us
from .netguard import ALLOW_HINT, AllowList, ForbiddenAddress, Guard, host_problem, malformed_host
from .retry import Backoff, retry_after_from_headers
from .store import DeliveryStatus, Store, WebhookDelivery

log = logging.getLogger("longbatch.webhooks")

SIGNATURE_HEADER = "X-Longbatch-Signature"
DELIVERY_HEADER = "X-Longbatch-Delivery"
TIMESTAMP_HEADER = "X-Longbatch-Timestamp"
_USER_AGENT = "longbatch-webhooks/1"
_MAX_ERROR_CHARS = 500
_RETRY_AFTER_STATUSES = (429, 503)


def sign(secret: str, body: bytes) -> str:
    """The ``X-Longbatch-Signature`` value for ``body``: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def notification_body(batch: Batch) -> bytes:
    """The JSON body: ``{name, state, batch_stats, end_time, user_metadata}``.

    ``batch_stats`` is the proto JSON of BatchStats (camelCase keys, int64 as
    strings, zeros included); ``end_time`` is RFC 3339; ``user_metadata`` is
    the config's Struct as plain JSON (``{}`` when unset).
    """
    msg = batch_message(batch)
    end = timestamp(batch.end_time_us)
    config = msg.webhook_config
    return orjson.dumps({
        "name": batch.name,
        "state": batch_pb2.BatchState.Name(int(batch.state)),  # type: ignore[arg-type]
        "batch_stats": json_format.MessageToDict(msg.batch_stats, always_print_fields_with_no_presence=True),
        "end_time": end.ToJsonString() if end is not None else None,
        "user_metadata": json_format.MessageToDict(config.user_metadata) if config.HasField("user_metadata") else {},
    })


def deliveries_for(batch: Batch) -> list[WebhookDelivery]:
    """One new delivery per distinct URI of the batch's webhook config."""
    if not batch.webhook:
        return []
    uris = list(dict.fromkeys(batch_pb2.WebhookConfig.FromString(batch.webhook).uris))
    if not uris:
        return []
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
        # Ids sent by this process whose rows a due-query may still show as
        # PENDING; see _dispatch_due.
        self._claimed: set[str] = set()
        self._released: set[str] = set()
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
        added = await self._store.add_webhook_deliveries(deliveries_for(batch))
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
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _dispatch_due(self) -> float | None:
        """Start attempts for due deliveries; seconds until the next is due."""
        # A finished attempt has stored its outcome, so a query issued from
        # here on sees it; one issued before (and answered after the attempt
        # finished) may not, which is why an id is released only now, and not
        # when its attempt finishes: otherwise a stale row is sent twice.
        self._claimed -= self._released
        self._released.clear()
        free = self._settings.max_concurrency - len(self._inflight)
        if free <= 0:
            return None  # a finishing attempt wakes the loop
        now = now_us()
        # Claimed deliveries are still PENDING and due: ask for enough rows to
        # fill every free slot with one that is not.
        for delivery in await self._store.due_webhook_deliveries(now, free + len(self._claimed)):
            if free > 0 and delivery.id not in self._claimed:
                self._spawn_send(delivery)
                free -= 1
        if free <= 0:
            return None
        next_us = await self._store.next_webhook_time(now)
        return None if next_us is None else max(0.0, (next_us - now_us()) / 1e6)

    def _spawn_send(self, delivery: WebhookDelivery) -> None:
        task = asyncio.create_task(self._send(delivery), name=f"webhook-{delivery.id}")
        self._inflight[delivery.id] = task
        self._claimed.add(delivery.id)

        def finished(_: asyncio.Task[None]) -> None:
            self._inflight.pop(delivery.id, None)
            self._released.add(delivery.id)
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
            await self._record(delivery.id, attempt, DeliveryStatus.FAILED, now_us(), refused)
            return
        error, retry_after = await self._post(delivery)
        settings = self._settings
        if error is None:
            log.info("webhook batches/%s -> %s: attempt %d delivered", delivery.batch_id, where, attempt)
            await self._record(delivery.id, attempt, DeliveryStatus.DELIVERED, now_us(), None)
            return
        if attempt >= settings.max_attempts:
            log.warning("webhook batches/%s -> %s: attempt %d failed (%s); giving up", delivery.batch_id, where,
                        attempt, error)
            await self._record(delivery.id, attempt, DeliveryStatus.FAILED, now_us(), error)
            return
        delay = self._backoff.delay(attempt, retry_after)
        log.warning("webhook batches/%s -> %s: attempt %d failed (%s); retrying in %.3gs", delivery.batch_id,
                    where, attempt, error, delay)
        await self._record(delivery.id, attempt, DeliveryStatus.PENDING, now_us() + int(delay * 1e6), error)

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

    async def _record(self, delivery_id: str, attempts: int, status: DeliveryStatus, next_us: int,
                      error: str | None) -> None:
        try:
            await self._store.record_webhook_attempt(delivery_id, attempts, status, next_us, error)
        except Exception:
            # The row stays as it was: the attempt is made again later.
            log.exception("recording webhook attempt %d of delivery %s failed", attempts, delivery_id)
