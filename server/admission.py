"""Admission of one model's backend calls: an AIMD in-flight limit and an outage pause.

Every call the executor makes to a model's backend (one request, one
attempt) passes the model's :class:`ModelGate`:

* **Overload** (429, 503): the gate's in-flight ``limit`` starts at
  ``max_concurrency``, halves on an overload answer and grows by one after
  ``limit`` answered calls in a row without one (AIMD, between 1 and
  ``max_concurrency``). A burst of simultaneous 429s halves it once: only a
  call admitted after the last cut can cut again, since the calls in flight
  at a cut were admitted under the old limit and report the old load.
* **Outage** (connection refused or reset, no answer in time): when a call
  fails that way and no call of the model got an answer since it started,
  the backend is down, not the request bad. The gate pauses: no call goes
  out but one probe at a time (the next waiting request's real call), with
  jittered exponential backoff between probes. Any answer, even an error,
  ends the pause. The failed calls do not spend their requests' attempts;
  once the outage has lasted ``outage_timeout`` the waiting requests give
  up with the outage error, while probing goes on (a request that arrives
  while a probe is under way waits for its verdict first, so the first
  requests after the backend came back do not fail).

Calls beyond the limit or during a pause wait on a future in a FIFO deque,
woken by the call that frees their slot: no polling, no per-call task or
timer. An uncontended call costs :meth:`enter` and :meth:`ok`, a few
attribute updates; the timers of a pause exist only during one.

A call's life, as the executor drives it::

    if not gate.enter():
        admission = await gate.wait()      # ADMITTED, PROBE or GAVE_UP
    seen = gate.answered
    ... call the backend ...
    gate.ok()                              # answered
    gate.failed(seen, overload)            # answered with an error
    gate.unreachable(seen, started, ...)   # not answered: True if an outage
    gate.left(probe)                       # cancelled
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque

from .retry import Backoff

__all__ = ["Admission", "ModelGate"]

log = logging.getLogger("longbatch.executor")

# Limit cuts are logged at most this often per model: under a steady rate
# limit AIMD cuts every few dozen calls, and each cut is no news.
_CUT_LOG_EVERY_S = 60.0


class Admission(enum.Enum):
    """What :meth:`ModelGate.wait` hands a waiting call."""

    ADMITTED = "admitted"
    """Go ahead; the call holds a slot."""
    PROBE = "probe"
    """Go ahead as the paused model's one probe; the call holds a slot."""
    GAVE_UP = "gave_up"
    """The outage outlasted ``outage_timeout``: fail with :attr:`ModelGate.outage_error`; no slot held."""


class ModelGate:
    """The in-flight limit and outage state of one model; see the module docstring.

    Attributes:
        name: the model, for logs and the waiting reason.
        max_limit: the model's ``max_concurrency``, the limit's ceiling.
        limit: calls allowed in flight now, 1..max_limit.
        in_flight: calls admitted and not yet left.
        answered: calls the backend answered (successes and errors), ever;
            a call reads it when admitted to tell later what happened meanwhile.
        paused: whether the backend is taken to be down.
    """

    __slots__ = ("_cut_at", "_error", "_expire_handle", "_expired", "_next_cut_log", "_outage_timeout_s",
                 "_probe_backoff", "_probe_handle", "_probe_out", "_probe_ready", "_probes", "_since",
                 "_since_wall", "_waiters", "_window", "answered", "closed", "in_flight", "limit", "max_limit",
                 "name", "paused")

    def __init__(self, name: str, max_concurrency: int, *, outage_timeout_s: float, probe_backoff: Backoff) -> None:
        """Build an open gate at full limit.

        Args:
            name: the model's name.
            max_concurrency: the most calls in flight, at least 1.
            outage_timeout_s: how long after an outage began waiting calls give up, seconds.
            probe_backoff: the wait before each probe of a paused model (attempt 1 before the first).
        """
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.name = name
        self.max_limit = max_concurrency
        self.limit = max_concurrency
        self.in_flight = 0
        self.answered = 0
        self.paused = False
        self.closed = False
        self._outage_timeout_s = outage_timeout_s
        self._probe_backoff = probe_backoff
        self._waiters: deque[asyncio.Future[Admission]] = deque()
        self._window = 0  # answers without overload since the limit last changed
        self._cut_at = 0  # `answered` when the limit was last cut
        self._next_cut_log = 0.0
        # Outage state, meaningful while paused.
        self._since = 0.0
        self._since_wall = 0.0
        self._error: tuple[int, str] = (0, "")
        self._expired = False
        self._probes = 0
        self._probe_out = False
        self._probe_ready = False
        self._probe_handle: asyncio.TimerHandle | None = None
        self._expire_handle: asyncio.TimerHandle | None = None

    # -- admission ------------------------------------------------------------------

    def enter(self) -> bool:
        """Take a slot if one is free right now (the uncontended path).

        Returns:
            True when admitted; False when the call must :meth:`wait`.
        """
        if self.in_flight < self.limit and not self.paused and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def wait(self) -> Admission:
        """Wait for a slot, in arrival order.

        Returns:
            ADMITTED or PROBE with a slot held, or GAVE_UP (no slot) once
            the outage has outlasted ``outage_timeout`` and no probe is
            under way.

        Raises:
            asyncio.CancelledError: the caller was cancelled, or the gate closed.
        """
        if self.closed:
            raise asyncio.CancelledError
        if not self._waiters:
            if not self.paused:
                if self.in_flight < self.limit:
                    self.in_flight += 1
                    return Admission.ADMITTED
            elif self._probe_ready and not self._probe_out:
                self._admit_probe()
                return Admission.PROBE
            elif self._expired and not self._probe_out:
                return Admission.GAVE_UP
        fut: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.cancelled():
                # Not woken: drop it, so the deque holds live waiters only.
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            elif fut.result() is not Admission.GAVE_UP:
                # Woken with a slot, then cancelled before it ran: free it.
                self.left(fut.result() is Admission.PROBE)
            raise

    # -- leaving ----------------------------------------------------------------------

    def ok(self) -> None:
        """The call was answered successfully."""
        self.in_flight -= 1
        self.answered += 1
        if self.limit < self.max_limit:
            self._window += 1
            if self._window >= self.limit:
                self._grow()
        if self.paused:
            self._resume()
        if self._waiters:
            self._wake()

    def failed(self, seen: int, overload: bool) -> None:
        """The backend answered the call with an error.

        Args:
            seen: :attr:`answered` when the call was admitted.
            overload: the answer said the backend is too busy (429, 503).
        """
        self.in_flight -= 1
        self.answered += 1
        if overload:
            if seen >= self._cut_at and self.limit > 1:
                self._cut()
        elif self.limit < self.max_limit:
            self._window += 1
            if self._window >= self.limit:
                self._grow()
        if self.paused:
            self._resume()  # an error is an answer: the server is up
        if self._waiters:
            self._wake()

    def unreachable(self, seen: int, started: float, code: int, message: str, probe: bool) -> bool:
        """The call got no answer: refused, reset, or timed out.

        Args:
            seen: :attr:`answered` when the call was admitted.
            started: the loop time the call started.
            code: the google.rpc code the request would fail with.
            message: what went wrong, for the request's error and the logs.
            probe: whether the call was the paused model's probe.

        Returns:
            True when this is the model's outage (nothing was answered since
            the call started): the model is paused, and the request must not
            spend an attempt on it. False when other calls were answered
            meanwhile: the trouble is the request's own, an ordinary retry.
        """
        self.in_flight -= 1
        if self.answered != seen:
            if self._waiters:
                self._wake()
            return False
        self._error = (code, message)
        if not self.paused:
            self._pause(started, message)
        elif probe:
            self._probe_out = False
            self._probes += 1
            self._schedule_probe()
            if self._expired and self._waiters:
                self._wake()  # they waited for this probe's verdict
        return True

    def left(self, probe: bool) -> None:
        """The call ended without a verdict (cancelled)."""
        self.in_flight -= 1
        if probe and self.paused:
            # The probe learnt nothing: send the next one now.
            self._probe_out = False
            self._probe_ready = True
        if self._waiters:
            self._wake()

    def close(self) -> None:
        """Stop: waiting calls are cancelled, timers dropped; safe to call twice."""
        self.closed = True
        self._cancel_timers()
        waiters, self._waiters = self._waiters, deque()
        for fut in waiters:
            fut.cancel()

    # -- what the batch shows ------------------------------------------------------------

    @property
    def waiting_reason(self) -> str:
        """Why the model's requests are not running now; empty while they run."""
        if not self.paused:
            return ""
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._since_wall))
        reason = f"the backend of {self.name} is unreachable since {since} ({self._error[1]}); probing it"
        if self._expired:
            reason += ("; the outage outlasted outage_timeout, so its requests fail with this error"
                       " until it answers again")
        return reason

    def outage_error(self) -> tuple[int, str]:
        """The code and message a request gets when it gives up on an outage."""
        code, message = self._error
        lasted = asyncio.get_running_loop().time() - self._since
        return code, (f"{message} (the model's backend has been unreachable for {lasted:.0f}s, "
                      f"longer than outage_timeout {self._outage_timeout_s:g}s)")

    # -- internals ------------------------------------------------------------------------

    def _wake(self) -> None:
        """Hand freed slots to waiters, in order."""
        waiters = self._waiters
        if self.paused:
            if self._probe_ready and not self._probe_out:
                while waiters:
                    fut = waiters.popleft()
                    if not fut.done():
                        self._admit_probe()
                        fut.set_result(Admission.PROBE)
                        break
            if self._expired and not self._probe_out:
                # Past outage_timeout with no probe under way: nothing to wait for.
                while waiters:
                    fut = waiters.popleft()
                    if not fut.done():
                        fut.set_result(Admission.GAVE_UP)
            return
        while waiters and self.in_flight < self.limit:
            fut = waiters.popleft()
            if not fut.done():
                self.in_flight += 1
                fut.set_result(Admission.ADMITTED)

    def _admit_probe(self) -> None:
        self.in_flight += 1
        self._probe_out = True
        self._probe_ready = False

    def _grow(self) -> None:
        self.limit += 1
        self._window = 0
        if self.limit == self.max_limit:
            log.info("%s: no more overload; in-flight limit back to %d", self.name, self.limit)

    def _cut(self) -> None:
        before = self.limit
        self.limit = max(1, before // 2)
        self._window = 0
        self._cut_at = self.answered
        now = asyncio.get_running_loop().time()
        if now >= self._next_cut_log:
            self._next_cut_log = now + _CUT_LOG_EVERY_S
            log.warning("%s: backend overloaded (429/503); in-flight limit %d -> %d (of %d), then growing "
                        "by one per %d answers; further cuts within %.0fs are not logged",
                        self.name, before, self.limit, self.max_limit, self.limit, _CUT_LOG_EVERY_S)

    def _pause(self, started: float, message: str) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.paused = True
        self._since = min(started, now)
        self._since_wall = time.time() - (now - self._since)
        self._expired = False
        self._probes = 0
        self._probe_out = False
        self._probe_ready = False
        log.warning("%s: backend unreachable (%s); dispatch paused, probing with backoff; requests wait up to "
                    "outage_timeout %gs", self.name, message, self._outage_timeout_s)
        self._schedule_probe()
        if not self.closed:
            self._expire_handle = loop.call_at(self._since + self._outage_timeout_s, self._expire)

    def _schedule_probe(self) -> None:
        if self.closed:
            return
        delay = self._probe_backoff.delay(self._probes + 1)
        self._probe_handle = asyncio.get_running_loop().call_later(delay, self._probe_due)

    def _probe_due(self) -> None:
        self._probe_handle = None
        self._probe_ready = True
        if self._waiters:
            self._wake()

    def _expire(self) -> None:
        self._expire_handle = None
        self._expired = True
        log.warning("%s: backend still unreachable after outage_timeout %gs; its waiting requests fail with "
                    "the outage error (%s), probing goes on", self.name, self._outage_timeout_s, self._error[1])
        if self._waiters:
            self._wake()

    def _resume(self) -> None:
        lasted = asyncio.get_running_loop().time() - self._since
        self.paused = False
        self._cancel_timers()
        self._probe_out = self._probe_ready = self._expired = False
        log.warning("%s: backend answers again after %.1fs unreachable (%d failed probes); dispatch resumed",
                    self.name, lasted, self._probes)

    def _cancel_timers(self) -> None:
        for handle in (self._probe_handle, self._expire_handle):
            if handle is not None:
                handle.cancel()
        self._probe_handle = self._expire_handle = None
